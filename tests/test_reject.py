"""The reject rule: one definition of each score (numpy) that the fused graph reproduces, a threshold chosen on
clean scores only for a clean-reject budget, and the edge applying the manifest's rule and answering the score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import rgb_bundle
from edge_agent.formats.preprocess import Preprocess
from edge_agent.formats.reject import (
    COMBINED,
    SCORES,
    RejectRule,
    RejectRuleError,
    fit_scales,
    reject_scores,
    rule_for,
    threshold_for,
)
from protos.nnoc.v1 import bundle_pb2

BLOCK = Preprocess(color="rgb", size=(32, 32), mean=(0.5,), std=(0.25,))


def test_scores_by_hand() -> None:
    p = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], np.float32)
    m = np.array([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0]], np.float32)
    assert reject_scores(p, m, "disagree").tolist() == [0.0, 1.0]
    kl = reject_scores(p, m, "kl")
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 1.0
    doubt = reject_scores(p, m, "doubt")
    sm = np.exp(m[1]) / np.exp(m[1]).sum()
    assert doubt[1] == pytest.approx(1 - sm[1], rel=1e-5) and doubt[0] < doubt[1]
    gap = reject_scores(p, m, "logit_gap")  # (p - m)[y] - mean(p - m): row 1 d = (-3, 3, 0), y = 1
    assert gap.tolist() == pytest.approx([0.0, 3.0])
    shifted = reject_scores(p + 5.0, m - np.array([[1.0], [7.0]], np.float32), "logit_gap")
    assert shifted == pytest.approx(gap)  # a softmax-preserving shift of either model's logits changes nothing
    # Both models name label 0, the primary far more sure: the softmaxes saturate, the logits do not.
    sure, less = np.array([[12.0, 0.0, 0.0]], np.float32), np.array([[5.0, 0.0, 0.0]], np.float32)
    assert reject_scores(sure, less, "kl")[0] < 0.02 and reject_scores(sure, less, "logit_gap")[0] > 4.0
    with pytest.raises(RejectRuleError, match="unknown reject score"):
        RejectRule("entropy", 0.1)


def test_the_combined_score_takes_the_larger_part_in_units_of_its_clean_tail() -> None:
    """gap_or_kl: logit_gap and kl each divided by its clean (1 - budget) quantile; the larger decides. The
    adaptive case (a primary unsure on purpose, the monitor sure of another label) is caught by the kl part, a
    weak monitor (the same label, less sure) by the logit_gap part."""
    rng = np.random.default_rng(0)
    p = rng.normal(size=(2000, 10)).astype(np.float32)
    p[np.arange(2000), rng.integers(0, 10, 2000)] += 6.0
    m = p + rng.normal(scale=0.3, size=p.shape).astype(np.float32)  # clean: the two models nearly agree
    parts = {part: reject_scores(p, m, part) for part in ("logit_gap", "kl")}
    scales = fit_scales("gap_or_kl", parts, 0.01)
    assert scales == (threshold_for(parts["logit_gap"], 0.01), threshold_for(parts["kl"], 0.01))
    clean = reject_scores(p, m, "gap_or_kl", scales)
    rule = rule_for("gap_or_kl", 0.01, clean, scales=scales)
    assert rule.scales == scales and (clean > rule.threshold).mean() <= 0.01
    # both parts at 1% each: the union rejects between 1% and 2% of clean inputs at scale 1
    assert 0.01 <= (clean > 1.0).mean() <= 0.02
    adaptive_p = np.array([[0.0, 1.5, 0.0, 0, 0, 0, 0, 0, 0, 0]], np.float32)  # target 1, unsure
    adaptive_m = np.array([[6.0, -1.0, 0.0, 0, 0, 0, 0, 0, 0, 0]], np.float32)  # sure of label 0
    weak_p = np.array([[0.0, 14.0, 0, 0, 0, 0, 0, 0, 0, 0]], np.float32)  # far past the clean range
    weak_m = np.array([[0.0, 7.0, 0, 0, 0, 0, 0, 0, 0, 0]], np.float32)  # the same label, less sure
    for a, b, part in ((adaptive_p, adaptive_m, "kl"), (weak_p, weak_m, "logit_gap")):
        got = reject_scores(a, b, "gap_or_kl", scales)[0]
        assert got > rule.threshold and got == pytest.approx(
            reject_scores(a, b, part)[0] / scales[("logit_gap", "kl").index(part)]
        )
    assert reject_scores(weak_p, weak_m, "kl")[0] < scales[1]  # kl alone misses the weak monitor's input
    # the manifest carries the scales; a combined rule without them (or a plain one with them) is refused
    assert RejectRule.of(_manifest_with(rule)).scales == scales
    for bad in ((), (1.0,), (1.0, 0.0), (1.0, float("nan"))):
        with pytest.raises(RejectRuleError, match="scale"):
            RejectRule("gap_or_kl", 1.0, scales=bad)
    with pytest.raises(RejectRuleError, match="takes 0 scales"):
        RejectRule("kl", 1.0, scales=(1.0,))


def _manifest_with(rule: RejectRule) -> bundle_pb2.Manifest:
    manifest = bundle_pb2.Manifest()
    manifest.reject_rule.CopyFrom(rule.message())
    return bundle_pb2.Manifest.FromString(manifest.SerializeToString())


def test_threshold_keeps_the_clean_budget() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 7, 100, 5000):
        clean = rng.exponential(size=n)
        for budget in (0.0, 0.005, 0.01, 0.05, 0.2):
            tau = threshold_for(clean, budget)
            assert (clean > tau).mean() <= budget + 1e-12
            assert (clean >= tau).mean() > budget or budget * n < 1  # the smallest such threshold
    tied = np.zeros(100)
    assert (tied > threshold_for(tied, 0.01)).sum() == 0
    rule = rule_for("kl", 0.02, rng.exponential(size=1000))
    assert rule.budget == 0.02 and rule.clean_rate is not None and rule.clean_rate <= 0.02
    assert rule_for("disagree", 0.02, np.zeros(10)).threshold == 0.5


def test_the_confidence_bound_keeps_the_budget_on_new_inputs() -> None:
    """With confidence c, τ chosen on n clean scores rejects at most the budget of new clean inputs in at least c
    of the draws; the plain quantile (confidence 0) in only about half."""
    from edge_agent.formats.reject import allowed_exceedances
    from protos.nnoc.v1 import bundle_pb2

    assert allowed_exceedances(1000, 0.01, 0.0) == 10
    assert allowed_exceedances(1000, 0.01, 0.9) == 5  # P(Binomial(1000, 0.01) <= 5) = 0.067; <= 6: 0.130
    assert allowed_exceedances(5000, 0.01, 0.9) == 40
    assert allowed_exceedances(200, 0.01, 0.9) == -1  # 0.99^200 = 0.134 > 0.1: too few scores
    assert allowed_exceedances(200, 0.0, 0.9) == 0
    with pytest.raises(RejectRuleError, match="confidence"):
        allowed_exceedances(100, 0.01, 1.0)
    rng = np.random.default_rng(0)
    trials, held = 400, {0.0: 0, 0.9: 0}
    for _ in range(trials):
        clean = rng.exponential(size=1000)
        for c in held:  # Exp(1) scores: a new input's score lies above τ with probability exp(-τ)
            held[c] += int(np.exp(-threshold_for(clean, 0.01, c)) <= 0.01)
    assert held[0.9] >= 0.85 * trials, held
    assert 0.3 * trials <= held[0.0] <= 0.75 * trials, held
    rule = rule_for("kl", 0.01, rng.exponential(size=5000), 0.9, "valid")
    assert (rule.calibration_set, rule.calibration_inputs, rule.confidence) == ("valid", 5000, 0.9)
    manifest = bundle_pb2.Manifest()
    manifest.reject_rule.CopyFrom(rule.message())
    assert RejectRule.of(manifest) == rule


def test_a_new_version_keeps_the_deployed_budget_but_chooses_its_calibration_set_again() -> None:
    from protos.nnoc.v1 import bundle_pb2
    from trainer.stages.publish import inherited_reject

    # the guard used D_eval alone for the deployed pair; that says nothing about the next pair
    deployed = rule_for("logit_gap", 0.02, np.random.default_rng(0).exponential(size=1000), 0.95, "eval")
    manifest = bundle_pb2.Manifest()
    manifest.reject_rule.CopyFrom(deployed.message())
    cfg = inherited_reject(manifest)
    assert (cfg.reject_score, cfg.clean_reject_budget, cfg.calibration_confidence) == ("logit_gap", 0.02, 0.95)
    assert cfg.calibration_set == "valid"
    assert inherited_reject(manifest, calibration_set="eval").calibration_set == "eval"


def test_calibration_uses_d_treat_unless_its_scores_sit_lower_and_would_lower_tau() -> None:
    from trainer.stages.detect import RejectConfig, calibration_scores

    rng = np.random.default_rng(0)
    ev, same, lower = rng.exponential(size=1000), rng.exponential(size=4000), 0.6 * rng.exponential(size=4000)
    chosen, name = calibration_scores({"eval": ev, "treat": same}, RejectConfig())
    assert name == "valid" and len(chosen) == 5000
    chosen, name = calibration_scores({"eval": ev, "treat": lower}, RejectConfig())
    assert name == "eval" and len(chosen) == 1000  # the models agree more where they were fine-tuned
    assert calibration_scores({"eval": ev, "treat": same}, RejectConfig(calibration_set="eval"))[1] == "eval"
    # lower in the bulk but with a longer tail (a primary fine-tuned on D_treat, more sure of itself there, under a
    # logit-space score): the union's τ rejects fewer new inputs than D_eval's alone, so both are used
    bulk_lower_tail_higher = np.where(rng.random(4000) < 0.03, 6.0 + rng.exponential(size=4000), 0.5 * same)
    chosen, name = calibration_scores({"eval": ev, "treat": bulk_lower_tail_higher}, RejectConfig())
    assert name == "valid" and len(chosen) == 5000


def test_higher_calibration_takes_whichever_set_gives_the_higher_threshold() -> None:
    from edge_agent.formats.reject import threshold_for
    from trainer.stages.detect import RejectConfig, calibration_scores

    rng = np.random.default_rng(1)
    cfg = RejectConfig(calibration_set="higher")
    ev = rng.exponential(size=1000)
    for treat in (0.6 * rng.exponential(size=4000), rng.exponential(size=4000), 1.5 * rng.exponential(size=4000)):
        both = np.concatenate([treat, ev])
        taus = {"valid": threshold_for(both, 0.01, 0.9), "eval": threshold_for(ev, 0.01, 0.9)}
        chosen, name = calibration_scores({"eval": ev, "treat": treat}, cfg)
        assert name == max(taus, key=lambda k: taus[k])
        assert threshold_for(chosen, 0.01, 0.9) == max(taus.values())
    # a shift too small for the test of "valid" (which keeps the union) still gets D_eval's higher τ here
    slightly_lower = 0.93 * rng.exponential(size=4000)
    assert calibration_scores({"eval": ev, "treat": slightly_lower}, RejectConfig())[1] == "valid"
    assert calibration_scores({"eval": ev, "treat": slightly_lower}, cfg)[1] == "eval"


def test_a_repaired_bundles_rule_is_calibrated_on_the_higher_set_unless_told(tmp_path: Path) -> None:
    import argparse
    from dataclasses import fields

    from protos.nnoc.v1 import bundle_pb2
    from trainer.cli import _rule_of
    from trainer.stages.detect import RejectConfig, RuleSpec

    def rule(provenance: dict[str, str], **flags: object) -> RejectConfig:
        manifest = bundle_pb2.Manifest(version=2, provenance=provenance)
        (tmp_path / "manifest.pb").write_bytes(manifest.SerializeToString())
        args = argparse.Namespace(bundle=tmp_path, **{f.name: flags.get(f.name) for f in fields(RuleSpec)})
        cfg: RejectConfig = _rule_of(args)
        return cfg

    assert rule({"repair_base": "bd"}).calibration_set == "higher"
    assert rule({}).calibration_set == "valid"
    assert rule({"repair_base": "bd"}, calibration_set="valid").calibration_set == "valid"


@pytest.mark.parametrize("score", SCORES)
def test_the_fused_graph_and_the_two_sessions_apply_the_manifests_rule(score: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    from edge_agent.ensemble import Ensemble
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.runtime import RuntimeConfig

    x = BLOCK.model_input(np.random.default_rng(1).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8))
    first = verify_bundle(rgb_bundle(tmp_path / "a", BLOCK))
    logits = [
        ort.InferenceSession(str(first.model_path(r)), providers=["CPUExecutionProvider"]).run(
            None, {first.manifest.input_spec.input_name: x}
        )[0]
        for r in ("primary", "monitor")
    ]
    # a combined score's scales from this batch (each part's median: parts of different magnitudes, so that a
    # swapped or missing scale shows)
    parts = {part: reject_scores(*logits, part) for part in COMBINED.get(score, ())}
    scales = tuple(float(np.median(parts[part])) for part in parts)
    want = reject_scores(*logits, score, scales)
    if parts:
        assert np.allclose(want, np.max([parts[p] / s for p, s in zip(parts, scales, strict=True)], axis=0))
        assert 0 < np.isclose(want, parts["kl"] / scales[1]).mean() < 1  # each part the larger on some inputs
    # A threshold inside this batch's scores, so that both sides of it are exercised.
    rule = RejectRule(score, 0.5 if score == "disagree" else float(np.median(want)), scales=scales)
    bundle = verify_bundle(rgb_bundle(tmp_path / "b", BLOCK, rule=rule))
    fused = Ensemble(bundle, RuntimeConfig(ensemble_path="fused"))
    two = Ensemble(bundle, RuntimeConfig(ensemble_path="two-sessions"))
    assert fused.path == "fused" and fused.rule == rule
    a, b = fused.classify(x), two.classify(x)
    np.testing.assert_allclose(a.score, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.score, want, rtol=1e-4, atol=1e-5)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.rejected, a.score > rule.threshold)
    assert np.array_equal(a.labels, np.where(a.rejected, -1, logits[0].argmax(1)))
    if score != "disagree":
        assert 0 < a.rejected.sum() < len(x)


def test_predeploy_chooses_the_threshold_on_clean_data_and_detect_eval_measures_it(
    predeployed: tuple[Path, dict], splits: object, tmp_path: Path
) -> None:
    """Bundle v1 carries the default score's rule whose threshold rejects at most the budget of clean D_eval (chosen
    label-free); detect-eval measures every score on the test set and the bundle's own operating point."""
    import json

    from conftest import SMALL_SPLIT, run_cli
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.formats.reject import DEFAULT_BUDGET, DEFAULT_SCORE

    out, report = predeployed
    rule = RejectRule.of(verify_bundle(out / "bundle").manifest)
    assert rule.score == DEFAULT_SCORE == "gap_or_kl" and rule.budget == DEFAULT_BUDGET
    assert rule.clean_rate is not None and rule.clean_rate <= DEFAULT_BUDGET
    assert rule.calibration_set in ("valid", "eval") and rule.confidence == 0.9
    assert rule.calibration_inputs == (1000 if rule.calibration_set == "valid" else 200)  # D_treat 800 + D_eval 200
    assert report["reject_rule"]["score"] == DEFAULT_SCORE
    _, ev, _ = run_cli("trainer", "detect-eval", *SMALL_SPLIT, "--bundle", str(out / "bundle"), "--trigger",
                       "checker4", "--target", "0", "--out", str(tmp_path / "d"), "--quiet")  # fmt: skip
    assert ev is not None and ev["attacks"] > 100
    assert set(ev["scores"]) == set(SCORES) and ev["rule"]["score"] == DEFAULT_SCORE
    assert ev["auroc"] == ev["scores"][DEFAULT_SCORE]["auroc"] > 0.9
    assert ev["clean_reject_rate"] < ev["scores"]["disagree"]["clean_reject_rate"]  # fewer clean rejects
    assert 0.0 < ev["recall"] <= 1.0 and ev["served_clean_accuracy"] <= ev["primary_clean_accuracy"]
    point = ev["scores"][DEFAULT_SCORE]["label_free"]["0.01"]  # τ as publishing chooses it, served CA there
    assert point["served_clean_accuracy"] >= ev["primary_clean_accuracy"] - point["clean_reject_rate"] - 1e-9
    assert (tmp_path / "d" / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "d" / "report.json").read_text())["auroc"] == ev["auroc"]


