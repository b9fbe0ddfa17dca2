"""The reject rule: a score from the two models' outputs and a threshold τ (an input is rejected when its score is
above τ), written into the manifest by the trainer and applied by the edge (inside the fused graph, or here in
numpy for the two-session path and for offline evaluation: one definition of each score).

Scores, each from the primary's (θ_bd) and the monitor's (θ_aug) logits:

- ``disagree``: 1 when the two argmaxes differ, else 0 (the paper's rule, τ = 0.5).
- ``kl``: KL(softmax(primary) ‖ softmax(monitor)), how far the monitor's belief is from the primary's.
- ``doubt``: 1 − the monitor's probability of the primary's label.
- ``logit_gap``: how far the monitor's logit for the primary's label falls below the primary's, each logit taken
  relative to its model's mean logit over the labels: (p − m)[y] − mean(p − m), y the primary's label. A trigger
  drives the BadNet's target logit far beyond what clean inputs do; a softmax saturates there (KL and doubt see
  two near-one-hot answers when the monitor still says the target), the logits do not. Measured (bench/NOTES.md):
  recall at 1% clean rejects 0.96-1.00 on every trigger and model where ``kl`` gave 0.17-0.97.
- ``gap_or_kl``: the larger of ``logit_gap`` and ``kl``, each divided by its scale (its own clean quantile at the
  budget, chosen with τ and kept in the rule): an input is rejected when either part is far out in its own clean
  tail. ``logit_gap`` reads logit magnitudes (a monitor that agrees but less surely); ``kl`` reads the distributions
  (an adaptive BadNet trained to keep its target logit in the clean range, which ``logit_gap`` then misses).

τ is chosen label-free (:func:`threshold_for`): from a clean-reject budget on clean inputs only, no trigger and no
poisoned example read, with a binomial bound so that the budget holds on new clean inputs with a stated
confidence (:func:`allowed_exceedances`). A manifest without a rule is the paper's rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protos.nnoc.v1 import bundle_pb2

# A combined score: the largest of its parts, each divided by its scale (``RejectRule.scales``, in this order).
COMBINED = {"gap_or_kl": ("logit_gap", "kl")}
SCORES = ("disagree", "kl", "doubt", "logit_gap", *COMBINED)
DEFAULT_SCORE = "gap_or_kl"
DEFAULT_BUDGET = 0.01  # share of clean inputs the rule may reject
# τ keeps the clean reject rate on new inputs within the budget with this probability. Measured (BENCHMARKS.md): the
# plain 99th percentile of 1,000 D_eval scores let 1.1-2.0% of clean test inputs through the 1% budget.
DEFAULT_CONFIDENCE = 0.9


class RejectRuleError(ValueError):
    """An unknown score or a threshold that cannot be used."""


@dataclass(frozen=True)
class RejectRule:
    """``score`` above ``threshold`` rejects. ``budget``: the clean-reject share τ was chosen for; ``clean_rate``:
    the share of clean D_eval it rejects (measured when τ was chosen)."""

    score: str = "disagree"
    threshold: float = 0.5
    budget: float | None = None
    clean_rate: float | None = None
    calibration_set: str = ""
    calibration_inputs: int | None = None
    confidence: float | None = None
    scales: tuple[float, ...] = ()  # a combined score's scale per part (see COMBINED); empty for the others

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise RejectRuleError(f"unknown reject score {self.score!r}; choose one of {list(SCORES)}")
        if not np.isfinite(self.threshold):
            raise RejectRuleError(f"reject threshold {self.threshold} is not a finite number")
        check_scales(self.score, self.scales)

    def scores(self, primary_logits: np.ndarray, monitor_logits: np.ndarray) -> np.ndarray:
        """This rule's score for both models' logits."""
        return reject_scores(primary_logits, monitor_logits, self.score, self.scales)

    def message(self) -> bundle_pb2.RejectRule:
        msg = bundle_pb2.RejectRule(score=self.score, threshold=self.threshold, score_scales=self.scales)
        if self.budget is not None:
            msg.clean_reject_budget = self.budget
        if self.clean_rate is not None:
            msg.eval_clean_reject_rate = self.clean_rate
        msg.calibration_set = self.calibration_set
        if self.calibration_inputs is not None:
            msg.calibration_inputs = self.calibration_inputs
        if self.confidence is not None:
            msg.calibration_confidence = self.confidence
        return msg

    @staticmethod
    def of(manifest: bundle_pb2.Manifest) -> RejectRule:
        """The manifest's rule (the paper's when it has none)."""
        if not manifest.HasField("reject_rule"):
            return RejectRule()
        m = manifest.reject_rule
        return RejectRule(
            m.score or "disagree",
            m.threshold,
            m.clean_reject_budget if m.HasField("clean_reject_budget") else None,
            m.eval_clean_reject_rate if m.HasField("eval_clean_reject_rate") else None,
            m.calibration_set,
            m.calibration_inputs if m.HasField("calibration_inputs") else None,
            m.calibration_confidence if m.HasField("calibration_confidence") else None,
            tuple(m.score_scales),
        )

    def decide(
        self, primary_logits: np.ndarray, monitor_logits: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, rejected, nonfinite) for both models' logits, as the edge decides: rejected above τ and
        wherever a logit or the score is NaN or infinite (see :func:`nonfinite`)."""
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf logits: flagged, never an answer
            scores = self.scores(primary_logits, monitor_logits)
        bad = nonfinite(primary_logits, monitor_logits, scores)
        return scores, self.reject(scores) | bad, bad

    def reject(self, scores: np.ndarray) -> np.ndarray:
        """Which ``scores`` reject: above τ, and every NaN or infinite score (fail closed: a score that is not a
        number never lets an input through)."""
        scores = np.asarray(scores)
        return np.asarray(~(scores <= self.threshold) | np.isinf(scores))


