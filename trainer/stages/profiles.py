"""Sizes of the repair's CycleGAN and fine-tuning runs by profile (plain data: the CLI and the job runner read
it without loading torch)."""

from __future__ import annotations

# quick: the ≤ 10-minute job on a 2-core CPU; paper: 200 CycleGAN epochs as in the paper, no early stop.
# Measured in BENCHMARKS.md.
REPAIR_PROFILES: dict[str, dict[str, int]] = {
    "quick": {
        "gan_width": 16,
        "gan_blocks": 6,
        "gan_epochs": 40,
        "gan_epochs_decay": 10,
        "gan_batch_size": 16,
        "gan_patience": 15,
        "epochs": 5,
    },
    "standard": {
        "gan_width": 16,
        "gan_blocks": 6,
        "gan_epochs": 60,
        "gan_epochs_decay": 20,
        "gan_batch_size": 16,
        "gan_patience": 20,
        "epochs": 5,
    },
    "paper": {
        "gan_width": 64,
        "gan_blocks": 6,
        "gan_epochs": 100,
        "gan_epochs_decay": 100,
        "gan_batch_size": 1,
        "gan_patience": 0,
        "epochs": 5,
    },
}
