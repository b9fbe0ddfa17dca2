"""The monitor as a detector: choose the reject rule's threshold label-free, and measure the rule.

:func:`calibrate` runs when a bundle is published: both exported ONNX models (what the edge runs) score the
defender's clean inputs (D_treat and D_eval, or D_eval alone), and τ is the smallest threshold whose reject rate on
new clean inputs stays within ``--clean-reject-budget`` with probability ``--calibration-confidence`` (a binomial
bound, :func:`edge_agent.formats.reject.allowed_exceedances`). No trigger, no poisoned input and no ASR is read.

:func:`detect_eval` (``nnoc-trainer detect-eval``, evaluation only: it reads a trigger) scores the clean test
set and its triggered copy (the inputs the BadNet sends to the target) under every score: ROC curve, AUROC,
recall at fixed clean-reject rates, the bundle's own operating point and the paper's rule, and a ROC PNG.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.formats.bundle import verify_bundle
from edge_agent.formats.preprocess import Preprocess
from edge_agent.formats.reject import (
    COMBINED,
    DEFAULT_BUDGET,
    DEFAULT_CONFIDENCE,
    DEFAULT_SCORE,
    SCORES,
    RejectRule,
    fit_scales,
    reject_scores,
    rule_for,
    threshold_for,
)
from edge_agent.formats.spec import image_shape_of, preprocess_of
from edge_agent.options import flag, fraction
from trainer.science.classifiers import OnnxClassifier
from trainer.science.data import Splits
from trainer.science.triggers import Trigger

log = logging.getLogger(__name__)

BUDGETS = (0.005, 0.01, 0.02, 0.05)
CALIBRATION_SETS = ("valid", "eval", "higher")
REPAIRED_CALIBRATION = "higher"  # a repaired pair's default set (both of its models were fine-tuned on D_treat)


@dataclass(frozen=True)
class RejectConfig:
    """How a published bundle's reject rule is made."""

    reject_score: str = flag(DEFAULT_SCORE, "the edge's reject score (disagree: the paper's rule)", choices=SCORES)
    clean_reject_budget: float = flag(
        DEFAULT_BUDGET, "share of clean inputs the rule may reject: sets its threshold (label-free)", type=fraction
    )
    calibration_confidence: float = flag(
        DEFAULT_CONFIDENCE,
        "probability that the reject rate on new clean inputs stays within the budget (0: the plain quantile)",
        type=fraction,
    )
    # valid: D_treat and D_eval (5x the inputs of D_eval alone), unless D_treat's scores sit lower than D_eval's;
    # higher: the higher of that τ and D_eval's alone (a repair's default: both of its models saw D_treat)
    calibration_set: str = flag("valid", "clean inputs τ is chosen on", choices=CALIBRATION_SETS)


