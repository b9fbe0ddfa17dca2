"""What the CycleGAN costs per image size: training pairs per second of the repair's trigger learner (quick
profile's sizes: width 16, 6 residual blocks, batch 16) on the model's image, gray 28x28 up to RGB 128x128.
Random images: the cost does not depend on what they show.

    python -m bench.bench_cyclegan_sizes
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.common import save
from trainer.science.cyclegan import CycleGANConfig, discriminator_layers, train_cyclegan

SIZES = [(1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 128, 128)]


def main() -> None:
    rows = []
    for shape in SIZES:
        n = 160 if shape[1] <= 64 else 64
        rng = np.random.default_rng(0)
        clean = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        quarantine = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        cfg = CycleGANConfig(epochs=1, epochs_decay=0, patience=0, min_epochs=0)
        t = time.perf_counter()
        train_cyclegan(clean, quarantine, cfg, quiet=True)
        seconds = time.perf_counter() - t
        rows.append(
            {
                "shape": list(shape),
                "pairs_per_second": round(n / seconds, 1),
                "discriminator_layers": discriminator_layers(shape[1], shape[2]),
                # the quick profile without early stop: 50 epochs of max(500 clean, quarantine) pairs
                "quick_profile_minutes": round(50 * 500 / (n / seconds) / 60, 1),
            }
        )
        print(rows[-1], flush=True)
    save("cyclegan-sizes", {"rows": rows, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