def test_calibrate_puts_the_same_models_under_a_new_rule(predeployed: tuple[Path, dict], tmp_path: Path) -> None:
    """``calibrate`` writes v2 with v1's two ONNX files, a rule with the given score and v1's other choices, τ chosen
    again on clean data within the budget; the checkpoints come along so that a repair can start from it."""
    from conftest import SMALL_SPLIT, run_cli
    from edge_agent.formats.bundle import verify_bundle

    out, _ = predeployed
    v1 = verify_bundle(out / "bundle")
    before = RejectRule.of(v1.manifest)
    _, rep, _ = run_cli("trainer", "calibrate", *SMALL_SPLIT, "--bundle", str(out / "bundle"), "--reject-score",
                        "gap_or_kl", "--out", str(tmp_path / "c"), "--quiet")  # fmt: skip
    v2 = verify_bundle(tmp_path / "c" / "bundle")
    rule = RejectRule.of(v2.manifest)
    assert (v2.manifest.version, v2.manifest.parent_version) == (2, 1) and rep is not None
    assert rule.score == "gap_or_kl" and rule.budget == before.budget and rule.confidence == before.confidence
    assert rule.clean_rate is not None and rule.clean_rate <= before.budget  # type: ignore[operator]
    assert rep["reject_rule"]["score"] == "gap_or_kl" and rep["previous_rule"]["score"] == before.score
    # the combined score's scales, fitted on clean inputs, travel in the manifest; the edge's fused graph applies
    # them as the numpy definition does, on the real models
    assert len(rule.scales) == 2 and rep["reject_rule"]["score_scales"] == list(rule.scales)
    from edge_agent.ensemble import Ensemble, to_model_input
    from edge_agent.formats.spec import preprocess_of
    from edge_agent.runtime import RuntimeConfig
    from trainer.science.data import DataConfig, SplitConfig, load_splits
    from trainer.stages.detect import pair_logits

    spec = v2.manifest.input_spec
    images = load_splits(DataConfig(), SplitConfig(valid=1000, stream=500, train=8000, test=500)).test.images
    fused = Ensemble(v2, RuntimeConfig(ensemble_path="fused")).classify(to_model_input(images, spec))
    logits = pair_logits(v2.model_path("primary"), v2.model_path("monitor"), images, preprocess_of(spec))
    want = rule.scores(*logits)
    np.testing.assert_allclose(fused.score, want, rtol=1e-4, atol=1e-5)
    hashes = {a.role: a.sha256 for a in v1.manifest.artifacts}
    assert all(hashes[a.role] == a.sha256 for a in v2.manifest.artifacts if a.role in ("primary", "monitor"))
    assert (tmp_path / "c" / "primary.pt").is_file() and (tmp_path / "c" / "monitor.pt").is_file()
    assert v2.manifest.provenance["recalibrated_from"].startswith(f"v1 ({before.score} > ")
    # Only a budget given: the score stays the bundle's.
    _, rep, _ = run_cli("trainer", "calibrate", *SMALL_SPLIT, "--bundle", str(tmp_path / "c" / "bundle"),
                        "--clean-reject-budget", "0.05", "--out", str(tmp_path / "d"), "--quiet")  # fmt: skip
    assert rep is not None and rep["reject_rule"]["score"] == "gap_or_kl" and rep["bundle_version"] == 3
    assert rep["reject_rule"]["threshold"] < rule.threshold  # a larger budget: a lower τ
    code, _, err = run_cli("trainer", "calibrate", "--dataset", "fashion-mnist", "--bundle", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "e"), check=False)  # fmt: skip
    assert code == 2 and "Traceback" not in err and "nowhere" in err
