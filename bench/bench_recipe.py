"""The repair's fine-tuning recipe, side by side (issue 15's CA drop): on each field cell's CPD-0.1 quarantine and
the same CycleGAN, which model is fine-tuned (θ_bd or θ_aug), how the learning rate runs (held or annealed along
a cosine) and how strong the learned trigger is made (``--trigger-gain``: 1, or the default that strengthens it
until θ_bd follows it); the purified quarantine unlearned (``--unlearn-quarantine W``) with and without the
CycleGAN; clean fine-tuning of each base under the same schedule as the control.

The CycleGAN is fitted once per cell (the first variant that needs it) and reused by the others (the repair
resumes a finished ``cyclegan.pt``), so only the fine-tuning differs. ``--next-monitor keep``: the monitor does not
change the primary's CA / ASR, and a refresh would cost a treatment run per variant. Cells come from
``bench_field`` (its ``attack`` and ``predeploy`` stages; the stream is run here when missing).

    python -m bench.bench_recipe [--triggers checker4 blend ...] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from bench.bench_field import QUICK, WORK, cell, stage, trigger_pictures
from bench.common import RESULTS, machine, run_cli, save

# name -> the repair's flags; the last two are the controls (clean D_treat alone, no trigger learner, nothing
# unlearned). The CycleGAN rows were the default until 6ab4909 (2026-11-27); the quarantine unlearned without it
# since then
CYCLEGAN = ["--learner", "cyclegan"]
NO_UNLEARN = ["--unlearn-quarantine", "0"]
VARIANTS: dict[str, list[str]] = {
    "θ_aug, held lr, gain 1": [*CYCLEGAN, *NO_UNLEARN, "--repair-base", "aug", "--lr-schedule", "constant",
                               "--trigger-gain", "1"],
    "θ_bd, held lr, gain 1": [*CYCLEGAN, *NO_UNLEARN, "--repair-base", "bd", "--lr-schedule", "constant",
                              "--trigger-gain", "1"],
    "θ_bd, cosine, gain 1": [*CYCLEGAN, *NO_UNLEARN, "--repair-base", "bd", "--lr-schedule", "cosine",
                             "--trigger-gain", "1"],
    "CycleGAN (θ_bd, cosine, gain auto)": [*CYCLEGAN, *NO_UNLEARN],
    "θ_aug, cosine, gain auto": [*CYCLEGAN, *NO_UNLEARN, "--repair-base", "aug"],
    "base auto (cosine, gain auto)": [*CYCLEGAN, *NO_UNLEARN, "--repair-base", "auto"],
    "CycleGAN + unlearn quarantine 0.5": [*CYCLEGAN, "--unlearn-quarantine", "0.5"],
    "CycleGAN + unlearn quarantine 1": [*CYCLEGAN, "--unlearn-quarantine", "1"],
    "default (θ_bd, unlearn quarantine 0.5)": [],
    "unlearn quarantine 1": ["--unlearn-quarantine", "1"],
    "unlearn quarantine 2": ["--unlearn-quarantine", "2"],
    "clean-ft θ_aug (cosine)": ["--learner", "none", *NO_UNLEARN, "--repair-base", "aug"],
    "clean-ft θ_bd (cosine)": ["--learner", "none", *NO_UNLEARN, "--repair-base", "bd"],
}  # fmt: skip


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def repair_variant(out: Path, common: list[str], flags: list[str], gan: Path) -> dict[str, Any]:
    """One repair variant into ``out`` (its report cached beside it as ``out``.json). A CycleGAN variant resumes the
    case's fitted ``gan`` when there is one, and the one it used or fitted becomes the case's (a stale shared one is
    refitted)."""
    if gan.is_file() and "cyclegan" in flags and not (out / "cyclegan.pt").is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(gan, out / "cyclegan.pt")
    rep = stage(out.with_suffix(".json"), lambda: run_cli("repair", *common, *flags, "--out", str(out)))
    if (out / "cyclegan.pt").is_file():
        gan.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "cyclegan.pt", gan)
    return rep


def recipe_cell(trigger: str, spec: str, seed: int, only: list[str] | None = None) -> dict[str, Any]:
    w = WORK / trigger / f"seed{seed}"
    if not (w / "predeploy" / "bundle" / "manifest.pb").is_file():
        raise SystemExit(f"{w}: no v1 bundle; run `python -m bench.bench_field --triggers {trigger} --seeds {seed}`")
    cell(trigger, spec, seed, {"stream"})  # the quarantine (cached)
    q = w / "cpd0.1" / "quarantine"
    common = ["--bundle", str(w / "predeploy" / "bundle"), "--quarantine", str(q), "--eval-trigger", spec,
              "--target", "0", *QUICK, "--next-monitor", "keep"]  # fmt: skip
    gan = w / "recipe" / "cyclegan.pt"
    if not gan.is_file() and (w / "repair" / "cyclegan.pt").is_file():  # bench_field's repair fitted the same one
        gan.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(w / "repair" / "cyclegan.pt", gan)
    res: dict[str, Any] = {"trigger": trigger, "seed": seed, "attack": json.loads((w / "attack.json").read_text())}
    for name, flags in VARIANTS.items():
        if only and name not in only:
            continue
        rep = repair_variant(w / "recipe" / slug(name), common, flags, gan)
        res[name] = {
            "exit_code": rep.get("exit_code"),
            "error": rep.get("error"),
            "test": (rep.get("test") or {}).get("repaired"),
            "repair_set": rep.get("repair_set"),
            "config": {k: (rep.get("config") or {}).get(k) for k in ("base", "learner", "schedule", "trigger_gain")},
        }
        print(json.dumps({"trigger": trigger, "seed": seed, "variant": name, "test": res[name]["test"]}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triggers", nargs="+", default=["checker4", "square:4", "paste", "blend"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), metavar="NAME",
                    help="run only these variants (default: all); the cell's other results are kept")  # fmt: skip
    args = ap.parse_args()
    specs = trigger_pictures(WORK / "triggers")
    path = RESULTS / "recipe.json"
    cells: list[dict[str, Any]] = json.loads(path.read_text())["cells"] if path.is_file() else []
    for seed in args.seeds:
        for trigger in args.triggers:
            old = [c for c in cells if (c["trigger"], c["seed"]) == (trigger, seed)]
            res = {**(old[0] if old else {}), **recipe_cell(trigger, specs[trigger], seed, args.variants)}
            res["machine"] = machine()
            cells = [c for c in cells if (c["trigger"], c["seed"]) != (trigger, seed)] + [res]
            save("recipe", {"variants": list(VARIANTS), "cells": cells})


if __name__ == "__main__":
    main()
