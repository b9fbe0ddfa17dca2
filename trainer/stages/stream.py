"""Stream simulation: the offline twin of the edge loop (paper Algorithm 2, lines 1-12).

N stream inputs, a CPD fraction of them poisoned, go through the bundle's two ONNX models in onnxruntime.
Agreement answers the label; disagreement rejects and quarantines the input in the same store the trainer's
collector writes. Which inputs were poisoned is known only because we made the stream: it goes to
``truth.json`` for evaluation and is never read by the repair.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.formats.bundle import verify_bundle
from edge_agent.formats.reject import RejectRule
from edge_agent.formats.spec import preprocess_of
from edge_agent.formats.wire import build_header
from edge_agent.options import flag, fraction, positive, safe_name
from trainer.science.classifiers import OnnxClassifier
from trainer.science.data import Splits
from trainer.science.triggers import Trigger, poison_fraction
from trainer.service.quarantine import QuarantineStore
from trainer.stages.detect import auroc

log = logging.getLogger(__name__)

TRUTH_NAME = "truth.json"


@dataclass(frozen=True)
class StreamConfig:
    """One simulated deployment stream."""

    n: int = flag(1000, "stream inputs (paper: N = 1000)", type=positive)
    # clean/poison input data ratio: the poisoned share of the stream
    cpd: float = flag(0.1, "poisoned share of the stream", type=fraction)
    target: int = flag(0, "attacker's target class (its inputs are not poisoned)", type=int)
    seed: int = flag(0, "seed of the stream", type=int)
    device_id: str = flag("sim-0", "device id written into the quarantine", type=safe_name)


def _safe_div(a: float, b: float) -> float | None:
    return a / b if b else None


def run_stream(bundle_dir: Path, splits: Splits, trigger: Trigger, cfg: StreamConfig, out_dir: Path) -> dict[str, Any]:
    """Play the stream, write ``out_dir/quarantine.sqlite``, ``report.json`` and ``truth.json``."""
    if not 0.0 <= cfg.cpd <= 1.0:
        raise ValueError(f"--cpd must lie in [0, 1], got {cfg.cpd}")
    if cfg.n > len(splits.stream):
        raise ValueError(f"--n {cfg.n} exceeds the stream split's {len(splits.stream)} inputs; raise --stream-size")
    bundle = verify_bundle(bundle_dir)
    manifest = bundle.manifest
    preprocess = preprocess_of(manifest.input_spec)
    image_shape = preprocess.image_shape(splits.image_shape)
    primary = OnnxClassifier(bundle.model_path("primary"), expected_shape=image_shape, preprocess=preprocess)
    monitor = OnnxClassifier(bundle.model_path("monitor"), expected_shape=image_shape, preprocess=preprocess)
    rng = np.random.default_rng(cfg.seed)
    idx = rng.choice(len(splits.stream), cfg.n, replace=False)
    labels = splits.stream.labels[idx]
    # The attacker triggers what the camera sees; the models see it through the preprocessing.
    pictures, poisoned = poison_fraction(splits.stream.images[idx], labels, trigger, cfg.cpd, cfg.target, rng)
    images = preprocess.image(pictures)

    p_logits, m_logits = primary.logits(images), monitor.logits(images)
    p_pred, m_pred = p_logits.argmax(1), m_logits.argmax(1)
    rule = RejectRule.of(manifest)  # the bundle's rule, as the edge applies it
    scores, rejected, _ = rule.decide(p_logits, m_logits)
    out_dir.mkdir(parents=True, exist_ok=True)
    messages = []
    for i in np.flatnonzero(rejected):
        header = build_header(
            cfg.device_id, manifest.fleet, manifest.version, image_shape, "uint8", p_pred[i], m_pred[i], seq=int(i),
            reject_score=float(scores[i]),
        )  # fmt: skip
        messages.append((header, images[i].tobytes()))  # the model's image, as agents send it
    with QuarantineStore(out_dir) as store:
        store.describe(manifest.fleet, manifest.version, manifest.input_spec)
        stored = store.add_many(messages)
        total = store.count()

    answered = ~rejected
    clean = ~poisoned
    tp = int((rejected & poisoned).sum())
    report = {
        "bundle": str(bundle_dir),
        "bundle_version": int(manifest.version),
        "trigger": trigger.spec,
        "config": asdict(cfg),
        "quarantine": str(out_dir),
        "n": cfg.n,
        "poisoned": int(poisoned.sum()),
        "rejected": int(rejected.sum()),
        "reject_rate": float(rejected.mean()),
        "stored": stored,
        "quarantine_size": total,
        "reject_rule": {"score": rule.score, "threshold": rule.threshold},
        # Evaluation only (we made the stream): how good the detector was.
        "auroc": auroc(scores[~poisoned], scores[poisoned]) if poisoned.any() and (~poisoned).any() else None,
        "precision": _safe_div(tp, int(rejected.sum())),
        "recall": _safe_div(tp, int(poisoned.sum())),
        "clean_reject_rate": _safe_div(int((rejected & clean).sum()), int(clean.sum())),
        "answered_clean_accuracy": _safe_div(
            int(((p_pred == labels) & answered & clean).sum()), int((answered & clean).sum())
        ),
        "attack_success_through_ensemble": _safe_div(
            int((answered & poisoned & (p_pred == cfg.target)).sum()), int(poisoned.sum())
        ),
    }
    truth = {
        "evaluation_only": True,
        "device_id": cfg.device_id,
        "poisoned_seq": [int(i) for i in np.flatnonzero(poisoned)],
        "true_labels": {str(int(i)): int(labels[i]) for i in np.flatnonzero(rejected)},
    }
    (out_dir / TRUTH_NAME).write_text(json.dumps(truth) + "\n")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info(
        "stream: %d inputs, %d poisoned, %d rejected (precision %s, recall %s)",
        cfg.n,
        report["poisoned"],
        report["rejected"],
        report["precision"],
        report["recall"],
    )
    return report
