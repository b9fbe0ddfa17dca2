"""Multiple rounds and the choice of v2's monitor (issues 14 and 15), on one BadNet with two backdoors.

The attacker plants two independent backdoors (checker4 -> class 0, and a pasted glyph -> class 4, each on 10% of
the training set). The fleet first meets only the first trigger: stream (CPD 0.1, N = 1000), repair -> v2. Then
the second trigger appears: stream through v2, repair -> v3. Measured per round: test CA, ASR of both triggers
for the primary, what the fleet serves (served clean accuracy, clean reject rate) and how well the bundle's rule
catches each trigger (``detect-eval``: AUROC, recall at the label-free operating point).

v2's monitor, three ways from the same θ_repair (same seed; under ``--learner cyclegan`` the ``keep`` run's
generator is reused): ``keep`` (θ_aug), ``refresh`` (θ_repair treated with θ_aug's α, γ and noise) and ``none``.
Every repair runs under the repair's defaults (since 1a81fc1 (2026-11-28): θ_bd fine-tuned while unlearning the purified
quarantine, no trigger learner); v3 repairs v2-keep's primary with v2-keep's monitor deployed, unlearning round 1's
purified quarantine again (``--unlearn-earlier``, as the service's repair jobs do) so that it keeps v2's repair.

``--weak-second ASR``: a θ_aug that keeps the second backdoor, so that v2 has something left for its monitor to
catch. Algorithm 1's grid is run once more with the second trigger as its evaluation trigger (the evaluation reads
each candidate's ASR; the heuristic never does), the candidate whose second-trigger ASR lies nearest ``ASR`` is
trained again as a one-point grid (as bench_weak does) and becomes v1's monitor; every later stage runs from it
(files under ``weak-second-ASR/``).

    python -m bench.bench_rounds [--seed 0] [--second paste|blend] [--weak-second 0.5]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from bench.bench_field import stage, trigger_pictures
from bench.bench_weak import pick
from bench.common import RESULTS, ROOT, machine, run_cli, save

WORK = ROOT / "runs" / "bench-rounds"
FIRST, FIRST_TARGET = "checker4", 0
SECOND_TARGET = 4
MONITORS = ("keep", "refresh", "none")
REPAIR_KEYS = ("test", "served_test", "reject_rule", "config", "repair_set", "seconds", "exit_code", "error")


def detect(bundle: Path, spec: str, target: int, out: Path) -> dict[str, Any]:
    rep = run_cli("detect-eval", "--bundle", str(bundle), "--trigger", spec, "--target", str(target), "--out",
                  str(out), "--test-size", "5000")  # fmt: skip
    keep = ("auroc", "recall", "clean_reject_rate", "attacks", "paper_rule")
    return {k: rep.get(k) for k in keep} | {"exit_code": rep["exit_code"], "error": rep.get("error")}


def asr(model: Path, spec: str, target: int, reference: Path) -> dict[str, Any]:
    return run_cli("evaluate", "--model", str(model), "--trigger", spec, "--target", str(target), "--reference",
                   str(reference))  # fmt: skip


def _save(res: dict[str, Any]) -> None:
    """rounds.json with this run in place of an earlier one of the same second trigger and seed."""
    path = RESULTS / "rounds.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    key = (res["second_name"], res["seed"], res.get("weak_second"))
    runs = [r for r in runs if (r.get("second_name", "paste"), r.get("seed"), r.get("weak_second")) != key] + [res]
    save("rounds", {"machine": machine(), "runs": runs})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--second", choices=("paste", "blend"), default="paste",
                    help="the second backdoor: the ring glyph pasted (θ_aug removes it) or the noise blend (it "
                         "survives θ_aug: a second round with something to repair)")  # fmt: skip
    ap.add_argument("--weak-second", type=float, default=None, metavar="ASR",
                    help="v1's monitor: the grid candidate whose second-trigger ASR lies nearest this")  # fmt: skip
    ap.add_argument("--n2", type=int, default=3000,
                    help="round 2's stream length (CPD 0.1): the fleet collects until its quarantine can be learned "
                         "from; v2 keeps part of the second backdoor, so fewer inputs disagree")  # fmt: skip
    args = ap.parse_args()
    second = trigger_pictures(WORK / "triggers")[args.second]
    w = WORK / (f"seed{args.seed}" if args.second == "paste" else f"{args.second}-seed{args.seed}")
    s = str(args.seed)
    res: dict[str, Any] = {"first": FIRST, "second": second, "second_name": args.second, "seed": args.seed}
    bd = w / "badnet" / "model.pt"
    res["attack"] = stage(w / "attack.json", lambda: run_cli(
        "attack", "--trigger", FIRST, "--target", str(FIRST_TARGET), "--second-trigger", second, "--second-target",
        str(SECOND_TARGET), "--seed", s, "--out", str(w / "badnet")))  # fmt: skip
    grid = ["--model", str(bd), "--seed", s, "--epochs", "3"]
    if args.weak_second is not None:
        res["weak_second"] = args.weak_second
        res["grid_second"] = stage(w / "grid-second.json", lambda: run_cli(
            "predeploy", *grid, "--out", str(w / "grid-second"), "--max-rounds", "3", "--eval-trigger", second,
            "--target", str(SECOND_TARGET)))  # fmt: skip
        chosen = res["candidate"] = pick(w / "grid-second" / "candidates.csv", args.weak_second)
        w = w / f"weak-second-{args.weak_second:g}"
        grid += ["--max-rounds", "1", "--alpha0", f"{chosen['alpha']:g}", "--gammas", f"{chosen['gamma']:g}"]
    else:
        grid += ["--max-rounds", "3"]
    pd = w / "predeploy"
    res["predeploy"] = stage(w / "predeploy.json", lambda: run_cli(
        "predeploy", *grid, "--out", str(pd), "--eval-trigger", FIRST, "--target", str(FIRST_TARGET)))  # fmt: skip

    def staged(name: str, fn: Any, *fn_args: Any) -> dict[str, Any]:
        return stage(w / f"{name}.json", lambda: fn(*fn_args))

    res["v1"] = {
        "first": staged("v1-detect-first", detect, pd / "bundle", FIRST, FIRST_TARGET, w / "d1a"),
        "second": staged("v1-detect-second", detect, pd / "bundle", second, SECOND_TARGET, w / "d1b"),
        "monitor_second_asr": staged("v1-monitor-second", asr, pd / "monitor.pt", second, SECOND_TARGET, bd),
    }
    q1 = w / "q1"
    res["stream1"] = stage(w / "stream1.json", lambda: run_cli(
        "stream", "--bundle", str(pd / "bundle"), "--trigger", FIRST, "--target", str(FIRST_TARGET), "--cpd", "0.1",
        "--n", "1000", "--seed", s, "--out", str(q1)))  # fmt: skip
    base = ["--bundle", str(pd / "bundle"), "--quarantine", str(q1), "--profile", "quick", "--eval-trigger", FIRST,
            "--target", str(FIRST_TARGET)]  # fmt: skip
    res["v2"] = {}
    for choice, extra in [(m, ()) for m in MONITORS] + [("keep-aug", ("--repair-base", "aug"))]:
        out = w / f"v2-{choice}"
        if choice != "keep" and (w / "v2-keep" / "cyclegan.pt").is_file() and not (out / "cyclegan.pt").exists():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(w / "v2-keep" / "cyclegan.pt", out / "cyclegan.pt")  # resumed: the same generator
        monitor = choice.split("-")[0]
        rep = staged(f"v2-{choice}", run_cli, "repair", *base, *extra, "--next-monitor", monitor, "--out", str(out))
        row: dict[str, Any] = {"monitor": monitor, "repair": {k: rep.get(k) for k in REPAIR_KEYS}}
        if rep.get("published"):
            row["first"] = staged(f"v2-{choice}-detect-first", detect, out / "bundle", FIRST, FIRST_TARGET,
                                  out / "d-first")  # fmt: skip
            row["second"] = staged(f"v2-{choice}-detect-second", detect, out / "bundle", second, SECOND_TARGET,
                                   out / "d-second")  # fmt: skip
            row["primary_second_asr"] = staged(f"v2-{choice}-second-asr", asr, out / "primary.pt", second,
                                               SECOND_TARGET, bd)  # fmt: skip
        res["v2"][choice] = row
        _save(res)
    v2 = w / "v2-keep"
    n2 = "" if args.n2 == 1000 else f"-n{args.n2}"
    q2 = w / f"q2{n2}"
    res["n2"] = args.n2
    res["stream2"] = stage(w / f"stream2{n2}.json", lambda: run_cli(
        "stream", "--bundle", str(v2 / "bundle"), "--trigger", second, "--target", str(SECOND_TARGET), "--cpd",
        "0.1", "--n", str(args.n2), "--seed", s, "--out", str(q2)))  # fmt: skip
    rep3 = stage(w / f"v3{n2}.json", lambda: run_cli(
        "repair", "--bundle", str(v2 / "bundle"), "--quarantine", str(q2), "--profile", "quick", "--eval-trigger",
        second, "--target", str(SECOND_TARGET), "--primary-checkpoint", str(v2 / "primary.pt"),
        "--monitor-checkpoint", str(v2 / "monitor.pt"), "--unlearn-earlier", str(v2), "--out",
        str(w / f"v3{n2}")))  # fmt: skip
    res["v3"] = {"repair": {k: rep3.get(k) for k in REPAIR_KEYS}}
    if rep3.get("published"):
        v3 = w / f"v3{n2}" / "primary.pt"
        res["v3"]["primary_first_asr"] = staged(f"v3{n2}-first-asr", asr, v3, FIRST, FIRST_TARGET, bd)
        res["v3"]["primary_second_asr_vs_badnet"] = staged(f"v3{n2}-second-asr", asr, v3, second, SECOND_TARGET, bd)
        res["v3"]["first"] = staged(f"v3{n2}-detect-first", detect, w / f"v3{n2}" / "bundle", FIRST, FIRST_TARGET,
                                    w / f"d3a{n2}")  # fmt: skip
    _save(res)
    print("done", flush=True)


if __name__ == "__main__":
    main()
