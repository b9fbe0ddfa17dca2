"""Pre-deployment treatment on several triggers: block vs pixel noise masks vs clean fine-tuning (γ = 0).

For each trigger: one BadNet (quick profile: 3-step, 1 clean + 2 poisoned epochs, 10% poisoning, target 0),
then Algorithm 1 three times with the same α schedule and budget: block mask (the authors' code), per-pixel
mask, and γ = 0 (clean fine-tuning, the control that shows what the noise adds). Each row is the heuristic's
pick: it never sees ASR; ASR is measured for this table only.

Usage: python bench/bench_predeploy.py [--triggers checker4 square:4 ...] [--epochs 3] [--max-rounds 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import ROOT, run_cli, save

VARIANTS = {
    "block": ["--noise-mode", "block"],
    "pixel": ["--noise-mode", "pixel"],
    "clean-ft (γ=0)": ["--gammas", "0.0"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--triggers", nargs="+", default=["checker4", "square:4"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-predeploy")
    args = ap.parse_args()
    rows = []
    for trig in args.triggers:
        tag = trig.replace(":", "-").replace("/", "_")
        t0 = time.monotonic()
        bd = run_cli(
            "attack",
            "--trigger",
            trig,
            "--target",
            "0",
            "--poison-fraction",
            "0.1",
            "--epochs",
            "2",
            "--clean-epochs",
            "1",
            "--seed",
            "0",
            "--out",
            str(args.work / tag / "badnet"),
        )
        attack_s = time.monotonic() - t0
        print(
            f"{trig}: BadNet CA {bd['clean_accuracy']:.4f} ASR {bd['attack_success_rate']:.4f} ({attack_s:.0f} s)",
            flush=True,
        )
        for name, flags in VARIANTS.items():
            t0 = time.monotonic()
            out = run_cli(
                "predeploy",
                "--model",
                str(args.work / tag / "badnet" / "model.pt"),
                "--out",
                str(args.work / tag / name.split()[0]),
                "--eval-trigger",
                trig,
                "--target",
                "0",
                "--epochs",
                str(args.epochs),
                "--max-rounds",
                str(args.max_rounds),
                *flags,
            )
            secs = time.monotonic() - t0
            sel = out.get("selected") or {}
            row = {
                "trigger": trig,
                "variant": name,
                "badnet_ca": bd["clean_accuracy"],
                "badnet_asr": bd["attack_success_rate"],
                "aug_ca": sel.get("test_ca"),
                "aug_asr": sel.get("test_asr"),
                "alpha": sel.get("alpha"),
                "gamma": sel.get("gamma"),
                "eval_ca": sel.get("eval_ca"),
                "threshold": out.get("threshold"),
                "candidates": len(out.get("candidates", [])),
                "best_asr_any_candidate": min(
                    (c["test_asr"] for c in out.get("candidates", []) if c.get("test_asr") is not None), default=None
                ),
                "seconds": round(secs, 1),
                "attack_seconds": round(attack_s, 1),
                "exit_code": out["exit_code"],
            }
            rows.append(row)
            print(
                f"  {name:>15}: pick α={row['alpha']} γ={row['gamma']} -> CA {row['aug_ca']} ASR {row['aug_asr']} "
                f"({secs:.0f} s)",
                flush=True,
            )
            save("predeploy", {"epochs": args.epochs, "max_rounds": args.max_rounds, "rows": rows})


if __name__ == "__main__":
    main()
