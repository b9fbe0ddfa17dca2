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


def load_images(paths: Sequence[Path], image_shape: tuple[int, int, int], preprocess: Preprocess) -> np.ndarray:
    """Read image files (any size; gray, colour, 8/16/32-bit) as the model's images: uint8 (N, C, H, W) of
    ``image_shape``, through ``preprocess``'s colour conversion and resize."""
    from PIL import Image, UnidentifiedImageError

    fitted = preprocess.fitted(image_shape)
    out = []
    for p in paths:
        try:
            with Image.open(p) as src:
                img = _to_8bit(src)
                arr = np.asarray(img if img.mode == "L" else img.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ValueError(f"cannot read image {p}: {e}") from None
        picture = arr[None, None] if arr.ndim == 2 else arr.transpose(2, 0, 1)[None]
        out.append(fitted.image(np.ascontiguousarray(picture))[0])
    return np.stack(out)
