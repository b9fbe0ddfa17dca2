from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import SMALL_SPLIT, run_cli
from trainer.stages.predeploy import PredeployConfig, alpha_schedule, pick


def test_pick_closest_above_threshold() -> None:
    cands = [(1e-3, 0.6, 0.90), (3e-3, 0.6, 0.86), (3e-3, 0.2, 0.851), (6e-3, 0.6, 0.80), (6e-3, 0.1, 0.87)]
    assert pick(cands, 0.85) == 2
    assert pick(cands, 0.95) is None
    assert pick([], 0.5) is None


def test_pick_ties_prefer_higher_alpha_then_gamma() -> None:
    cands = [(1e-3, 0.6, 0.86), (3e-3, 0.2, 0.86), (3e-3, 0.5, 0.86)]
    assert pick(cands, 0.85) == 2


def test_pick_reads_no_asr() -> None:
    # The same grid measured twice, the ASRs scrambled and the best-ASR candidate moved: the pick is the same one.
    from trainer.stages.predeploy import Candidate, pick_candidate

    grid = [(1e-3, 0.6, 0.90), (3e-3, 0.6, 0.86), (3e-3, 0.2, 0.851), (6e-3, 0.6, 0.80)]
    rng = np.random.default_rng(0)
    picks = set()
    for _ in range(20):
        asrs = rng.permutation([0.01, 0.5, 0.99, 0.2])
        cands = [Candidate(0, a, g, ca, ca, float(asr), 1.0) for (a, g, ca), asr in zip(grid, asrs, strict=True)]
        picks.add(pick_candidate(cands, 0.85))
    assert picks == {2}


def test_alpha_schedule_grows_then_stops_and_shrinks_when_all_below() -> None:
    cfg = PredeployConfig(max_rounds=6, alpha_multipliers=(1, 3, 6, 9))
    nxt = alpha_schedule(1e-3, cfg)
    assert nxt(0, True) == pytest.approx(3e-3)
    assert nxt(1, True) == pytest.approx(6e-3)
    assert nxt(2, False) is None  # growth pushed the whole round below: stop
    nxt = alpha_schedule(1e-3, cfg)
    assert nxt(0, False) == pytest.approx(1e-3 / 3)
    assert nxt(1, False) == pytest.approx(1e-3 / 9)
    assert nxt(2, True) == pytest.approx(2e-3 / 9)  # found one: grow again from there
    nxt = alpha_schedule(1e-3, PredeployConfig(max_rounds=2))
    assert nxt(0, True) is not None and nxt(1, True) is None  # budget


def test_predeploy_writes_table_heatmap_monitor_and_bundle(predeployed: tuple[Path, dict[str, Any]]) -> None:
    out, report = predeployed
    rows = list(csv.DictReader((out / "candidates.csv").open()))
    assert len(rows) == len(report["candidates"]) >= 2
    assert {"alpha", "gamma", "eval_ca", "test_ca", "test_asr", "selected"} <= set(rows[0])
    assert sum(int(r["selected"]) for r in rows) == 1
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "monitor.pt").is_file()
    sel = report["selected"]
    assert sel["eval_ca"] >= report["threshold"]
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["version"] == "1" and manifest["fleet"] == "default"
    assert {a["role"] for a in manifest["artifacts"]} == {"primary", "monitor", "golden"}
    assert manifest["input_spec"]["shape"] == ["1", "28", "28"]
    assert len(manifest["class_names"]) == 10
    assert not list(out.glob(".bundle.*"))  # no temp folders left behind


def test_bundle_verifies_and_ensemble_rejects_triggered_inputs(
    predeployed: tuple[Path, dict[str, Any]], splits: Any
) -> None:
    from edge_agent.ensemble import Ensemble, to_model_input
    from edge_agent.formats.bundle import verify_bundle
    from trainer.science.triggers import parse_trigger

    bundle = verify_bundle(predeployed[0] / "bundle")
    ens = Ensemble(bundle)
    clean = splits.test.images[:500]
    poisoned = parse_trigger("checker4").apply(clean, np.random.default_rng(0))
    d_clean = ens.classify(to_model_input(clean, bundle.manifest.input_spec))
    d_poison = ens.classify(to_model_input(poisoned, bundle.manifest.input_spec))
    # Rejections concentrate on triggered inputs (the detector of Algorithm 2).
    assert d_poison.rejected.mean() > d_clean.rejected.mean() + 0.2
    answered = ~d_clean.rejected
    assert (d_clean.labels[answered] == splits.test.labels[:500][answered]).mean() > 0.8


