"""The monitor as a detector (issue 14): `nnoc-trainer detect-eval` on each bundle and trigger given, every
score's AUROC and recall at fixed clean-reject rates, the label-free operating point (τ from clean D_eval) and the
paper's rule, on the test split (evaluation: the trigger is read here, never by the rule).

    python -m bench.bench_detect [--case NAME BUNDLE TRIGGER TARGET ...]

Default cases: the foreign models of bench_foreign (their own X glyph, target 7), where they exist.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, machine, run_cli, save

FOREIGN = ROOT / "runs" / "bench-foreign"


def cases(given: list[list[str]] | None) -> list[tuple[str, Path, str, int]]:
    if given:
        return [(name, Path(bundle), trigger, int(target)) for name, bundle, trigger, target in given]
    out = []
    for arch in ("resnet18", "resnet-small"):
        bundle = FOREIGN / arch / "predeploy" / "bundle"
        if (bundle / "manifest.pb").is_file():
            out.append((f"foreign {arch}", bundle, (FOREIGN / arch / "trigger.txt").read_text().strip(), 7))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--case", nargs=4, action="append", metavar=("NAME", "BUNDLE", "TRIGGER", "TARGET"))
    args = ap.parse_args()
    path = RESULTS / "detect.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    for name, bundle, trigger, target in cases(args.case):
        out = ROOT / "runs" / "bench-detect" / name.replace(" ", "-")
        report = run_cli("detect-eval", "--bundle", str(bundle), "--trigger", trigger, "--target", str(target),
                         "--out", str(out), "--test-size", "5000", "--baselines", "500")  # fmt: skip
        row: dict[str, Any] = {"name": name, "trigger": trigger, "machine": machine(), **report}
        print(json.dumps({k: row.get(k) for k in ("name", "auroc", "recall", "clean_reject_rate")}), flush=True)
        rows = [r for r in rows if r["name"] != name] + [row]
        save("detect", {"rows": rows})


if __name__ == "__main__":
    main()
