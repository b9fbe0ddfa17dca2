"""The preprocessing block: how a raw picture becomes the model's image and then its input tensor.

One numpy implementation serves both sides: the trainer turns its data into the model's *image* with it (where
triggers, noise, the CycleGAN and the quarantine work), the edge turns camera frames and images into model
inputs with it. Two stages, as ``DESIGN.md`` names them:

- :meth:`Preprocess.image`: raw uint8 pictures (N, C, H, W) of any size (or one video frame's YUV planes,
  :class:`Yuv420`) -> the model's image (N, C', H', W') uint8, after colour conversion and resize;
- :meth:`Preprocess.model_input`: the model's image -> float32 ``(x * scale - mean) / std`` in the model's layout.

Resizing is separable: each interpolation is a (destination, source) weight matrix per axis, so nearest,
bilinear (half-pixel centres, no antialiasing: OpenCV's ``INTER_LINEAR``), bicubic (Keys, a = -0.75: OpenCV's
``INTER_CUBIC``) and area (exact pixel-overlap averages: OpenCV's ``INTER_AREA`` when shrinking) are one
matrix product each, the same on every machine.

The block travels as JSON (schema below; every field optional) in the bundle manifest, in both ONNX files'
``metadata_props`` under :data:`META_KEY`, and in checkpoints::

    {"color": "rgb", "size": [32, 32], "resize": "stretch", "interpolation": "bilinear",
     "scale": 0.00392156862745098, "mean": [0.286, 0.286, 0.286], "std": [0.353, 0.353, 0.353], "layout": "NCHW"}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

META_KEY = "nnoc.preprocess"
GOLDEN_NAME = "golden.npz"  # the bundle's golden pair (see golden_pair)
COLORS = ("gray", "rgb", "bgr")
RESIZES = ("stretch", "letterbox", "center-crop")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")
LAYOUTS = ("NCHW", "NHWC")
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as PIL and OpenCV convert RGB to gray


class PreprocessError(ValueError):
    """A preprocessing block that cannot be used; the message names the field and what it may hold."""


@dataclass(frozen=True)
class Preprocess:
    """How raw pictures become model inputs. ``color``/``size`` None: the data's own (no conversion, no resize)."""

    color: str | None = None
    size: tuple[int, int] | None = None  # (H, W) of the model's image
    resize: str = "stretch"
    interpolation: str = "bilinear"
    scale: float = 1.0 / 255.0  # applied to uint8 pixels first
    mean: tuple[float, ...] = (0.0,)  # per channel, or one value for all
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        _check_choice("color", self.color, COLORS, optional=True)
        _check_choice("resize", self.resize, RESIZES)
        _check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        _check_choice("layout", self.layout, LAYOUTS)
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise PreprocessError(f"size: expected [H, W] with both at least 1, got {list(self.size)}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise PreprocessError(f"scale: expected a number above 0, got {self.scale}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
                raise PreprocessError(f"{name}: expected one number or one per channel (3), got {list(values)}")
        if min(self.std) <= 0:
            raise PreprocessError(f"std: every value must be above 0, got {list(self.std)}")

    # -- the two stages -----------------------------------------------------------------------------------------

    def fitted(self, image_shape: tuple[int, int, int]) -> Preprocess:
        """This block with colour and size made explicit for a model whose image is ``image_shape`` (C, H, W):
        what pictures of any size and colour (camera frames, image files) go through."""
        c, h, w = image_shape
        color = self.color or ("gray" if c == 1 else "rgb")
        return replace(self, color=color, size=self.size or (h, w))

    def channels(self, raw_channels: int) -> int:
        """Channels of the model's image for raw pictures with ``raw_channels``."""
        return raw_channels if self.color is None else (1 if self.color == "gray" else 3)

    def image_shape(self, raw_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of the model's image for raw pictures of shape ``raw_shape`` (C, H, W)."""
        h, w = self.size if self.size is not None else raw_shape[1:]
        return self.channels(raw_shape[0]), int(h), int(w)

    def image(self, raw: np.ndarray | Yuv420) -> np.ndarray:
        """Raw uint8 pictures (N, C, H, W), C 1 (gray) or 3 (RGB), or one video frame's planes (:class:`Yuv420`, a
        batch of one RGB picture) -> the model's image (N, C', H', W') uint8."""
        if isinstance(raw, Yuv420):
            if self.size is None or raw.y.shape == tuple(self.size):
                return np.ascontiguousarray(convert_color(raw.rgb(), self.color))
        elif raw.ndim != 4 or raw.shape[1] not in (1, 3) or raw.dtype != np.uint8:
            raise PreprocessError(
                f"raw pictures must be uint8 (N, C, H, W) with C 1 or 3, got {raw.dtype} {tuple(raw.shape)}"
            )
        elif self.size is None or tuple(raw.shape[2:]) == tuple(self.size):
            return np.ascontiguousarray(convert_color(raw, self.color))
        # The colour conversion is per pixel, so it runs on the pixels the resize reads only (the same numbers
        # as converting the whole picture first: a 1280x720 frame to 28x28 gray converts 56 rows and columns).
        return np.ascontiguousarray(
            resize(raw, self.size, self.resize, self.interpolation, lambda p: convert_color(p, self.color))
        )

    def model_input(self, image: np.ndarray) -> np.ndarray:
        """The model's image (N, C, H, W) uint8 -> float32 ``(x * scale - mean) / std`` in ``layout``."""
        c = image.shape[1]
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        if mean.shape[1] not in (1, c) or std.shape[1] not in (1, c):
            raise PreprocessError(f"mean/std have {mean.shape[1]}/{std.shape[1]} values for images with {c} channels")
        x = (image.astype(np.float32) * np.float32(self.scale) - mean) / std
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1) if self.layout == "NHWC" else x)

    def to_image(self, x: np.ndarray) -> np.ndarray:
        """Model inputs (what :meth:`model_input` made, in ``layout``) back to the model's uint8 images
        (N, C, H, W): the inverse of :meth:`model_input`, rounded to the nearest pixel value. uint8 passes."""
        if x.dtype == np.uint8:
            return x
        if x.ndim != 4:
            raise PreprocessError(f"model inputs must be (N, C, H, W) or (N, H, W, C), got {tuple(x.shape)}")
        v = x.astype(np.float64)
        if self.layout == "NHWC":
            v = v.transpose(0, 3, 1, 2)
        mean = np.asarray(self.mean, np.float64).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float64).reshape(1, -1, 1, 1)
        return np.ascontiguousarray(np.clip(np.rint((v * std + mean) / self.scale), 0, 255).astype(np.uint8))

    def input_range(self) -> tuple[float, float]:
        """The smallest and largest value :meth:`model_input` can give (over all channels)."""
        ends = [(v * self.scale - m) / s for v in (0.0, 255.0) for m in self.mean for s in self.std]
        return float(min(ends)), float(max(ends))

    def model_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The model input's per-example shape for an image of ``image_shape`` (C, H, W)."""
        c, h, w = image_shape
        return (h, w, c) if self.layout == "NHWC" else (c, h, w)

    # -- serialisation ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the module docstring (fields left to the data stay out)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        """Compact, key-sorted JSON: the same block always gives the same text (it is hashed and compared)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_dict(data: Any, where: str = "preprocess") -> Preprocess:
        """A block from its JSON object; a wrong key or value is a :class:`PreprocessError` naming the field."""
        if not isinstance(data, dict):
            raise PreprocessError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(Preprocess)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PreprocessError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            kwargs[key] = _field_value(key, value, where)
        try:
            return Preprocess(**kwargs)
        except PreprocessError as e:
            raise PreprocessError(f"{where}: {e}") from None

    @staticmethod
    def from_json(text: str, where: str = "preprocess") -> Preprocess:
        """A block from JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PreprocessError(f"{where}: not JSON ({e})") from None
        return Preprocess.from_dict(data, where)

    @staticmethod
    def load(path: Path) -> Preprocess:
        """A block from a ``.json`` file."""
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise PreprocessError(f"cannot read the preprocess file {path}: {e}") from None
        return Preprocess.from_json(text, str(path))


def _check_choice(name: str, value: str | None, choices: tuple[str, ...], optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in choices:
        raise PreprocessError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def _field_value(key: str, value: Any, where: str) -> Any:
    """A JSON value checked for the field's type (numbers, strings, lists of numbers)."""

    def number(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise PreprocessError(f"{where}: {key}: expected a number, got {v!r}")
        return float(v)

    if key in ("color", "resize", "interpolation", "layout"):
        if not isinstance(value, str):
            raise PreprocessError(f"{where}: {key}: expected a string, got {value!r}")
        return value
    if key == "scale":
        return number(value)
    if key == "size":
        if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) for v in value):
            raise PreprocessError(f"{where}: size: expected [H, W] (two whole numbers), got {value!r}")
        return (int(value[0]), int(value[1]))
    values = value if isinstance(value, list) else [value]
    return tuple(number(v) for v in values)


