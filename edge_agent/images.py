"""Image files as the model's raw pixels: uint8 (N, C, H, W), resized and converted to the bundle's shape."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


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


def load_images(paths: Sequence[Path], shape: tuple[int, ...]) -> np.ndarray:
    """Read image files as raw uint8 (N, C, H, W) of the bundle's shape (resized and converted as needed)."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    out = []
    for p in paths:
        try:
            with Image.open(p) as src:
                img = _to_8bit(src)
                arr = np.asarray(img.convert("L" if c == 1 else "RGB").resize((w, h)), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ValueError(f"cannot read image {p}: {e}") from None
        out.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return np.stack(out)
