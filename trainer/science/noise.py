"""Noise augmentation A(D, η, γ) of the pre-deployment treatment (paper §4.2, Algorithm 1 lines 2-7).

A γ fraction of the pixels of each image is replaced by draws from η, a Gaussian with mean 128 and
standard deviation 51.2 (the paper says "variance"; its code used imgaug's ``Normal(128, 0.4*128)``, whose
second argument is a standard deviation). Two mask modes:

- ``pixel``: every pixel is replaced independently with probability γ;
- ``block``: the mask is drawn on a coarse ``grid`` x ``grid`` plane and upscaled (nearest) to the image,
  as the authors' code did with imgaug's ``FromLowerResolution(size_px=4)``: on 28x28 inputs that is
  a 4x4 plane of 7x7 blocks.

The mask is shared across channels (imgaug's ``per_channel=False``); replacement values are drawn per element.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.options import flag, positive
from trainer.science.data import ImageSet

MASK_MODES = ("pixel", "block")
# Algorithm 1's Γ (paper §4.2)
PAPER_GAMMAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


@dataclass(frozen=True)
class NoiseConfig:
    """η and the mask mode of A(D, η, γ)."""

    mode: str = flag("block", "replacement mask", name="--noise-mode", choices=MASK_MODES)
    # block mode: side of the coarse sampling plane, in cells
    grid: int = flag(4, "block mode: coarse plane side", name="--noise-grid", type=positive)
    mean: float = flag(128.0, "mean of the replacement noise (0-255 pixels)", name="--noise-mean", type=float)
    std: float = flag(51.2, "standard deviation of the replacement noise", name="--noise-std", type=float)

    def __post_init__(self) -> None:
        if self.mode not in MASK_MODES:
            raise ValueError(f"unknown noise mask mode {self.mode!r}; choose one of: {', '.join(MASK_MODES)}")
        if self.grid < 1 or self.std < 0:
            raise ValueError(f"noise grid must be >= 1 and std >= 0 (got grid {self.grid}, std {self.std})")


def noise_mask(shape: tuple[int, int, int], gamma: float, cfg: NoiseConfig, rng: np.random.Generator) -> np.ndarray:
    """A boolean replacement mask of shape (N, 1, H, W): True where a pixel is replaced."""
    n, h, w = shape
    if cfg.mode == "pixel":
        return rng.random((n, 1, h, w)) < gamma
    gh, gw = min(cfg.grid, h), min(cfg.grid, w)
    coarse = rng.random((n, 1, gh, gw)) < gamma
    rows = (np.arange(h) * gh) // h  # nearest-neighbour upscaling of the coarse plane
    cols = (np.arange(w) * gw) // w
    return coarse[:, :, rows[:, None], cols[None, :]]


def replace_with_noise(
    x: np.ndarray, gamma: float, rng: np.random.Generator, cfg: NoiseConfig | None = None
) -> np.ndarray:
    """Return a copy of uint8 ``x`` (N, C, H, W) with a γ fraction of pixels replaced by η draws."""
    cfg = cfg or NoiseConfig()
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"noise fraction gamma must lie in [0, 1], got {gamma}")
    n, _, h, w = x.shape
    mask = np.broadcast_to(noise_mask((n, h, w), gamma, cfg, rng), x.shape)
    noise = np.clip(np.rint(rng.normal(cfg.mean, cfg.std, size=x.shape)), 0, 255).astype(np.uint8)
    return np.where(mask, noise, x)


def augment(treat: ImageSet, gamma: float, rng: np.random.Generator, cfg: NoiseConfig | None = None) -> ImageSet:
    """D_treat^aug-γ = D_treat^cl ∪ A(D_treat^cl, η, γ), the noised copies keeping their labels."""
    noised = ImageSet(replace_with_noise(treat.images, gamma, rng, cfg), treat.labels)
    return ImageSet.concat(treat, noised)


def noised_copies(
    x: np.ndarray, gammas: tuple[float, ...], rng: np.random.Generator, cfg: NoiseConfig | None = None
) -> np.ndarray:
    """A copy of uint8 ``x`` (N, C, H, W) in which each image is noised at a γ drawn from ``gammas``."""
    if not gammas:
        raise ValueError("noised copies need at least one noise fraction")
    which = rng.integers(len(gammas), size=len(x))
    out = x.copy()
    for i, gamma in enumerate(gammas):
        rows = np.flatnonzero(which == i)
        if len(rows):
            out[rows] = replace_with_noise(x[rows], gamma, rng, cfg)
    return out