@dataclass(frozen=True)
class RuleSpec:
    """A new version's reject rule (``repair``, ``calibrate``): each part not given is the given bundle's."""

    reject_score: str | None = flag(None, "the new version's reject score (default: the deployed version's)",
                                    choices=SCORES)  # fmt: skip
    clean_reject_budget: float | None = flag(
        None, "share of clean inputs its rule may reject (default: the deployed version's)", type=fraction
    )
    calibration_confidence: float | None = flag(
        None, "probability that the new rule's clean reject rate stays within the budget (default: the deployed "
        "version's)", type=fraction,
    )  # fmt: skip
    calibration_set: str | None = flag(
        None, "clean inputs τ is chosen on: D_treat and D_eval (valid), D_eval alone (eval), or the set of the two "
        "that gives the higher τ (higher; a repair's default: both of its models were fine-tuned on D_treat)",
        choices=CALIBRATION_SETS,
    )  # fmt: skip

    def given(self) -> dict[str, Any]:
        """The parts given, as RejectConfig's fields."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


# One-sided z above which D_treat's scores count as lower than D_eval's (p < 0.01): the models were fine-tuned on
# D_treat and may agree more there than on new inputs, which would set τ too low.
SHIFT_Z = 2.33


def _lower_share(treat: np.ndarray, ev: np.ndarray, tau: float) -> float:
    """z of (D_eval's share above τ − D_treat's), pooled two-proportion test; 0 when both shares are 0 or 1."""
    r_e, r_t = float((ev > tau).mean()), float((treat > tau).mean())
    r = (r_e * len(ev) + r_t * len(treat)) / (len(ev) + len(treat))
    se = float(np.sqrt(r * (1 - r) * (1 / len(ev) + 1 / len(treat))))
    return (r_e - r_t) / se if se > 0 else 0.0


def calibration_scores(scores: dict[str, np.ndarray], cfg: RejectConfig) -> tuple[np.ndarray, str]:
    """The clean scores τ is chosen on and their name: D_eval and D_treat together ("valid") unless ``cfg`` says
    D_eval, or D_treat's scores sit lower than D_eval's at the union's 90th percentile or at its τ and the union's
    τ would reject more than D_eval's alone (then D_eval alone, logged). ``higher``: whichever of the union and
    D_eval alone gives the higher τ, with no test (a repaired pair, both of whose models were fine-tuned on D_treat:
    measured, the union's τ let 1.03% and 1.51% of new clean inputs through a 1% budget where the test above saw no
    shift). Label-free: only clean inputs' scores are read.

    Where the two sets differ, the higher of the two thresholds is the one that keeps the budget: a model
    fine-tuned on D_treat may agree more there (lower scores, a τ too low for new inputs: D_eval's is taken), or,
    for a score in logit space, be more sure of its answers there (the bulk lower but the tail higher: measured on
    repaired pairs, where D_eval's 1,000 scores alone gave half the reject rate of new inputs; the union's is taken).
    """
    ev = scores["eval"]
    treat = scores.get("treat")
    if cfg.calibration_set == "eval" or treat is None or not len(treat):
        return ev, "eval"
    both = np.concatenate([treat, ev])
    tau = threshold_for(both, cfg.clean_reject_budget, cfg.calibration_confidence)
    if cfg.calibration_set == "higher":
        tau_eval = threshold_for(ev, cfg.clean_reject_budget, cfg.calibration_confidence)
        return (ev, "eval") if tau_eval > tau else (both, "valid")
    z = max(_lower_share(treat, ev, float(np.quantile(both, 0.9))), _lower_share(treat, ev, tau))
    if z > SHIFT_Z:
        tau_eval = threshold_for(ev, cfg.clean_reject_budget, cfg.calibration_confidence)
        if tau >= tau_eval:
            log.info(
                "D_treat's scores differ from D_eval's (z %.1f), but τ on both (%.4g) is above D_eval's alone "
                "(%.4g): chosen on both",
                z,
                tau,
                tau_eval,
            )
            return both, "valid"
        log.warning(
            "the models agree more on D_treat (fine-tuned on it) than on D_eval (z %.1f): τ is chosen on D_eval "
            "alone (%d inputs)",
            z,
            len(ev),
        )
        return ev, "eval"
    return both, "valid"


def rule_from_scores(scores: dict[str, np.ndarray], cfg: RejectConfig, scales: tuple[float, ...] = ()) -> RejectRule:
    """The rule for ``cfg`` from clean scores by set ("eval", "treat"), τ chosen per :func:`calibration_scores`
    (``scales``: a combined score's, those the scores were computed with)."""
    chosen, name = calibration_scores(scores, cfg)
    return rule_for(cfg.reject_score, cfg.clean_reject_budget, chosen, cfg.calibration_confidence, name, scales)


def clean_scores(
    score: str, logits: dict[str, tuple[np.ndarray, ...]], budget: float
) -> tuple[dict[str, np.ndarray], tuple[float, ...]]:
    """Each clean set's scores of ``score`` from both models' logits (primary, monitor) by set, and the scales they
    were computed with (:func:`pair_scales`)."""
    scales = pair_scales(score, logits, budget)
    return {name: reject_scores(pair[0], pair[1], score, scales) for name, pair in logits.items()}, scales


def pair_scales(score: str, logits: dict[str, tuple[np.ndarray, ...]], budget: float) -> tuple[float, ...]:
    """A combined score's scales, fitted on the clean inputs of every set together at ``budget`` (label-free);
    () for a plain score."""
    parts = {
        part: np.concatenate([reject_scores(pair[0], pair[1], part) for pair in logits.values()])
        for part in COMBINED.get(score, ())
    }
    return fit_scales(score, parts, budget)


def _label_free(
    defenders: dict[str, tuple[np.ndarray, ...]],
    cfg: RejectConfig,
    clean: tuple[np.ndarray, np.ndarray],
    triggered: tuple[np.ndarray, np.ndarray],
    attacks: np.ndarray,
    right: np.ndarray,
) -> dict[str, float]:
    """One label-free operating point: scales and τ chosen on the defender's clean sets as publishing chooses them,
    measured on the clean test inputs and the attacks (evaluation)."""
    scores, scales = clean_scores(cfg.reject_score, defenders, cfg.clean_reject_budget)
    rule = rule_from_scores(scores, cfg, scales)
    neg, pos = rule.scores(*clean), rule.scores(*triggered)[attacks]
    return {
        "threshold": rule.threshold,
        "recall": float((pos > rule.threshold).mean()),
        "clean_reject_rate": float((neg > rule.threshold).mean()),
        "served_clean_accuracy": float((right & (neg <= rule.threshold)).mean()),
    }


def pair_logits(primary: Path, monitor: Path, images: np.ndarray, preprocess: Preprocess) -> tuple[np.ndarray, ...]:
    """Both models' logits for the model's uint8 images, on onnxruntime (the files the edge runs)."""
    return tuple(OnnxClassifier(path, preprocess=preprocess).logits(images) for path in (primary, monitor))


def calibrate(
    primary: Path, monitor: Path, clean: dict[str, np.ndarray], preprocess: Preprocess, cfg: RejectConfig
) -> RejectRule:
    """The rule for ``cfg`` with τ chosen on clean images only: ``clean`` maps "eval" (D_eval) and optionally
    "treat" (D_treat) to the model's images."""
    logits = {name: pair_logits(primary, monitor, images, preprocess) for name, images in clean.items()}
    scores, scales = clean_scores(cfg.reject_score, logits, cfg.clean_reject_budget)
    rule = rule_from_scores(scores, cfg, scales)
    log.info(
        "reject rule: %s > %.4g (chosen on %s clean inputs of %s at confidence %.2f; their reject rate %.4f)",
        rule.score,
        rule.threshold,
        rule.calibration_inputs,
        rule.calibration_set,
        cfg.calibration_confidence,
        rule.clean_rate,
    )
    return rule


def served(bundle_dir: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """What the edge serves on clean inputs (the model's images) under the bundle's rule: the share answered and
    right (served clean accuracy), and the share refused (evaluation: reads the labels)."""
    bundle = verify_bundle(bundle_dir)
    rule = RejectRule.of(bundle.manifest)
    p, m = pair_logits(bundle.model_path("primary"), bundle.model_path("monitor"), images,
                       preprocess_of(bundle.manifest.input_spec))  # fmt: skip
    rejected = rule.decide(p, m)[1]
    right = p.argmax(1) == labels
    return {
        "served_clean_accuracy": float((right & ~rejected).mean()),
        "clean_reject_rate": float(rejected.mean()),
        "primary_clean_accuracy": float(right.mean()),
    }


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted half."""
    scores = np.concatenate([negative, positive]).astype(np.float64)
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b - 1) / 2.0 + 1.0
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc(negative: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every threshold, for plotting."""
    thresholds = np.unique(np.concatenate([negative, positive]))[::-1]
    fpr = np.array([0.0, *[(negative >= t).mean() for t in thresholds]])
    tpr = np.array([0.0, *[(positive >= t).mean() for t in thresholds]])
    return fpr, tpr


def recall_at(negative: np.ndarray, positive: np.ndarray, rate: float) -> float:
    """Recall with the threshold that rejects at most ``rate`` of ``negative`` (set on these clean inputs)."""
    return float((positive > threshold_for(negative, rate)).mean())


def baseline_rows(
    primary: Path, preprocess: Preprocess, clean: np.ndarray, attacks: np.ndarray, pool: np.ndarray, limit: int
) -> dict[str, Any]:
    """STRIP and SCALE-UP with the suspect model alone on the first ``limit`` clean inputs and attacks, beside the
    two-model rule's own cost on the same inputs: AUROC, recall at 1% clean reject, forward passes, µs per input."""
    from trainer.stages.baselines import SCALE_UP_FACTORS, STRIP_N, scale_up_scores, strip_scores, timed

    model = OnnxClassifier(primary, preprocess=preprocess, batch_size=256)
    clean, attacks = clean[:limit], attacks[:limit]
    n = len(clean) + len(attacks)
    both = np.concatenate([clean, attacks])
    rows: dict[str, Any] = {}
    for name, passes, fn in (
        ("strip", STRIP_N, lambda: strip_scores(model.logits, both, pool)),
        ("scale_up", len(SCALE_UP_FACTORS) + 1, lambda: scale_up_scores(model.logits, both)),
    ):
        scores, us = timed(fn, n)
        neg, pos = scores[: len(clean)], scores[len(clean) :]
        rows[name] = {"auroc": auroc(neg, pos), "recall_at_1pct": recall_at(neg, pos, 0.01),
                      "forward_passes": passes, "us_per_input": us, "inputs": n}  # fmt: skip
    return rows


def detect_eval(
    bundle_dir: Path,
    splits: Splits,
    trigger: Trigger,
    target: int,
    out_dir: Path,
    seed: int = 0,
    baselines: int = 0,
) -> dict[str, Any]:
    """Every score on the clean test set against its triggered copy; writes report.json and roc.png.
    ``baselines``: also STRIP and SCALE-UP on that many clean inputs and attacks (0: not run)."""
    bundle = verify_bundle(bundle_dir)
    manifest = bundle.manifest
    preprocess = preprocess_of(manifest.input_spec)
    rule = RejectRule.of(manifest)
    fitted = preprocess.fitted(image_shape_of(manifest.input_spec))
    test = splits.test  # raw pictures: the trigger goes on them, then the bundle's preprocessing
    clean_images = fitted.image(test.images)
    triggered = fitted.image(trigger.apply(test.images, np.random.default_rng(seed)))
    primary, monitor = bundle.model_path("primary"), bundle.model_path("monitor")
    t0 = time.perf_counter()
    p_clean, m_clean = pair_logits(primary, monitor, clean_images, preprocess)
    rule_us = (time.perf_counter() - t0) / len(clean_images) * 1e6  # both models, batched: the rule's cost
    p_trig, m_trig = pair_logits(primary, monitor, triggered, preprocess)
    # Positives: triggered inputs the primary sends to the target (attacks that would succeed), of clean inputs
    # it got right and that are not of the target class; negatives: every clean test input.
    attacks = (test.labels != target) & (p_clean.argmax(1) == test.labels) & (p_trig.argmax(1) == target)
    attacks &= trigger.victims(test.labels)
    p_eval, m_eval = pair_logits(primary, monitor, fitted.image(splits.eval.images), preprocess)
    p_treat, m_treat = pair_logits(primary, monitor, fitted.image(splits.treat.images), preprocess)
    # Label-free operating points as publishing makes them today: the bundle's confidence, the set chosen by
    # today's guard (the manifest records the set used then, not what was asked)
    default = RejectConfig()
    calib = replace(
        default, calibration_confidence=default.calibration_confidence if rule.confidence is None else rule.confidence
    )
    out: dict[str, Any] = {
        "bundle": str(bundle_dir),
        "bundle_version": int(manifest.version),
        "trigger": trigger.spec,
        "target": target,
        "clean_inputs": len(test),
        "attacks": int(attacks.sum()),
        "rule": {
            "score": rule.score,
            "threshold": rule.threshold,
            "budget": rule.budget,
            "calibration_set": rule.calibration_set,
            "calibration_inputs": rule.calibration_inputs,
            "calibration_confidence": rule.confidence,
            "scales": list(rule.scales),
        },
        "scores": {},
    }
    curves = {}
    right = p_clean.argmax(1) == test.labels
    defenders: dict[str, tuple[np.ndarray, ...]] = {"eval": (p_eval, m_eval), "treat": (p_treat, m_treat)}
    for score in SCORES:
        # a combined score's curve with the scales publishing would fit at the default budget
        scales = pair_scales(score, defenders, default.clean_reject_budget)
        neg = reject_scores(p_clean, m_clean, score, scales)
        pos = reject_scores(p_trig, m_trig, score, scales)[attacks]
        row: dict[str, Any] = {"auroc": auroc(neg, pos) if len(pos) else None}
        if score != "disagree" and len(pos):
            row["recall_at_clean_reject"] = {str(b): recall_at(neg, pos, b) for b in BUDGETS}
            # Label-free operating points: scales and τ chosen on clean inputs at each budget, measured on the
            # test set.
            row["label_free"] = {
                str(b): _label_free(
                    defenders,
                    replace(calib, reject_score=score, clean_reject_budget=b),
                    (p_clean, m_clean),
                    (p_trig, m_trig),
                    attacks,
                    right,
                )
                for b in BUDGETS
            }
        else:
            row["recall"] = float(pos.mean()) if len(pos) else None
            row["clean_reject_rate"] = float(neg.mean())
        out["scores"][score] = row
        if len(pos):
            curves[score] = roc(neg, pos)
    neg = rule.scores(p_clean, m_clean)
    pos = rule.scores(p_trig, m_trig)[attacks]
    out["auroc"] = auroc(neg, pos) if len(pos) else None
    out["recall"] = float((pos > rule.threshold).mean()) if len(pos) else None
    out["clean_reject_rate"] = float((neg > rule.threshold).mean())
    answered = neg <= rule.threshold
    out["served_clean_accuracy"] = float(((p_clean.argmax(1) == test.labels) & answered).mean())
    out["primary_clean_accuracy"] = float((p_clean.argmax(1) == test.labels).mean())
    out["rule_cost"] = {"forward_passes": 2, "us_per_input": rule_us}
    if baselines:
        pool = fitted.image(splits.valid.images)  # the defender's clean data
        out["baselines"] = baseline_rows(primary, preprocess, clean_images, triggered[attacks], pool, baselines)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(curves, out, out_dir / "roc.png")
    (out_dir / "report.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, xmax in zip(axes, (1.0, 0.1), strict=True):
        for score, (fpr, tpr) in curves.items():
            auc = report["scores"][score]["auroc"]
            ax.plot(fpr, tpr, label=f"{score} (AUROC {auc:.3f})")
        ax.scatter([report["clean_reject_rate"]], [report["recall"] or 0.0], color="black", zorder=5,
                   label=f"bundle's rule ({report['rule']['score']})")  # fmt: skip
        ax.set_xlim(0, xmax)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("clean reject rate")
        ax.set_ylabel("recall of successful attacks")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].set_title("zoom: clean reject rate up to 10%")
    fig.suptitle(f"{report['trigger']}: {report['attacks']} attacks against {report['clean_inputs']} clean inputs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
