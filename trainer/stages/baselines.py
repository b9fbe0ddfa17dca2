"""Input-level backdoor detectors from the field, for side-by-side measurement with the two-model reject rule
(evaluation harness only: never shipped to the edge). Each scores the model's uint8 images with the suspect model
alone; a higher score means "more likely triggered", like the reject scores.

- **STRIP** (Gao et al., ACSAC 2019): superimpose N clean images on the input and average the prediction entropy;
  a trigger dominates every blend, so triggered inputs keep a low entropy. Superimposition as the authors' code
  (``cv2.addWeighted(x, 1, clean, 1, 0)``: a saturating add); N = 32 here (the paper uses 100: the cost grows
  linearly with N; report it). Score: minus the mean entropy.
- **SCALE-UP** (Guo et al., ICLR 2023, the data-free variant): amplify the pixel values by n ∈ {3, 5, 7, 9, 11}
  (clipped) and count how often the label stays the original's (scaled prediction consistency); triggered inputs
  keep their label. Score: the consistency.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

Logits = Callable[[np.ndarray], np.ndarray]  # uint8 images (N, C, H, W) -> logits (N, K)

STRIP_N = 32
SCALE_UP_FACTORS = (3, 5, 7, 9, 11)


def _entropy(logits: np.ndarray) -> np.ndarray:
    x = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    return -(p * np.log2(np.clip(p, 1e-12, None))).sum(axis=1)


def strip_scores(logits: Logits, images: np.ndarray, clean_pool: np.ndarray, n: int = STRIP_N,
                 seed: int = 0) -> np.ndarray:  # fmt: skip
    """STRIP: minus the mean entropy over ``n`` superimpositions with images drawn from ``clean_pool``."""
    rng = np.random.default_rng(seed)
    total = np.zeros(len(images))
    for _ in range(n):
        overlay = clean_pool[rng.integers(0, len(clean_pool), len(images))]
        blended = np.clip(images.astype(np.int16) + overlay.astype(np.int16), 0, 255).astype(np.uint8)
        total += _entropy(logits(blended))
    return -(total / n)


def scale_up_scores(logits: Logits, images: np.ndarray, factors: tuple[int, ...] = SCALE_UP_FACTORS) -> np.ndarray:
    """SCALE-UP: the share of amplified copies that keep the original label."""
    label = logits(images).argmax(1)
    same = np.zeros(len(images))
    for f in factors:
        scaled = np.clip(images.astype(np.int32) * f, 0, 255).astype(np.uint8)
        same += logits(scaled).argmax(1) == label
    return same / len(factors)


def timed(fn: Callable[[], np.ndarray], inputs: int) -> tuple[np.ndarray, float]:
    """Run ``fn`` once; its scores and microseconds per input."""
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) / max(inputs, 1) * 1e6
