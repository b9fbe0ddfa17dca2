"""A weak θ_aug, as in the paper's Table 15 (issue 15): repair from monitors that did not remove the backdoor.

From a field cell's Algorithm 1 grid (bench_field: its candidates.csv, whose test ASR this evaluation may read; the
heuristic never does) the candidates whose ASR lies nearest ``--asr`` (default high 0.8 and mid 0.35) are trained
again as the only candidate of a one-point grid (same α, γ, epochs and seed), giving a v1 bundle whose monitor
keeps that much of the backdoor. Each is streamed at CPD 0.5 and 0.2 (N = 1000, the paper's Table 15 CPDs) and
repaired two ways: the CycleGAN repair (quick profile, the repair's defaults) and clean fine-tuning of the weak
θ_aug itself (``--learner none --repair-base aug``: the base that carries the monitor's treatment, the stronger
clean-only control). The question is where the learned trigger changes the outcome against clean fine-tuning.

``--reject-score S``: the v1 bundle is first put under score S by ``nnoc-trainer calibrate`` (same two models, τ
chosen again on clean data), so the quarantine the repair learns from comes from that rule; its files and rows are
kept apart from the bundle's own rule's.

    python -m bench.bench_weak [--trigger checker4] [--seed 0] [--asr 0.8 0.35] [--cpds 0.5 0.2] [--reject-score S]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from bench.bench_field import QUICK, WORK, stage, trigger_pictures
from bench.common import RESULTS, machine, run_cli, save


def pick(candidates: Path, asr: float) -> dict[str, float]:
    """The grid's finished candidate whose test ASR is nearest ``asr`` (evaluation only)."""
    with candidates.open() as f:
        rows = [
            {k: float(v) for k, v in r.items() if k in ("alpha", "gamma", "test_asr", "eval_ca")}
            for r in csv.DictReader(f)
            if r.get("test_asr")  # a candidate halving stopped was not measured on the test split
        ]
    return min(rows, key=lambda r: abs(r["test_asr"] - asr))


def variant(cell: Path, spec: str, seed: int, asr: float, cpds: list[float], score: str | None) -> dict[str, Any]:
    chosen = pick(cell / "predeploy" / "candidates.csv", asr)
    w = cell / f"weak-{asr:g}"
    ev = ["--eval-trigger", spec, "--target", "0"]
    res: dict[str, Any] = {"asked_asr": asr, "candidate": chosen}
    res["predeploy"] = stage(w / "predeploy.json", lambda: run_cli(
        "predeploy", "--model", str(cell / "badnet" / "model.pt"), "--out", str(w / "predeploy"), "--seed", str(seed),
        "--epochs", "3", "--max-rounds", "1", "--alpha0", f"{chosen['alpha']:g}", "--gammas", f"{chosen['gamma']:g}",
        *ev))  # fmt: skip
    bundle = w / "predeploy" / "bundle"
    if score is not None:
        res["reject_score"] = score
        w = w / score
        res["calibrate"] = stage(w / "calibrate.json", lambda: run_cli(
            "calibrate", "--bundle", str(bundle), "--reject-score", score, "--out", str(w / "calibrated")))  # fmt: skip
        bundle = w / "calibrated" / "bundle"
    for cpd in cpds:
        q = w / f"cpd{cpd:g}" / "quarantine"
        row: dict[str, Any] = {}
        row["stream"] = stage(w / f"stream-{cpd:g}.json", lambda q=q, cpd=cpd: run_cli(
            "stream", "--bundle", str(bundle), "--trigger", spec, "--target", "0", "--cpd", f"{cpd:g}", "--n", "1000",
            "--seed", str(seed), "--out", str(q)))  # fmt: skip
        base = ["--bundle", str(bundle), "--quarantine", str(q), *ev, *QUICK]
        row["repair"] = stage(w / f"repair-{cpd:g}.json", lambda base=base, cpd=cpd: run_cli(
            "repair", *base, "--out", str(w / f"repair-{cpd:g}")))  # fmt: skip
        if row["repair"].get("kept_keys") is not None:  # evaluation only: the stream's truth.json
            from bench.bench_repair import purity

            row["purity"] = purity(q, row["repair"])
        row["clean-ft"] = stage(w / f"clean-ft-{cpd:g}.json", lambda base=base, cpd=cpd: run_cli(
            "repair", *base, "--learner", "none", "--unlearn-quarantine", "0", "--repair-base", "aug", "--out",
            str(w / f"clean-ft-{cpd:g}")))  # fmt: skip
        res[f"cpd{cpd:g}"] = row
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trigger", default="checker4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--asr", nargs="+", type=float, default=[0.8, 0.35])
    ap.add_argument("--cpds", nargs="+", type=float, default=[0.5, 0.2])
    ap.add_argument("--reject-score", default=None, help="put v1 under this score first (default: its own rule)")
    args = ap.parse_args()
    spec = trigger_pictures(WORK / "triggers")[args.trigger]
    cell = WORK / args.trigger / f"seed{args.seed}"
    if not (cell / "predeploy" / "candidates.csv").is_file():
        raise SystemExit(
            f"run bench.bench_field --triggers {args.trigger} --seeds {args.seed} first (its grid is read)"
        )
    path = RESULTS / "weak.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    for asr in args.asr:
        score = args.reject_score
        res = {"trigger": args.trigger, "seed": args.seed, **variant(cell, spec, args.seed, asr, args.cpds, score)}
        res["machine"] = machine()
        key = (args.trigger, args.seed, asr, score)
        rows = [r for r in rows if (r["trigger"], r["seed"], r["asked_asr"], r.get("reject_score")) != key]
        save("weak", {"rows": [*rows, res]})
        rows = [*rows, res]
        print(json.dumps({"trigger": args.trigger, "asr": asr, "candidate": res["candidate"]}), flush=True)


if __name__ == "__main__":
    main()
