"""Algorithm 1's cost: ``predeploy`` with this checkout's defaults against the defaults of an earlier commit
(``--before``, by default the last one before successive halving, channels-last and the precision probe), on the
same machine in one run, one command at a time (nothing else on the cores).

Models: two foreign BadNets made outside the project (``bench/outsider_badnet.py``: a small residual net with
BatchNorm and global pooling and torchvision's resnet18, both 3x32x32 normalised RGB as ONNX, a 5x5 X glyph at
(2, 2), target 7) and the project's cnn3 (``attack``: 2 poisoned + 1 clean epochs, 10% poisoning, target 0) on
checker4, square:4 and a noise blend (α 0.15). Each predeploy runs with its defaults only (plus the evaluation
trigger, which the heuristic never reads): wall time of the whole command, θ_aug's test CA and ASR, the pick (α,
γ), candidates trained. Seeds (``--seed`` of Algorithm 1: its noise and fine-tuning order) give the spread of the
pick. Then a stream (CPD 0.1, N 1,000) into the before's bundle and the repair (quick profile) with both commits on
that same quarantine: the repair's wall time beside it.

    python -m bench.bench_cost [--models resnet-small cnn3 resnet18] [--seeds 0 1] [--before REV] [--repair-for ...]

Each stage's result is kept under ``runs/bench-cost`` and reused when the bench runs again (delete it to measure
afresh); ``bench/results/cost.json`` is written after every stage, so a long run stopped early keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.bench_field import stage, trigger_pictures
from bench.common import ROOT, save

WORK = ROOT / "runs" / "bench-cost"
BEFORE = "ea691fa"  # the defaults before: the full grid, fp32, contiguous layout
FOREIGN = ("resnet-small", "resnet18")
CNN3_TRIGGERS = ("checker4", "square:4", "blend")


def cli(checkout: Path, *args: str) -> dict[str, Any]:
    """``python -m trainer ARGS --json --quiet`` from ``checkout`` (its own code), timed: the JSON report with
    ``wall_seconds`` (the whole command, start-up and bundle included) and ``exit_code``."""
    harness = ["--dataset", "fashion-mnist"] if args[0] in ("predeploy", "repair") else []
    cmd = [sys.executable, "-m", "trainer", *args, *harness, "--json", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=checkout, env=env)
    wall = round(time.monotonic() - t0, 1)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} printed nothing (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1]) | {"exit_code": proc.returncode, "wall_seconds": wall}


def checkout_of(rev: str) -> Path:
    """A git worktree of ``rev`` under the work folder (made once)."""
    path = WORK / f"checkout-{rev}"
    if not (path / "trainer").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), rev], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
    return path


def badnets(models: list[str], checkouts: dict[str, Path]) -> list[dict[str, Any]]:
    """The cases: (name, trigger, target, model door) per foreign model and per cnn3 trigger; made when missing."""
    specs = trigger_pictures(WORK / "triggers")
    cases = []
    for model in models:
        if model in FOREIGN:
            out = WORK / model
            if not (out / "model.onnx").is_file():
                subprocess.run([sys.executable, "-m", "bench.outsider_badnet", "--arch", model, "--out", str(out)],
                               check=True, cwd=ROOT)  # fmt: skip
            door = ["--model", str(out / "model.onnx"), "--preprocess", str(out / "preprocess.json")]
            kind, _, where = (out / "trigger.txt").read_text().strip().partition(":")  # image:PATH@R,C
            trigger = f"{kind}:{(ROOT / where).resolve()}"  # absolute: the commands run in the worktrees
            cases.append({"model": model, "trigger": "glyph", "spec": trigger, "target": "7", "door": door,
                          "work": out})  # fmt: skip
            continue
        for name in CNN3_TRIGGERS:
            w = WORK / f"cnn3-{name.replace(':', '-')}"
            made = stage(w / "attack.json", lambda w=w, name=name: cli(
                checkouts["after"], "attack", "--trigger", specs[name], "--target", "0", "--poison-fraction", "0.1",
                "--epochs", "2", "--clean-epochs", "1", "--seed", "0", "--out", str(w / "badnet")))  # fmt: skip
            cases.append({"model": "cnn3", "trigger": name, "spec": specs[name], "target": "0",
                          "door": ["--model", str(w / "badnet" / "model.pt")], "work": w,
                          "badnet": {k: made.get(k) for k in ("clean_accuracy", "attack_success_rate")}})  # fmt: skip
    return cases


def predeploy(case: dict[str, Any], side: str, checkout: Path, seed: int) -> dict[str, Any]:
    """One predeploy with ``checkout``'s defaults: wall time, the pick and θ_aug's test numbers."""
    w = case["work"] / f"{side}-seed{seed}"
    rep = stage(w.with_suffix(".json"), lambda: cli(
        checkout, "predeploy", *case["door"], "--out", str(w), "--seed", str(seed), "--eval-trigger", case["spec"],
        "--target", case["target"]))  # fmt: skip
    sel = rep.get("selected") or {}
    cands = rep.get("candidates") or []
    return {
        "wall_seconds": rep.get("wall_seconds"),
        "exit_code": rep.get("exit_code"),
        "error": rep.get("error"),
        "badnet": {k: (rep.get("baseline") or {}).get(k) for k in ("clean_accuracy", "attack_success_rate")},
        "alpha": sel.get("alpha"),
        "gamma": sel.get("gamma"),
        "test_ca": sel.get("test_ca"),
        "test_asr": sel.get("test_asr"),
        "candidates": len(cands),
        "epochs_trained": round(sum(c.get("epochs") or rep["config"]["epochs"] for c in cands), 2) if cands else 0,
        "rounds": len({c["round"] for c in cands}),
        "precision": rep.get("precision", "fp32"),
    }


def repair(case: dict[str, Any], checkouts: dict[str, Path]) -> dict[str, Any]:
    """A stream into the before's seed-0 bundle (a format both commits read), then the quick repair with each
    checkout on that same quarantine."""
    bundle = case["work"] / "before-seed0" / "bundle"
    q = case["work"] / "quarantine"
    st = stage(case["work"] / "stream.json", lambda: cli(
        checkouts["after"], "stream", "--bundle", str(bundle), "--trigger", case["spec"], "--target", case["target"],
        "--cpd", "0.1", "--n", "1000", "--out", str(q)))  # fmt: skip
    out: dict[str, Any] = {"rejected": st.get("rejected"), "recall": st.get("recall")}
    for side, checkout in checkouts.items():
        w = case["work"] / f"repair-{side}"
        rep = stage(w.with_suffix(".json"), lambda w=w, checkout=checkout: cli(
            checkout, "repair", "--bundle", str(bundle), "--quarantine", str(q), "--out", str(w), "--profile", "quick",
            "--eval-trigger", case["spec"], "--target", case["target"]))  # fmt: skip
        repaired = (rep.get("test") or {}).get("repaired") or {}
        out[side] = {"wall_seconds": rep.get("wall_seconds"), "exit_code": rep.get("exit_code"),
                     "test_ca": repaired.get("clean_accuracy"), "test_asr": repaired.get("attack_success_rate"),
                     "precision": ((rep.get("config") or {}).get("precision"))}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet-small", "cnn3", "resnet18"],
                    choices=("resnet-small", "cnn3", "resnet18"))  # fmt: skip
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--before", default=BEFORE, help="the commit whose defaults are the baseline")
    ap.add_argument("--after", default="HEAD", help="the commit measured (a worktree: edits meanwhile stay out)")
    ap.add_argument(
        "--repair-for",
        nargs="*",
        default=["resnet-small:glyph", "cnn3:blend", "resnet18:glyph"],
        metavar="MODEL:TRIGGER",
        help="the cases whose repair is timed too (none: predeploy only)",
    )
    args = ap.parse_args()
    after = subprocess.run(["git", "rev-parse", "--short", args.after], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip()  # fmt: skip
    checkouts = {"after": checkout_of(after), "before": checkout_of(args.before)}
    cases = badnets(args.models, checkouts)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()

    def write() -> None:
        save("cost", {"before": args.before, "after": after, "seeds": args.seeds, "rows": rows,
                      "seconds": round(time.monotonic() - started, 1)})  # fmt: skip

    def predeploys(seed: int, chosen: list[dict[str, Any]]) -> None:
        for case in chosen:
            row = {"model": case["model"], "trigger": case["trigger"], "seed": seed}
            for side, checkout in checkouts.items():
                row[side] = predeploy(case, side, checkout, seed)
                print(json.dumps(row), flush=True)
            rows.append(row)
            write()

    # every case once first, then the cheap model's other seeds, the repairs, the foreign models' other seeds: a
    # run stopped early keeps the most of the comparison
    predeploys(args.seeds[0], cases)
    for seed in args.seeds[1:]:
        predeploys(seed, [c for c in cases if c["model"] == "cnn3"])
    for case in cases:
        if f"{case['model']}:{case['trigger']}" in args.repair_for:
            rows.append({"model": case["model"], "trigger": case["trigger"], "repair": repair(case, checkouts)})
            print(json.dumps(rows[-1]), flush=True)
            write()
    for seed in args.seeds[1:]:
        predeploys(seed, [c for c in cases if c["model"] != "cnn3"])


if __name__ == "__main__":
    main()
