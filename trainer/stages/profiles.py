"""Sizes of the repair's CycleGAN and fine-tuning runs by profile (plain data: the CLI and the job runner read
it without loading torch). A profile is a ``[repair]`` table of the repair spec: its ``epochs`` and its ``gan``
knobs, named as the spec's fields (``--epochs``, ``--gan-width`` ...); a flag or spec value given wins."""

from __future__ import annotations

from typing import Any

# quick: the ≤ 10-minute job on a 2-core CPU; paper: 200 CycleGAN epochs as in the paper, no early stop.
# Measured in BENCHMARKS.md.
REPAIR_PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "epochs": 5,
        "gan": {"width": 16, "blocks": 6, "epochs": 40, "epochs_decay": 10, "batch_size": 16, "patience": 15},
    },
    "standard": {
        "epochs": 5,
        "gan": {"width": 16, "blocks": 6, "epochs": 60, "epochs_decay": 20, "batch_size": 16, "patience": 20},
    },
    "paper": {
        "epochs": 5,
        "gan": {"width": 64, "blocks": 6, "epochs": 100, "epochs_decay": 100, "batch_size": 1, "patience": 0},
    },
}
DEFAULT_PROFILE = "standard"
