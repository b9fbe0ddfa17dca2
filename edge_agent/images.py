"""Image files as the model's images: uint8 (N, C, H, W), through the bundle's preprocessing block."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.formats.preprocess import Preprocess


def _to_8bit(img: Any) -> Any:
    """16- and 32-bit grayscale images scaled to 8 bits (PIL's own conversion clips them at 255)."""
    from PIL import Image

    if img.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) <= 65535) else arr.max()
    if img.mode == "F" and arr.max(initial=0) <= 1.0:
        top = 1.0
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / max(float(top), 1e-12))), 0, 255).astype(np.uint8), "L")


def read_picture(path: Path) -> np.ndarray:
    """One image file (any size; gray, colour, 8/16/32-bit) as a picture: uint8 (C, H, W), C 1 (gray) or 3 (RGB).
    Raises ``ValueError`` naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as src:
            img = _to_8bit(src)
            arr = np.asarray(img if img.mode == "L" else img.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def load_images(paths: Sequence[Path], image_shape: tuple[int, int, int], preprocess: Preprocess) -> np.ndarray:
    """Read image files (any size; gray, colour, 8/16/32-bit) as the model's images: uint8 (N, C, H, W) of
    ``image_shape``, through ``preprocess``'s colour conversion and resize."""
    fitted = preprocess.fitted(image_shape)
    return np.stack([fitted.image(read_picture(p)[None])[0] for p in paths])