def test_no_candidate_keeps_table_and_exits_3(badnet: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    code, payload, stderr = run_cli(
        "trainer",
        "predeploy",
        *SMALL_SPLIT,
        "--model",
        str(badnet[0] / "model.pt"),
        "--out",
        str(tmp_path),
        "--gammas",
        "0.5",
        "--epochs",
        "1",
        "--max-rounds",
        "1",
        "--max-ca-drop",
        "-0.5",
        "--quiet",
        check=False,
    )
    assert code == 3
    assert payload is not None and "no candidate" in payload["error"]
    assert (tmp_path / "candidates.csv").is_file() and not (tmp_path / "bundle").exists()
    assert "no candidate" in stderr


def test_the_grid_says_what_is_left_and_about_how_long() -> None:
    from trainer.stages.predeploy import grid_progress

    assert grid_progress(0, 24, 0.0) == "0 of at most 24 candidates done"
    assert grid_progress(2, 24, 60.0) == "2 done, at most 22 left (about 11 min)"  # 30 s a candidate
    assert grid_progress(6, 24, 60.0) == "6 done, at most 18 left (about 3 min)"
    assert grid_progress(3, 6, 30.0) == "3 done, at most 3 left (about 30 s)"
    assert grid_progress(6, 6, 30.0) == "6 done, at most 0 left"
    assert grid_progress(1, 100, 300.0).endswith("(about 8.2 h)")


def test_halving_rungs_spend_a_third_then_the_rest_on_the_closest() -> None:
    from trainer.stages.predeploy import halving_key, rungs

    assert rungs(6, 90, 3) == [(10, 2), (30, 1), (90, 1)]  # 6 x 1/9, 2 x 1/3, 1 to the end: 3.4x fewer steps
    assert rungs(2, 30, 3) == [(10, 1), (30, 1)]
    assert rungs(6, 90, 2) == [(12, 3), (23, 2), (45, 1), (90, 1)]
    assert rungs(1, 90, 3) == [(90, 1)] and rungs(6, 1, 3) == [(1, 6)]
    assert rungs(6, 4, 3) == [(1, 2), (2, 1), (4, 1)]  # each rung at least a step further
    threshold = 0.80
    cas = {"far above": 0.90, "just above": 0.805, "just below": 0.799, "far below": 0.5}
    ranked = sorted(cas, key=lambda k: halving_key(cas[k], threshold))
    assert ranked == ["just above", "far above", "just below", "far below"]  # the pick's own preference


def test_a_floor_lengthens_the_early_rungs_and_merges_those_it_reaches() -> None:
    from trainer.stages.predeploy import floored, rungs

    ladder = rungs(6, 90, 3)  # [(10, 2), (30, 1), (90, 1)]
    assert floored(ladder, 5) == ladder  # under every rung already: unchanged
    assert floored(ladder, 18) == [(18, 2), (30, 1), (90, 1)]  # one epoch of five
    assert floored(ladder, 30) == [(30, 2), (90, 1)]  # the second rung merges: its two survivors both finish
    assert floored(ladder, 200) == [(90, 2)]  # a floor at the whole run is the grid: all six finish


def test_halving_finishes_its_candidate_where_the_grid_does(
    badnet: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    common = [*SMALL_SPLIT, "--model", str(badnet[0] / "model.pt"), "--gammas", "0.2", "0.6", "--epochs", "2",
              "--max-rounds", "1", "--precision", "fp32", "--quiet"]  # fmt: skip
    runs = {}
    for strategy in ("grid", "halving"):
        _, report, err = run_cli(
            "trainer", "predeploy", *common, "--strategy", strategy, "--out", str(tmp_path / strategy)
        )
        assert report is not None, err[-2000:]
        runs[strategy] = {c["gamma"]: c for c in report["candidates"]}
    grid, halving = runs["grid"], runs["halving"]
    assert all(c["finished"] and c["epochs"] == 2 for c in grid.values())
    finished = [g for g, c in halving.items() if c["finished"]]
    stopped = [g for g, c in halving.items() if not c["finished"]]
    assert len(finished) == 1 and len(stopped) == 1 and halving[stopped[0]]["epochs"] < 1
    # the one halving grew to the end is the grid's candidate, weight for weight: the same D_eval CA
    assert halving[finished[0]]["eval_ca"] == grid[finished[0]]["eval_ca"]
    rows = list(csv.DictReader((tmp_path / "halving" / "candidates.csv").open()))
    assert {r["finished"] for r in rows} == {"0", "1"}
    assert all(r["selected"] == "0" for r in rows if r["finished"] == "0")  # a stopped candidate is never picked


def test_a_round_whose_finished_candidate_fell_below_finishes_a_stopped_one_above() -> None:
    from trainer.stages.predeploy import second_chance

    threshold = 0.80
    assert second_chance({0.6: (0.82, True), 0.3: (0.85, False)}, threshold) is None  # one finished above: done
    assert second_chance({0.6: (0.78, True), 0.3: (0.85, False), 0.1: (0.81, False)}, threshold) == 0.1  # closest
    assert second_chance({0.6: (0.78, True), 0.3: (0.79, False)}, threshold) is None  # nothing stopped above
    assert second_chance({0.6: (0.78, True), 0.3: (0.83, True), 0.1: (0.9, False)}, threshold) is None
