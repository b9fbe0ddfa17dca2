"""The publishing step both stages end with: checkpoints exported to ONNX, the bundle written, the report saved.

``predeploy`` publishes bundle v1 (θ_bd as primary, θ_aug as monitor); ``repair`` publishes v+1 (θ_repair as
primary, the deployed monitor kept). Each version folder holds the bundle, both torch checkpoints (the next
repair fine-tunes them) and ``report.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.formats.bundle import write_bundle
from edge_agent.formats.spec import preprocess_of
from protos.nnoc.v1 import bundle_pb2
from trainer.science.data import Splits
from trainer.science.export import export_checkpoint
from trainer.science.models import Checkpoint
from trainer.science.training import TrainConfig
from trainer.stages.detect import RejectConfig, calibrate


def train_config_of(ckpt: Checkpoint) -> TrainConfig:
    """The training settings a checkpoint was made with (unknown keys from older checkpoints ignored)."""
    return TrainConfig(**{k: v for k, v in ckpt.train.items() if k in TrainConfig.__dataclass_fields__})


def write_report(out_dir: Path, report: Mapping[str, Any]) -> None:
    """``out_dir/report.json``."""
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def clean_images(splits: Splits) -> dict[str, np.ndarray]:
    """The defender's clean inputs a reject threshold is chosen on (the model's images): D_eval and D_treat."""
    return {"eval": splits.eval.images, "treat": splits.treat.images}


def publish_bundle(
    out_dir: Path,
    models: Mapping[str, Checkpoint | Path],
    manifest: bundle_pb2.Manifest,
    metrics: Mapping[str, Mapping[str, float | None]],
    calibration: tuple[dict[str, np.ndarray], RejectConfig] | None = None,
) -> bundle_pb2.Manifest:
    """Write ``out_dir/bundle`` for ``manifest`` from role -> checkpoint (exported here) or ONNX file (copied).

    ``calibration``: clean D_eval and D_treat (name -> the model's images) and the rule to make; τ is chosen on
    the exported files
    (what the edge runs) and the rule goes into the manifest (signed with it).
    """
    onnx: dict[str, Path] = {}
    exported = []
    for role, model in models.items():
        if isinstance(model, Checkpoint):
            onnx[role] = out_dir / f"{role}.onnx"
            export_checkpoint(model, onnx[role], version=str(manifest.version))
            exported.append(onnx[role])
        else:
            onnx[role] = model
    if calibration is not None:
        images, cfg = calibration
        rule = calibrate(onnx["primary"], onnx["monitor"], images, preprocess_of(manifest.input_spec), cfg)
        manifest.reject_rule.CopyFrom(rule.message())
    try:
        return write_bundle(out_dir / "bundle", onnx, manifest, metrics)
    finally:
        for path in exported:
            path.unlink(missing_ok=True)
