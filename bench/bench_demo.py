"""The end-to-end loop as a benchmark: run `nnoc-trainer demo` (quick profile) and keep its report.

Usage: python -m bench.bench_demo [--profile quick] [--from runs/demo/report.json]
(--from records a report of a demo that already ran on this machine instead of running it again.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import ROOT, run_cli, save


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--from", dest="source", type=Path, default=None)
    args = ap.parse_args()
    if args.source is not None:
        report = json.loads(args.source.read_text())
    else:
        report = run_cli("demo", "--profile", args.profile, "--out", str(ROOT / "runs" / "bench-demo"))
        if report.get("exit_code"):
            raise SystemExit(f"demo failed: {report}")
    save("demo", {"report": report})


if __name__ == "__main__":
    main()
