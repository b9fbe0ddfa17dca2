"""Post-deployment repair: CPD sweep and what each step adds, side by side on the same BadNet and θ_aug.

Starts from the outputs of ``bench.bench_predeploy`` (BadNet + heuristic θ_aug, block noise). For each CPD a
stream of N inputs is played through the bundle; the quarantine then feeds the repair variants:

- ``purified``: the default repair (quarantine purified by the label-excess filter, CycleGAN, fine-tune θ_aug);
- ``raw``: the same on the unfiltered quarantine;
- ``clean-ft``: no trigger learner, fine-tuning on clean D_treat alone;
- ``bd-base``: the default, fine-tuning θ_bd (the paper's Algorithm 2) instead of θ_aug;
- ``clean-ft-bd``: fine-tuning θ_bd on clean D_treat alone (what the CycleGAN adds to ``bd-base``).

Purity (share of the CycleGAN's quarantine that was really poisoned) is computed here from the stream's
``truth.json``; the repair never sees it.

Usage: python -m bench.bench_repair [--trigger checker4] [--cpds 0.02 0.05 0.1 0.2 0.5] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, ROOT, run_cli, save
from edge_agent.formats.preprocess import Preprocess
from trainer.service.quarantine import QuarantineStore

VARIANTS: dict[str, list[str]] = {
    "purified": [],
    "raw": ["--purify", "none"],
    "clean-ft": ["--learner", "none", "--unlearn-quarantine", "0"],
    "bd-base": ["--repair-base", "bd"],
    "clean-ft-bd": ["--learner", "none", "--repair-base", "bd", "--unlearn-quarantine", "0"],
}


def purity(qdir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Poisoned share of the quarantine and of what the repair kept (evaluation only, from truth.json)."""
    truth = json.loads((qdir / "truth.json").read_text())
    poisoned = set(truth["poisoned_seq"])
    with QuarantineStore(qdir, create=False) as store:
        q = store.load(Preprocess())
    is_p = np.array([seq in poisoned for _, seq in q.keys], dtype=bool)
    kept = {tuple(k) for k in report.get("kept_keys", [])}
    keep = np.array([tuple(k) in kept for k in q.keys], dtype=bool)
    return {
        "raw_size": len(q),
        "raw_purity": float(is_p.mean()) if len(q) else None,
        "kept": int(keep.sum()),
        "kept_purity": float(is_p[keep].mean()) if keep.any() else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trigger", default="checker4")
    ap.add_argument("--cpds", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.5])
    ap.add_argument("--variants", nargs="+", default=["purified"], choices=sorted(VARIANTS))
    ap.add_argument("--variants-at", type=float, default=0.1, help="CPD at which the non-default variants run")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--predeploy", type=Path, default=None, help="bench_predeploy's block-mode output folder")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-repair")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for 'nnoc-trainer repair'")
    args = ap.parse_args()
    tag = args.trigger.replace(":", "-").replace("/", "_")
    pd_dir = args.predeploy or ROOT / "runs" / "bench-predeploy" / tag / "block"
    badnet = pd_dir / "primary.pt"  # the suspect as predeploy saved it (the bundle's provenance names this file)
    pd_report = json.loads((pd_dir / "report.json").read_text())
    out_path = RESULTS / f"repair-{tag}.json"
    rows: list[dict[str, Any]] = json.loads(out_path.read_text())["rows"] if out_path.is_file() else []
    base_row = {
        "trigger": args.trigger,
        "badnet_ca": pd_report["baseline"]["clean_accuracy"],
        "badnet_asr": pd_report["baseline"]["attack_success_rate"],
        "aug_ca": pd_report["selected"]["test_ca"],
        "aug_asr": pd_report["selected"]["test_asr"],
    }
    for cpd in args.cpds:
        qdir = args.work / tag / f"cpd{cpd}" / "quarantine"
        stream = run_cli(
            "stream",
            "--bundle",
            str(pd_dir / "bundle"),
            "--trigger",
            args.trigger,
            "--target",
            "0",
            "--cpd",
            str(cpd),
            "--n",
            str(args.n),
            "--seed",
            "0",
            "--out",
            str(qdir),
        )
        variants = [v for v in args.variants if v == "purified" or abs(cpd - args.variants_at) < 1e-9]
        for variant in variants:
            t0 = time.monotonic()
            out = run_cli(
                "repair",
                "--bundle",
                str(pd_dir / "bundle"),
                "--quarantine",
                str(qdir),
                "--primary-checkpoint",
                str(badnet),
                "--monitor-checkpoint",
                str(pd_dir / "monitor.pt"),
                "--out",
                str(args.work / tag / f"cpd{cpd}" / variant),
                "--eval-trigger",
                args.trigger,
                "--target",
                "0",
                *VARIANTS[variant],
                *args.extra,
            )
            secs = time.monotonic() - t0
            rep = out.get("test", {}).get("repaired", {})
            row = {
                **base_row,
                "cpd": cpd,
                "variant": variant,
                "rejected": stream["rejected"],
                "recall": stream["recall"],
                "precision": stream["precision"],
                **purity(qdir, out),
                "repaired_ca": rep.get("clean_accuracy"),
                "repaired_asr": rep.get("attack_success_rate"),
                "published": out.get("published"),
                "gan_best_score": out.get("cyclegan", {}).get("best_score"),
                "gan_epochs_run": out.get("cyclegan", {}).get("epochs_run"),
                "flip_rate_after": out.get("label_free", {}).get("flip_rate_repaired_on_G_eval"),
                "seconds": round(secs, 1),
                "exit_code": out["exit_code"],
                "error": out.get("error"),
            }
            rows = [r for r in rows if not (r["cpd"] == cpd and r["variant"] == variant)] + [row]
            print(
                f"{args.trigger} cpd={cpd} {variant}: CA {row['repaired_ca']} ASR {row['repaired_asr']} "
                f"(kept {row['kept']}, purity {row['kept_purity']}, {secs:.0f} s)",
                flush=True,
            )
            save(f"repair-{tag}", {"trigger": args.trigger, "n": args.n, "extra": args.extra, "rows": rows})


if __name__ == "__main__":
    main()
