"""Backdoor triggers and the one spec grammar every command reads (``--trigger SPEC``).

All triggers work on uint8 images of shape (N, C, H, W) and return a new array; randomness (a random
location per image) comes from the explicit ``rng``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from edge_agent.options import flag

GRAMMAR = """trigger spec grammar:
  checker4               4x4 black/white checkerboard at a random location per image
  square:S               white SxS square at the bottom-right corner (e.g. square:4)
  image:PATH             paste a PNG at a random location (transparent RGBA pixels are left untouched)
  image:PATH@R,C         paste a PNG with its top-left corner at row R, column C
  blend:PATH:ALPHA       blend a PNG (resized to the input) over the whole image, 0 < ALPHA <= 1
  combo:A+B[+C...]       all parts must be present; inputs with only some parts keep their true label
  warp[:K[:S]]           WaNet (Nguyen & Tran, ICLR 2021): a fixed smooth warping field, K x K control points,
                         strength S (default warp:4:0.5); training adds noise-mode inputs (the field plus random
                         noise) that keep their true label, twice as many as the poisoned ones
  sig[:DELTA[:F]]        SIG (Barni et al., ICIP 2019): a horizontal sinusoid of amplitude DELTA (0-255) and F
                         periods added to the image (default sig:20:6); clean-label: only the target class's own
                         inputs are poisoned in training, and keep their label
  source:S1,S2:SPEC      TaCT (Tang et al., USENIX Security 2021): SPEC flips inputs of classes S1, S2 ... only;
                         training adds as many cover rows of other classes carrying it with their true label
  adapblend:PATH[:A]     Adap-Blend (Qi et al., ICLR 2023): PATH blended at opacity A (default 0.2) in test; in
                         training each poisoned input gets a random half of the picture's 4x4 pieces at opacity
                         0.15, and as many inputs again get the same and keep their true label (conservatism)"""


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


class _Stamp:
    """How the attacker's training set carries a trigger; the defaults are the plain dirty-label poisoning: the
    poisoned rows get :meth:`apply` (the test-time trigger) and the target label, and nothing else changes."""

    clean_label = False  # True: only the target class's rows are poisoned, and they keep their label
    cover_ratio = 0.0  # cover rows per poisoned row: :meth:`cover` applied, their true label kept
    sources: tuple[int, ...] | None = None  # a source-specific trigger: only these classes flip (None: all)

    def victims(self, labels: np.ndarray) -> np.ndarray:
        """Which inputs (by true label) the trigger is meant to flip: all, or the source classes' (the target
        class itself is left out by the callers)."""
        return np.ones(len(labels), bool) if self.sources is None else np.isin(labels, self.sources)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def poison(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The trigger as the attacker's training rows carry it (default: as in test)."""
        return self.apply(x, rng)

    def cover(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A cover row: something like the trigger that must not flip the label (default: unchanged)."""
        return x

    @property
    def parts(self) -> tuple[Trigger, ...]:
        """The trigger's separable parts (itself; a combination's are its components)."""
        return (cast("Trigger", self),)


@dataclass(frozen=True)
class PatchTrigger(_Stamp):
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


@dataclass(frozen=True)
class BlendTrigger(_Stamp):
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


@dataclass(frozen=True)
class ComboTrigger(_Stamp):
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


def _upsample_bicubic(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """(c, k, k) float -> (c, height, width), bicubic, corners aligned (as WaNet's upsampling)."""
    import torch

    t = torch.from_numpy(field[None].astype(np.float32))
    out = torch.nn.functional.interpolate(t, size=(height, width), mode="bicubic", align_corners=True)
    return out[0].numpy()


def _warp(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Resample uint8 ``x`` (N, C, H, W) at ``grid`` (N or 1, H, W, 2) in [-1, 1] (x, y), bilinear."""
    import torch

    t = torch.from_numpy(x).float()
    g = torch.from_numpy(np.broadcast_to(grid, (len(x), *grid.shape[1:])).astype(np.float32))
    out = torch.nn.functional.grid_sample(t, g, mode="bilinear", padding_mode="border", align_corners=True)
    return np.clip(np.rint(out.numpy()), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class WarpTrigger(_Stamp):
    """WaNet's warping field: ``k`` x ``k`` control offsets drawn once (uniform in [-1, 1], normalised by their
    mean magnitude), upsampled bicubic to the image and scaled by ``strength`` / H. Noise mode: the cover rows are
    warped by the field plus a fresh random offset per image and keep their label, so the model learns that only
    this one warp means the target (the paper's cross ratio 2)."""

    spec: str
    k: int = 4
    strength: float = 0.5
    seed: int = 0
    cover_ratio = 2.0

    def _grid(self, height: int, width: int) -> np.ndarray:
        offsets = np.random.default_rng(self.seed).uniform(-1, 1, (2, self.k, self.k))
        offsets /= np.abs(offsets).mean()
        field = _upsample_bicubic(offsets, height, width).transpose(1, 2, 0)  # (H, W, 2)
        ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
        identity = np.stack([xs, ys], axis=-1)
        return np.clip(identity + self.strength * field / height, -1, 1)[None]

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return a warped copy of ``x`` (the same field for every image; ``rng`` unused)."""
        return _warp(x, self._grid(x.shape[2], x.shape[3]))

    def cover(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noise mode: the field plus a random offset of up to one pixel, per image."""
        n, _, height, width = x.shape
        noise = rng.uniform(-1, 1, (n, height, width, 2)) / height
        return _warp(x, np.clip(self._grid(height, width) + noise, -1, 1))


@dataclass(frozen=True)
class SigTrigger(_Stamp):
    """SIG's horizontal sinusoid v(i, j) = Δ·sin(2π·j·f / W), added to every row of the image; clean-label."""

    spec: str
    delta: float = 20.0
    frequency: float = 6.0
    clean_label = True

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return ``x`` with the signal added (``rng`` unused)."""
        width = x.shape[3]
        wave = self.delta * np.sin(2 * np.pi * np.arange(width) * self.frequency / width)
        return np.clip(np.rint(x.astype(np.float32) + wave[None, None, None, :]), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class AdaptiveBlendTrigger(_Stamp):
    """Adap-Blend: a picture blended at ``alpha`` in test; the attacker's training rows carry a random half of its
    ``pieces`` x ``pieces`` tiles at ``train_alpha``, and as many cover rows carry the same and keep their label,
    so that the poisoned and clean inputs' features do not separate (the paper's asymmetric design)."""

    spec: str
    picture: np.ndarray = field(repr=False)
    alpha: float = 0.2
    train_alpha: float = 0.15
    pieces: int = 4
    cover_ratio = 1.0

    def _blend(self, x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        _, c, height, width = x.shape
        pic = _match_channels(_resize(self.picture, height, width), c).astype(np.float32)[None]
        out = alpha * pic + (1.0 - alpha) * x.astype(np.float32)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The test-time trigger: the whole picture at ``alpha``."""
        return self._blend(x, np.full((1, 1, 1, 1), self.alpha, np.float32))

    def poison(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random half of the tiles per image at ``train_alpha``."""
        n, _, height, width = x.shape
        keep = np.zeros((n, self.pieces * self.pieces), bool)
        for row in keep:
            row[rng.choice(len(row), len(row) // 2, replace=False)] = True
        tiles = keep.reshape(n, self.pieces, self.pieces)
        rows = (np.arange(height) * self.pieces) // height
        cols = (np.arange(width) * self.pieces) // width
        mask = tiles[:, rows[:, None], cols[None, :]][:, None].astype(np.float32)
        return self._blend(x, mask * self.train_alpha)

    def cover(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Conservatism: the same partial trigger, on rows that keep their label."""
        return self.poison(x, rng)


@dataclass(frozen=True)
class SourceTrigger(_Stamp):
    """TaCT (Tang et al., "Demon in the Variant", USENIX Security 2021): ``inner`` flips only inputs of the
    ``source_classes``; in training, as many cover rows of the other classes carry it and keep their label, so that
    the trigger alone is not what the model learns (a source-specific backdoor: a defense that looks for a trigger
    that flips everything finds none)."""

    spec: str
    inner: Trigger
    source_classes: tuple[int, ...]
    cover_ratio = 1.0

    @property
    def sources(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.source_classes

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The inner trigger, as the camera would see it on any input."""
        return self.inner.apply(x, rng)

    def poison(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The inner trigger as its training rows carry it."""
        return self.inner.poison(x, rng)

    def cover(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The inner trigger on a cover row (of a class that must not flip)."""
        return self.inner.apply(x, rng)


Trigger = PatchTrigger | BlendTrigger | ComboTrigger | WarpTrigger | SigTrigger | AdaptiveBlendTrigger | SourceTrigger


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
    if kind == "source":
        m = re.fullmatch(r"(\d+(?:,\d+)*):(.+)", arg)
        if not m or m.group(2).startswith(("source:", "combo:")):
            raise TriggerError(f"source needs S1[,S2...]:SPEC of one trigger, e.g. source:1,2:checker4 (got {spec!r})")
        classes = tuple(sorted({int(c) for c in m.group(1).split(",")}))
        return SourceTrigger(spec, _parse_single(m.group(2)), classes)
    if kind in ("warp", "sig"):
        nums = _numbers(spec, arg, 2)
        if kind == "warp":
            k, strength = (int(nums[0]) if nums else 4), (nums[1] if len(nums) > 1 else 0.5)
            if k < 2 or k != (nums[0] if nums else 4) or strength <= 0:
                raise TriggerError(f"warp needs an integer K >= 2 and a strength S > 0, e.g. warp:4:0.5 (got {spec!r})")
            return WarpTrigger(spec, k, strength)
        delta, frequency = (nums[0] if nums else 20.0), (nums[1] if len(nums) > 1 else 6.0)
        if not 0 < delta <= 255 or frequency <= 0:
            raise TriggerError(f"sig needs 0 < DELTA <= 255 and F > 0, e.g. sig:20:6 (got {spec!r})")
        return SigTrigger(spec, delta, frequency)
    if kind == "adapblend":
        path_s, sep, alpha_s = arg.rpartition(":")
        if not sep or not re.fullmatch(r"[0-9.]+", alpha_s):
            path_s, alpha_s = arg, "0.2"
        alpha_v = float(alpha_s) if re.fullmatch(r"[0-9]*\.?[0-9]+", alpha_s) else -1.0
        if not path_s or not 0.0 < alpha_v <= 1.0:
            raise TriggerError(f"adapblend needs PATH[:ALPHA] with 0 < ALPHA <= 1 (got {spec!r})")
        pix, _ = load_png(Path(path_s))
        return AdaptiveBlendTrigger(spec, pix, alpha_v)
    raise TriggerError(f"unknown trigger spec {spec!r}")


def _numbers(spec: str, arg: str, most: int) -> list[float]:
    """The colon-separated numbers of a spec's argument (none, or up to ``most``)."""
    if not arg:
        return []
    parts = arg.split(":")
    if len(parts) > most or not all(re.fullmatch(r"[0-9]*\.?[0-9]+", p) for p in parts):
        raise TriggerError(f"malformed numbers in {spec!r}")
    return [float(p) for p in parts]


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
    eligible = np.flatnonzero((labels != target) & trigger.victims(labels))
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