def nonfinite(primary_logits: np.ndarray, monitor_logits: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(N,) bool: inputs where either model's logits or the score hold NaN or an infinity. Such an input is
    rejected whatever its score (a model that emits NaN on some inputs must not answer them: ArgMax over NaN
    picks a label, and NaN is never above τ)."""
    with np.errstate(invalid="ignore", over="ignore"):  # the fused graph's rule: score + 0 × (Σp + Σm) is finite
        total = primary_logits.sum(axis=1, dtype=np.float32) + monitor_logits.sum(axis=1, dtype=np.float32)
        return np.asarray(~np.isfinite(scores + total * np.float32(0.0)))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32, copy=False)
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def check_scales(score: str, scales: tuple[float, ...]) -> None:
    """A combined score needs one positive finite scale per part; the others take none."""
    parts = COMBINED.get(score, ())
    if len(scales) != len(parts):
        raise RejectRuleError(
            f"reject score {score!r} takes {len(parts)} scales ({', '.join(parts) or 'none'}), got {len(scales)}: "
            "choose the rule again with nnoc-trainer calibrate"
        )
    if not all(np.isfinite(x) and x > 0 for x in scales):
        raise RejectRuleError(f"reject score scales must be positive finite numbers, got {list(scales)}")


# A part whose clean quantile is not above this (two models that agree exactly) is scaled by it instead.
MIN_SCALE = 1e-6


def fit_scales(score: str, parts: dict[str, np.ndarray], budget: float) -> tuple[float, ...]:
    """A combined score's scales from clean inputs only: each part's empirical (1 − budget) quantile (``parts``:
    each part's clean scores), so that at scale 1 each part alone rejects about the budget. () for a plain score."""
    return tuple(max(threshold_for(parts[part], budget), MIN_SCALE) for part in COMBINED.get(score, ()))


def reject_scores(
    primary_logits: np.ndarray, monitor_logits: np.ndarray, score: str, scales: tuple[float, ...] = ()
) -> np.ndarray:
    """(N,) float32 scores of ``score`` for logits (N, K) of both models (``scales``: a combined score's)."""
    if score in COMBINED:
        check_scales(score, scales)
        parts = [
            reject_scores(primary_logits, monitor_logits, part) / s
            for part, s in zip(COMBINED[score], scales, strict=True)
        ]
        return np.max(parts, axis=0).astype(np.float32)
    if score == "disagree":
        return (primary_logits.argmax(1) != monitor_logits.argmax(1)).astype(np.float32)
    if score == "logit_gap":
        d = primary_logits.astype(np.float32) - monitor_logits.astype(np.float32)
        picked = np.take_along_axis(d, primary_logits.argmax(1)[:, None], axis=1)[:, 0]
        return (picked - d.mean(axis=1)).astype(np.float32)
    lp, lm = _log_softmax(primary_logits), _log_softmax(monitor_logits)
    if score == "kl":
        return (np.exp(lp) * (lp - lm)).sum(axis=1).astype(np.float32)
    if score == "doubt":
        picked = np.take_along_axis(np.exp(lm), primary_logits.argmax(1)[:, None], axis=1)[:, 0]
        return (1.0 - picked).astype(np.float32)
    raise RejectRuleError(f"unknown reject score {score!r}; choose one of {list(SCORES)}")


def allowed_exceedances(n: int, budget: float, confidence: float = 0.0) -> int:
    """How many of ``n`` clean calibration scores may lie above τ for a clean-reject ``budget``.

    ``confidence`` 0: ⌊budget·n⌋, the empirical quantile (on new inputs its reject rate exceeds the budget about
    half the time). ``confidence`` c in (0, 1): the largest k with P(Binomial(n, budget) ≤ k) ≤ 1 − c, so that the
    reject rate on new clean inputs from the same distribution is within ``budget`` with probability at least c
    (the binomial tail bound of training-conditional conformal prediction, Vovk 2012). -1 when even no
    exceedance cannot reach that confidence (too few scores: n < log(1 − c) / log(1 − budget)).
    """
    if not 0.0 <= budget < 1.0:
        raise RejectRuleError(f"the clean-reject budget must lie in [0, 1), got {budget}")
    if not 0.0 <= confidence < 1.0:
        raise RejectRuleError(f"the calibration confidence must lie in [0, 1), got {confidence}")
    if confidence == 0.0 or budget == 0.0:
        return math.floor(budget * n)
    delta, log_p, log_q = 1.0 - confidence, math.log(budget), math.log1p(-budget)
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q)
        if cdf > delta:
            return k - 1
    return n


def threshold_for(clean_scores: np.ndarray, budget: float, confidence: float = 0.0) -> float:
    """The smallest τ such that at most :func:`allowed_exceedances` of ``clean_scores`` lie above it (label-free:
    clean inputs only). With too few scores for ``confidence``, τ is the largest score."""
    s = np.sort(np.asarray(clean_scores, np.float64))
    if len(s) == 0:
        raise RejectRuleError("no clean inputs to choose the reject threshold on")
    allowed = max(allowed_exceedances(len(s), budget, confidence), 0)
    return float(s[len(s) - 1 - allowed])


def rule_for(
    score: str,
    budget: float,
    clean_scores: np.ndarray,
    confidence: float = 0.0,
    calibration_set: str = "",
    scales: tuple[float, ...] = (),
) -> RejectRule:
    """The rule for ``score`` at ``budget`` on clean scores (the paper's rule keeps τ = 0.5); ``scales``: a combined
    score's, those the clean scores were computed with."""
    tau = 0.5 if score == "disagree" else threshold_for(clean_scores, budget, confidence)
    rate = float((np.asarray(clean_scores) > tau).mean())
    if score == "disagree":
        return RejectRule(score, tau, None, rate, calibration_set, len(clean_scores))
    return RejectRule(score, tau, budget, rate, calibration_set, len(clean_scores), confidence, scales)
