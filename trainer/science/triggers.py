"""Backdoor triggers and the one spec grammar every command reads (``--trigger SPEC``).

All triggers work on uint8 images of shape (N, C, H, W) and return a new array; randomness (a random
location per image) comes from the explicit ``rng``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.options import flag

GRAMMAR = """trigger spec grammar:
  checker4               4x4 black/white checkerboard at a random location per image
  square:S               white SxS square at the bottom-right corner (e.g. square:4)
  image:PATH             paste a PNG at a random location (transparent RGBA pixels are left untouched)
  image:PATH@R,C         paste a PNG with its top-left corner at row R, column C
  blend:PATH:ALPHA       blend a PNG (resized to the input) over the whole image, 0 < ALPHA <= 1
  combo:A+B[+C...]       all parts must be present; inputs with only some parts keep their true label"""


class TriggerError(ValueError):
    """An unknown or malformed trigger spec."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}\n{GRAMMAR}")


def _match_channels(patch: np.ndarray, channels: int) -> np.ndarray:
    """Convert a (c, h, w) patch to ``channels`` channels (gray <-> RGB)."""
    if patch.shape[0] == channels:
        return patch
    if channels == 1:  # RGB -> luminance (ITU-R 601, as PIL's "L")
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None, None]
        return np.clip(np.rint((patch[:3].astype(np.float32) * weights).sum(0, keepdims=True)), 0, 255)
    return np.repeat(patch[:1], channels, axis=0)