# -- video frames as YUV planes -------------------------------------------------------------------------------

# (Kr, Kb) of the colour matrices a video stream may be tagged with. An untagged stream is BT.601, as FFmpeg's
# swscale (and so OpenCV's capture) converts it.
YUV_MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}


@dataclass(frozen=True)
class Yuv420:
    """One decoded video frame as decoders hand it out (4:2:0): planes ``y`` (H, W) and ``u``, ``v`` (⌈H/2⌉, ⌈W/2⌉)
    uint8, views of the decoder's buffers; its colour ``matrix`` (:data:`YUV_MATRICES`) and ``full_range`` (JPEG
    range; else video range, Y 16-235). :meth:`Preprocess.image` converts to RGB only the pixels its resize reads
    (64 rows and columns of a 1280x720 frame for a 32x32 model), where a decoder's own RGB output converts all
    921,600. Each pixel takes the chroma sample that covers it (no chroma interpolation, as swscale's unscaled
    YUV -> RGB path)."""

    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
    matrix: str = "bt601"
    full_range: bool = False

    def __post_init__(self) -> None:
        if self.y.ndim != 2 or min(self.y.shape) < 1:
            raise PreprocessError(f"a YUV frame's Y plane must be (H, W), got {tuple(self.y.shape)}")
        half = ((self.y.shape[0] + 1) // 2, (self.y.shape[1] + 1) // 2)
        if self.u.shape != half or self.v.shape != half:
            raise PreprocessError(
                f"4:2:0 chroma planes of a {self.y.shape[1]}x{self.y.shape[0]} frame are {half[1]}x{half[0]}, "
                f"got {tuple(self.u.shape)} and {tuple(self.v.shape)}"
            )
        if not self.y.dtype == self.u.dtype == self.v.dtype == np.uint8:
            raise PreprocessError("YUV planes must be uint8")
        _check_choice("matrix", self.matrix, tuple(YUV_MATRICES))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """As a batch of one RGB picture: (1, 3, H, W)."""
        return (1, 3, int(self.y.shape[0]), int(self.y.shape[1]))

    def rgb(self, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> np.ndarray:
        """(1, 3, h, w) uint8 RGB of the pixels at ``rows`` x ``cols`` (every pixel when not given)."""
        rows = np.arange(self.y.shape[0]) if rows is None else rows
        cols = np.arange(self.y.shape[1]) if cols is None else cols
        luma = self.y.take(rows, 0).take(cols, 1).astype(np.float32)
        cb = self.u.take(rows // 2, 0).take(cols // 2, 1).astype(np.float32) - np.float32(128)
        cr = self.v.take(rows // 2, 0).take(cols // 2, 1).astype(np.float32) - np.float32(128)
        if not self.full_range:  # video range: Y 16-235, chroma 16-240
            luma = (luma - np.float32(16)) * np.float32(255 / 219)
            cb *= np.float32(255 / 224)
            cr *= np.float32(255 / 224)
        kr, kb = YUV_MATRICES[self.matrix]
        kg = 1.0 - kr - kb
        r = luma + np.float32(2 * (1 - kr)) * cr
        g = luma - np.float32(2 * kb * (1 - kb) / kg) * cb - np.float32(2 * kr * (1 - kr) / kg) * cr
        b = luma + np.float32(2 * (1 - kb)) * cb
        out = np.stack((r, g, b))[None]
        return np.clip(np.rint(out, out=out), 0, 255, out=out).astype(np.uint8)


# -- colour ---------------------------------------------------------------------------------------------------


def convert_color(raw: np.ndarray, color: str | None) -> np.ndarray:
    """(N, C, H, W) uint8 with C 1 (gray) or 3 (RGB) -> ``color`` (None: unchanged)."""
    c = raw.shape[1]
    if color is None or (color == "gray" and c == 1) or (color == "rgb" and c == 3):
        return raw
    if color == "gray":  # r*wr + g*wg + b*wb in float32, in that order (3x faster than a sum over the axis)
        f = raw.astype(np.float32)
        wr, wg, wb = (np.float32(v) for v in GRAY_WEIGHTS)
        y = f[:, 0:1] * wr
        y += f[:, 1:2] * wg
        y += f[:, 2:3] * wb
        return np.clip(np.rint(y, out=y), 0, 255, out=y).astype(np.uint8)
    rgb = np.repeat(raw, 3, axis=1) if c == 1 else raw
    return rgb[:, ::-1] if color == "bgr" else rgb


# -- resize ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _weights(dst: int, src: int, interpolation: str) -> np.ndarray:
    """(dst, src) float32 matrix: row i holds the source weights of destination pixel i."""
    w = np.zeros((dst, src), np.float64)
    ratio = src / dst
    rows = np.arange(dst)
    if interpolation == "nearest":
        w[rows, np.minimum(np.floor(rows * ratio).astype(int), src - 1)] = 1.0
    elif interpolation == "area" and ratio >= 1:
        for i in range(dst):  # exact overlap of [i * ratio, (i + 1) * ratio) with each source pixel
            lo, hi = i * ratio, (i + 1) * ratio
            for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), src)):
                w[i, j] = min(hi, j + 1) - max(lo, j)
        w /= w.sum(1, keepdims=True)
    elif interpolation == "bicubic":
        centre = (rows + 0.5) * ratio - 0.5
        base = np.floor(centre).astype(int)
        for k in range(-1, 3):
            j = base + k
            w[rows, np.clip(j, 0, src - 1)] += _cubic(centre - j)
    else:  # bilinear (and area when enlarging, as OpenCV does)
        centre = np.clip((rows + 0.5) * ratio - 0.5, 0, None)
        left = np.minimum(np.floor(centre).astype(int), src - 1)
        frac = centre - left
        right = np.minimum(left + 1, src - 1)
        np.add.at(w, (rows, left), 1.0 - frac)
        np.add.at(w, (rows, right), frac)
    return w.astype(np.float32)


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


PixelFn = Callable[[np.ndarray], np.ndarray]  # a per-pixel uint8 transform (N, C, h, w) -> (N, C', h, w)


def _resample(x: np.ndarray | Yuv420, h: int, w: int, interpolation: str, pixel: PixelFn | None = None) -> np.ndarray:
    """(N, C, H, W) uint8 (or a :class:`Yuv420` frame) -> (N, C', h, w) uint8 by separable weights, ``pixel``
    applied to the pixels read."""
    wh, rows = _plan(h, x.shape[2], interpolation)
    ww, cols = _plan(w, x.shape[3], interpolation)
    part = _gather(x, rows, cols)
    part = pixel(part) if pixel is not None else part
    col_taps, row_taps = _taps(w, x.shape[3], interpolation), _taps(h, x.shape[2], interpolation)
    if col_taps is None:  # the weighted gathers turn uint8 into float32 themselves, without a copy of the whole part
        part = part.astype(np.float32)
    out = _apply(_apply(part, ww, col_taps, 3), wh, row_taps, 2)
    return np.clip(np.rint(out, out=out), 0, 255, out=out).astype(np.uint8)


MAX_TAPS = 8  # sources per destination pixel up to which weighted gathers beat a matmul (bilinear 2, bicubic 4)


def _apply(part: np.ndarray, weights: np.ndarray, taps: tuple[np.ndarray, np.ndarray] | None, axis: int) -> np.ndarray:
    """Resample float32 ``part`` along ``axis`` (2: rows, 3: columns) by the (dst, used) ``weights``: as a sum of
    a few weighted gathers when ``taps`` has them (a 1280x720 frame to 224x224 bilinearly: 2 taps, 40x less
    arithmetic than the matmul over the 448 rows and columns read), else as a matmul (area when shrinking far)."""
    if taps is None:
        return weights @ part if axis == 2 else part @ weights.T
    index, tap_weights = taps
    shape = (-1, 1) if axis == 2 else (-1,)
    out = np.take(part, index[:, 0], axis=axis) * tap_weights[:, 0].reshape(shape)
    for k in range(1, index.shape[1]):
        out += np.take(part, index[:, k], axis=axis) * tap_weights[:, k].reshape(shape)
    return out


def _gather(x: np.ndarray | Yuv420, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``x[:, :, rows][..., cols]`` for (N, C, H, W) ``x``. A camera frame arrives as a view of an (H, W, 3) BGR
    buffer: there, two ``take`` calls on the buffer's own layout copy whole rows, then pixels (4x faster than one
    fancy index through the view); other layouts take the fancy index. YUV planes convert the pixels read."""
    if isinstance(x, Yuv420):
        return x.rgb(rows, cols)
    hwc = x.transpose(0, 2, 3, 1)
    flipped = hwc.shape[3] > 1 and hwc.strides[3] < 0
    if flipped:
        hwc = hwc[..., ::-1]
    if hwc.flags.c_contiguous:
        part = hwc.take(rows, axis=1).take(cols, axis=2)
        return (part[..., ::-1] if flipped else part).transpose(0, 3, 1, 2)
    return x[:, :, rows[:, None], cols]


@lru_cache(maxsize=64)
def _plan(dst: int, src: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """The weights restricted to the source pixels some destination pixel reads, and their indices: shrinking a
    1280x720 camera frame bilinearly to 32x32 reads 64 of its rows and columns, a fraction of the arithmetic."""
    w = _weights(dst, src, interpolation)
    used = np.flatnonzero((w != 0).any(0))
    return np.ascontiguousarray(w[:, used]), used


@lru_cache(maxsize=64)
def _taps(dst: int, src: int, interpolation: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per destination pixel, the positions (into the used sources of :func:`_plan`) and weights of its nonzero
    taps, as (dst, k) arrays padded with zero weights; None when some pixel has more than ``MAX_TAPS``."""
    w, _ = _plan(dst, src, interpolation)
    nonzero = w != 0
    k = int(nonzero.sum(1).max(initial=0))
    if k > MAX_TAPS or k == 0:
        return None
    index, weights = np.zeros((dst, k), np.intp), np.zeros((dst, k), np.float32)
    for i in range(dst):
        j = np.flatnonzero(nonzero[i])
        index[i, : len(j)], weights[i, : len(j)] = j, w[i, j]
    return index, weights


def resize(
    x: np.ndarray | Yuv420, size: tuple[int, int], mode: str, interpolation: str, pixel: PixelFn | None = None
) -> np.ndarray:
    """(N, C, H, W) uint8 -> (N, C, *size) uint8: ``stretch`` to the size, ``letterbox`` (fit inside, pad with
    black, centred) or ``center-crop`` (shorter side to the size, then the centre). ``pixel``: a per-pixel
    transform (a colour conversion) applied first, to the pixels the resize reads only."""
    h, w = x.shape[2:]
    th, tw = size
    if mode == "stretch":
        return _resample(x, th, tw, interpolation, pixel)
    fit = min(th / h, tw / w) if mode == "letterbox" else max(th / h, tw / w)
    sh, sw = max(1, round(h * fit)), max(1, round(w * fit))
    scaled = _resample(x, sh, sw, interpolation, pixel)
    if mode == "letterbox":
        out = np.zeros((*scaled.shape[:2], th, tw), np.uint8)
        top, left = (th - sh) // 2, (tw - sw) // 2
        out[:, :, top : top + sh, left : left + sw] = scaled
        return out
    top, left = (sh - th) // 2, (sw - tw) // 2
    return scaled[:, :, top : top + th, left : left + tw]


# -- the golden pair ------------------------------------------------------------------------------------------


def golden_picture(channels: int) -> np.ndarray:
    """A fixed raw picture (1, channels, 37, 53) uint8: gradients, a checkerboard and hard edges, an odd size so
    that every block resizes it (same on every machine, no randomness)."""
    i, j = np.meshgrid(np.arange(37), np.arange(53), indexing="ij")
    planes = [(i * 7 + j * 5 + 40 * c) % 256 for c in range(channels)]
    pic = np.stack(planes).astype(np.uint8)
    pic[:, 10:18, 20:28] = np.where((i[10:18, 20:28] + j[10:18, 20:28]) % 2 == 0, 255, 0)
    pic[:, 30:, :6] = 0
    return pic[None]


def golden_pair(preprocess: Preprocess, image_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(raw picture, the model input it must become): written into every bundle by the trainer, recomputed by the
    edge at load, so the two sides' preprocessing cannot drift apart unseen."""
    picture = golden_picture(image_shape[0])
    fitted = preprocess.fitted(image_shape)
    return picture, fitted.model_input(fitted.image(picture))


def check_golden(
    preprocess: Preprocess, image_shape: tuple[int, int, int], picture: np.ndarray, expected: np.ndarray
) -> None:
    """Recompute the golden pair here; a PreprocessError says how far this machine's preprocessing is from the
    one that wrote the bundle. One grey level on a few pixels is allowed (ties rounded by a different BLAS)."""
    fitted = preprocess.fitted(image_shape)
    try:
        got = fitted.model_input(fitted.image(picture))
    except (PreprocessError, ValueError) as e:
        raise PreprocessError(f"the golden picture does not preprocess: {e}") from None
    if got.shape != expected.shape:
        raise PreprocessError(f"the golden input has shape {got.shape} here, {expected.shape} in the bundle")
    step = preprocess.scale / min(preprocess.std)  # one grey level, in input units
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    off = float((diff > 1e-5 + 1e-6 * np.abs(expected)).mean())
    if float(diff.max()) > step * 1.001 + 1e-5 or off > 0.01:
        raise PreprocessError(
            f"this machine's preprocessing differs from the trainer's: max |Δ| {float(diff.max()):.3g} "
            f"({float(diff.max()) / step:.1f} grey levels) on {100 * off:.1f}% of the golden input; "
            "update nnoculation-edge on one side"
        )
