"""The publishing step both stages end with: checkpoints exported to ONNX, the bundle written, the report saved.

``predeploy`` publishes bundle v1 (θ_bd as primary, θ_aug as monitor); ``repair`` publishes v+1 (θ_repair as
primary, beside a refreshed, the deployed or no monitor: ``--next-monitor``). Each version folder holds the bundle,
both torch checkpoints (the next repair fine-tunes them) and ``report.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict

from edge_agent.formats.bundle import verify_bundle, write_bundle
from edge_agent.formats.reject import RejectRule
from edge_agent.formats.spec import image_shape_of, preprocess_of
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


def inherited_reject(manifest: bundle_pb2.Manifest, **given: Any) -> RejectConfig:
    """The deployed version's score, budget and confidence, with ``given`` (RejectConfig fields) in their place
    (the paper's rule stays the paper's rule; what an older manifest does not record takes today's default). The
    calibration set is today's default unless given: the manifest records the set the guard used for the old pair
    (D_eval alone where D_treat's scores sat lower), which says nothing about the new pair."""
    rule, default = RejectRule.of(manifest), RejectConfig()
    inherited = RejectConfig(
        rule.score,
        default.clean_reject_budget if rule.budget is None else rule.budget,
        default.calibration_confidence if rule.confidence is None else rule.confidence,
    )
    return replace(inherited, **given)


def metrics_of(msg: bundle_pb2.Metrics) -> dict[str, float | None]:
    """A manifest artifact's metrics as the plain dict :func:`publish_bundle` takes."""
    known = ("eval_clean_accuracy", "test_clean_accuracy", "attack_success_rate")
    return {**{k: getattr(msg, k) for k in known if msg.HasField(k)}, **dict(msg.extra)}


def recalibrate(
    bundle_dir: Path, splits: Splits, cfg: RejectConfig, out_dir: Path, version: int | None = None
) -> dict[str, Any]:
    """A bundle with the same two models under a new reject rule: τ chosen again, label-free, on clean D_eval and
    D_treat (the model's images made from ``splits``' pictures by the bundle's preprocessing). The new version
    (default: the given one + 1) names the given one as its parent; the checkpoints beside the given bundle are
    copied beside the new one so that a repair can start from it."""
    bundle = verify_bundle(bundle_dir)
    old, old_rule = bundle.manifest, RejectRule.of(bundle.manifest)
    fitted = preprocess_of(old.input_spec).fitted(image_shape_of(old.input_spec))
    clean = {name: fitted.image(images) for name, images in clean_images(splits).items()}
    manifest = bundle_pb2.Manifest()
    manifest.CopyFrom(old)
    manifest.ClearField("created_at")
    manifest.ClearField("signature")
    manifest.ClearField("reject_rule")
    manifest.version = old.version + 1 if version is None else version
    manifest.parent_version, manifest.created_by = old.version, "nnoc-trainer calibrate"
    manifest.provenance["recalibrated_from"] = f"v{old.version} ({old_rule.score} > {old_rule.threshold:.6g})"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("primary.pt", "monitor.pt"):
        if (bundle_dir.parent / name).is_file() and bundle_dir.parent.resolve() != out_dir.resolve():
            shutil.copyfile(bundle_dir.parent / name, out_dir / name)
    models = {a.role: bundle.model_path(a.role) for a in old.artifacts if a.role in ("primary", "monitor")}
    metrics = {a.role: metrics_of(a.metrics) for a in old.artifacts if a.role in models}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # the new bundle may replace the given one
        copies = {role: Path(shutil.copy(path, Path(tmp) / path.name)) for role, path in models.items()}
        written = publish_bundle(out_dir, copies, manifest, metrics, calibration=(clean, cfg))
    report: dict[str, Any] = {
        "bundle": str(out_dir / "bundle"),
        "bundle_version": int(written.version),
        "parent_version": int(old.version),
        "previous_rule": MessageToDict(old.reject_rule, preserving_proto_field_name=True),
        "reject_rule": MessageToDict(written.reject_rule, preserving_proto_field_name=True),
    }
    write_report(out_dir, report)
    return report