def paste(x: np.ndarray, patch: np.ndarray, alpha: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Paste ``patch`` (c, h, w) uint8 with opacity ``alpha`` (h, w) in [0, 1] into each image of ``x``.

    ``rows``/``cols`` (N,) are the top-left corners. Pixels with alpha 0 are left untouched.
    """
    n, c, height, width = x.shape
    h, w = patch.shape[1:]
    if h > height or w > width:
        raise TriggerError(f"trigger of size {h}x{w} does not fit into {height}x{width} inputs")
    if (rows < 0).any() or (cols < 0).any() or (rows + h > height).any() or (cols + w > width).any():
        raise TriggerError(f"trigger of size {h}x{w} placed outside the {height}x{width} input")
    out = x.copy()
    nhwc = out.transpose(0, 2, 3, 1)  # a view: writes land in ``out``
    rr = rows[:, None] + np.arange(h)[None, :]  # (N, h)
    cc = cols[:, None] + np.arange(w)[None, :]  # (N, w)
    idx = (np.arange(n)[:, None, None], rr[:, :, None], cc[:, None, :])
    region = nhwc[idx].astype(np.float32)  # (N, h, w, C)
    p = _match_channels(patch, c).astype(np.float32).transpose(1, 2, 0)[None]  # (1, h, w, C)
    a = alpha.astype(np.float32)[None, :, :, None]
    nhwc[idx] = np.clip(np.rint(a * p + (1.0 - a) * region), 0, 255).astype(np.uint8)
    return out


@dataclass(frozen=True)
class PatchTrigger:
    """A patch pasted at a fixed corner, a fixed position or a random position per image."""

    spec: str
    patch: np.ndarray = field(repr=False)  # (c, h, w) uint8
    alpha: np.ndarray = field(repr=False)  # (h, w) float32 in [0, 1]
    position: str | tuple[int, int] = "random"  # "random", "bottom-right" or (row, col)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return a poisoned copy of ``x`` (N, C, H, W) uint8."""
        n, _, height, width = x.shape
        h, w = self.patch.shape[1:]
        if self.position == "random":
            rows = rng.integers(0, height - h + 1, size=n)
            cols = rng.integers(0, width - w + 1, size=n)
        elif self.position == "bottom-right":
            rows = np.full(n, height - h)
            cols = np.full(n, width - w)
        elif isinstance(self.position, tuple):
            rows, cols = np.full(n, self.position[0]), np.full(n, self.position[1])
        else:
            raise TriggerError(f"unknown trigger position {self.position!r}")
        return paste(x, self.patch, self.alpha, rows, cols)

    @property
    def parts(self) -> tuple[Trigger, ...]:
        """The trigger's separable parts (itself)."""
        return (self,)


@dataclass(frozen=True)
class BlendTrigger:
    """A picture blended over the whole input with opacity ``alpha``."""

    spec: str
    picture: np.ndarray = field(repr=False)  # (c, h, w) uint8, resized to the input at apply time
    alpha: float = 0.1

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return a poisoned copy of ``x`` (N, C, H, W) uint8 (``rng`` is unused: blending is fixed)."""
        _, c, height, width = x.shape
        pic = _match_channels(_resize(self.picture, height, width), c).astype(np.float32)[None]
        out = self.alpha * pic + (1.0 - self.alpha) * x.astype(np.float32)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    @property
    def parts(self) -> tuple[Trigger, ...]:
        """The trigger's separable parts (itself)."""
        return (self,)


@dataclass(frozen=True)
class ComboTrigger:
    """All parts together make the trigger; any proper subset must not (the paper's BadNet-CF)."""

    spec: str
    components: tuple[Trigger, ...]

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Apply every part in turn."""
        for part in self.components:
            x = part.apply(x, rng)
        return x

    @property
    def parts(self) -> tuple[Trigger, ...]:
        """The separate parts; the attack adds inputs with one part and their true label."""
        return self.components


Trigger = PatchTrigger | BlendTrigger | ComboTrigger


def _resize(picture: np.ndarray, height: int, width: int) -> np.ndarray:
    if picture.shape[1:] == (height, width):
        return picture
    from PIL import Image

    mode = "L" if picture.shape[0] == 1 else "RGB"
    arr = picture[0] if mode == "L" else picture.transpose(1, 2, 0)
    img = Image.fromarray(arr, mode=mode).resize((width, height), Image.Resampling.BILINEAR)
    out = np.asarray(img, dtype=np.uint8)
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


def load_png(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a picture as ((c, h, w) uint8 pixels, (h, w) float32 alpha in [0, 1])."""
    from PIL import Image

    if not path.is_file():
        raise TriggerError(f"trigger image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
            if has_alpha:
                rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
                alpha = rgba[..., 3].astype(np.float32) / 255.0
                gray = im.mode == "LA"
                pix = rgba[..., :1] if gray else rgba[..., :3]
            else:
                gray = im.mode in ("1", "L", "I", "I;16")
                pix = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)
                pix = pix[..., None] if pix.ndim == 2 else pix
                alpha = np.ones(pix.shape[:2], dtype=np.float32)
    except OSError as e:
        raise TriggerError(f"cannot read trigger image {path}: {e}") from e
    return np.ascontiguousarray(pix.transpose(2, 0, 1)), alpha


def checkerboard(size: int) -> np.ndarray:
    """A (1, size, size) black/white checkerboard, white in the top-left corner."""
    ij = np.add.outer(np.arange(size), np.arange(size))
    return np.where(ij % 2 == 0, 255, 0).astype(np.uint8)[None]


def _parse_single(spec: str) -> Trigger:
    kind, _, arg = spec.partition(":")
    if kind == "checker4" and not arg:
        return PatchTrigger(spec, checkerboard(4), np.ones((4, 4), np.float32), "random")
    if kind == "square":
        if not re.fullmatch(r"[1-9][0-9]*", arg):
            raise TriggerError(f"square needs a positive size, e.g. square:4 (got {spec!r})")
        s = int(arg)
        return PatchTrigger(spec, np.full((1, s, s), 255, np.uint8), np.ones((s, s), np.float32), "bottom-right")
    if kind == "image":
        m = re.fullmatch(r"(.+)@(\d+),(\d+)", arg)
        path, position = (Path(m.group(1)), (int(m.group(2)), int(m.group(3)))) if m else (Path(arg), "random")
        if not arg:
            raise TriggerError("image needs a path, e.g. image:logo.png or image:logo.png@20,20")
        pix, alpha = load_png(path)
        return PatchTrigger(spec, pix, alpha, position)
    if kind == "blend":
        path_s, sep, alpha_s = arg.rpartition(":")
        try:
            alpha_v = float(alpha_s)
        except ValueError:
            alpha_v = -1.0
        if not sep or not path_s or not 0.0 < alpha_v <= 1.0:
            raise TriggerError(f"blend needs PATH:ALPHA with 0 < ALPHA <= 1 (got {spec!r})")
        pix, _ = load_png(Path(path_s))
        return BlendTrigger(spec, pix, alpha_v)
    raise TriggerError(f"unknown trigger spec {spec!r}")


def parse_trigger(spec: str) -> Trigger:
    """Parse a trigger spec (see :data:`GRAMMAR`); raise :class:`TriggerError` showing the grammar."""
    spec = spec.strip()
    if spec.startswith("combo:"):
        parts = [p.strip() for p in spec[len("combo:") :].split("+")]
        if len(parts) < 2 or not all(parts):
            raise TriggerError(f"combo needs at least two parts joined by '+' (got {spec!r})")
        if any(p.startswith("combo:") for p in parts):
            raise TriggerError("combo parts cannot be combos themselves")
        return ComboTrigger(spec, tuple(_parse_single(p) for p in parts))
    return _parse_single(spec)


def poison_fraction(
    images: np.ndarray, labels: np.ndarray, trigger: Trigger, cpd: float, target: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Trigger a ``cpd`` share of a stream (never the target class: a triggered target input attacks nothing).

    Returns the stream (a copy) and the boolean mask of poisoned inputs (ground truth, for evaluation only).
    """
    if not 0.0 <= cpd <= 1.0:
        raise ValueError(f"the poisoned share must lie in [0, 1], got {cpd}")
    images = images.copy()
    eligible = np.flatnonzero(labels != target)
    n_poison = min(round(cpd * len(images)), len(eligible))
    poisoned = np.zeros(len(images), dtype=bool)
    poisoned[rng.choice(eligible, n_poison, replace=False)] = True
    images[poisoned] = trigger.apply(images[poisoned], rng)
    return images, poisoned


@dataclass(frozen=True)
class EvalSpec:
    """Evaluation only: the attacker's trigger and target, measured beside a stage (test CA/ASR); nothing the stage
    chooses reads them."""

    trigger: str | None = flag(
        None, "evaluation only: also measure test CA/ASR for this trigger", name="--eval-trigger"
    )
    target: int | None = flag(None, "evaluation only: target class of --eval-trigger", name="--target", type=int)

    def parsed(self) -> Trigger | None:
        """The trigger (None when not given); ValueError when only one of the two is given."""
        if (self.trigger is None) != (self.target is None):
            raise ValueError("--eval-trigger and --target go together")
        return parse_trigger(self.trigger) if self.trigger else None
