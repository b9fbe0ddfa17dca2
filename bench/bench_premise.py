"""Attackers aimed at NNoculation's premise, end to end through the service (issue 39): each attacker's BadNet (the
one bench_field made for its cell) defended by `nnoc-trainer demo --model` (quick profile): predeploy, `serve`, two
`nnoc-edge run` agents fed a stream with 10% triggered frames, the quarantine, the service's own repair job, v2 on
every agent, measured through the agents' inference endpoints.

Results: bench/results/premise.json (rendered into BENCHMARKS.md by bench.report). A finished demo's report under
``runs/bench-premise/ATTACKER/report.json`` is kept (``--again`` runs it anew).

    python -m bench.bench_premise [--attackers noise-robust resilient] [--seed 0] [--threads N] [--again]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

from bench.bench_field import WORK as FIELD
from bench.common import RESULTS, ROOT, machine, run_cli, save

WORK = ROOT / "runs" / "bench-premise"


def defend(attacker: str, trigger: str, seed: int, again: bool) -> dict[str, Any]:
    """The demo's report for the cell ``trigger+attacker``'s BadNet (run unless kept)."""
    out = WORK / attacker
    kept = out / "report.json"
    if kept.is_file() and not again:
        return dict(json.loads(kept.read_text()))
    badnet = FIELD / f"{trigger}+{attacker}" / f"seed{seed}" / "badnet" / "model.pt"
    if not badnet.is_file():
        raise SystemExit(f"no BadNet at {badnet}: run python -m bench.bench_field --attacker {attacker} first")
    shutil.rmtree(out, ignore_errors=True)
    report = run_cli("demo", "--model", str(badnet), "--trigger", trigger, "--target", "0", "--profile", "quick",
                     "--out", str(out))  # fmt: skip
    if report.get("exit_code"):
        raise SystemExit(f"demo failed for {attacker}: {report}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--attackers", nargs="+", default=["noise-robust", "resilient"])
    ap.add_argument("--trigger", default="checker4")
    ap.add_argument("--seed", type=int, default=0, help="the bench_field seed whose BadNet is defended")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of every process (default: torch's)")
    ap.add_argument("--again", action="store_true", help="run a kept demo again")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    path = RESULTS / "premise.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else {}
    for attacker in args.attackers:
        report = defend(attacker, args.trigger, args.seed, args.again)
        runs[attacker] = {"trigger": args.trigger, "seed": args.seed, "report": report}
        save("premise", {"runs": runs, "machine": machine()})
        print(json.dumps({"attacker": attacker, "after": report.get("after")}), flush=True)


if __name__ == "__main__":
    main()
