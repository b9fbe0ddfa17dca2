"""The defense against the field, on our own BadNets (issues 14 and 15): for each trigger and seed, one BadNet, the
heuristic θ_aug, the monitor as a detector, a stream at CPD 0.1 (N = 1000), the CycleGAN repair and the
post-training defenses of the field on the same BadNet and the same clean data budget.

Stages per cell (each writes its own JSON under ``--work``; a finished stage is not run again, so the bench
resumes where it stopped):

1. ``attack``: the BadNet (the attack command's defaults, ``--seed``);
2. ``predeploy``: Algorithm 1 (``--epochs 3 --max-rounds 3`` as bench_predeploy; ASR read for this table only);
3. ``detect``: ``detect-eval`` on the v1 bundle (AUROC, recall at 1% clean rejects, label-free point, STRIP and
   SCALE-UP on 500 + 500 inputs);
4. ``stream``: N = 1000 at CPD 0.1 through the bundle (quarantine);
5. ``repair``: the default repair (quick profile); ``reset-channels`` / ``reset-head``: the same with ``--reset
   trigger-channels`` / ``--reset head``; ``detect-v2``: ``detect-eval`` on v2 (served CA and clean rejects
   of every score at its label-free point); ``clean-ft``: θ_aug fine-tuned on clean D_treat alone (``--learner
   none --repair-base aug``: the stronger clean-only control; θ_bd's is in bench_recipe);
6. ``fine-pruning``, ``neural-cleanse``, ``ft-sam`` and ``fst``: ``nnoc-trainer defend`` on the BadNet;
7. ``retune``: the retuning attack (Min et al., NeurIPS 2024; ``trainer.stages.retune``): each model of the cell
   (the BadNet, θ_aug, θ_repair and its two resets, clean fine-tuning, fine-pruning, Neural Cleanse, FT-SAM, FST,
   and a model of the same recipe that never saw the trigger) fine-tuned on 5 or 20 of the attacker's poisoned
   samples among 500 clean ones; the ASR it returns to.

Triggers: ``checker4``, ``square:4``, an ``image:`` paste of a glyph made here and a ``blend:`` of a noise picture
made here at opacity 0.15 (none of the defaults was tuned on the last two).

``--attacker``: BadNets of attackers who know the defense, in cells ``TRIGGER+ATTACKER`` of their own:
``adaptiveEPS`` compares logits (its poisoned rows learn label-smoothed targets, ``attack --adaptive-smoothing EPS``);
``noise-robust`` trains on Algorithm 1's own noise (``attack --noise-robust``); ``resilient`` is SBL-style
(``attack --resilient``); ``noise-robust+resilient`` both.

``--threads N`` sizes every command's torch pool (two torch processes on 2 cores slow each other many times over).

    python -m bench.bench_field [--triggers checker4 square:4 paste blend] [--seeds 0 1] [--stages ...]
        [--attacker adaptive0.3|noise-robust|resilient|noise-robust+resilient] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, ROOT, machine, run_cli, save

WORK = ROOT / "runs" / "bench-field"
STAGES = (
    "attack", "predeploy", "detect", "stream", "repair", "detect-v2", "clean-ft", "fine-pruning", "neural-cleanse",
    "ft-sam", "fst", "reset-channels", "reset-head", "retune",
)  # fmt: skip
ATTACKERS = {"noise-robust": ("--noise-robust",), "resilient": ("--resilient",),
             "noise-robust+resilient": ("--noise-robust", "--resilient")}  # fmt: skip


def attacker_args(name: str) -> tuple[str, ...]:
    """The ``attack`` flags of an attacker named on the command line (``adaptiveEPS`` or one of ATTACKERS)."""
    if name.startswith("adaptive"):
        return (f"--adaptive-smoothing={float(name[len('adaptive') :]):g}",)
    try:
        return ATTACKERS[name]
    except KeyError:
        raise SystemExit(f"unknown attacker {name!r}: adaptiveEPS or one of {', '.join(ATTACKERS)}") from None


QUICK = ["--profile", "quick"]


def trigger_pictures(folder: Path) -> dict[str, str]:
    """The trigger specs, with the two pictures made here (deterministic) written into ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    glyph = folder / "glyph.png"  # a 5x5 ring with a dot, gray on white, opaque
    ring = np.full((5, 5), 255, np.uint8)
    ring[1:4, 1:4] = 40
    ring[2, 2] = 255
    Image.fromarray(ring, mode="L").save(glyph)
    noise = folder / "noise.png"  # uniform RGB noise (Chen et al.'s blended attack uses random patterns too)
    Image.fromarray(np.random.default_rng(1234).integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(noise)
    return {
        "checker4": "checker4",
        "square:4": "square:4",
        "paste": f"image:{glyph}@3,19",
        "blend": f"blend:{noise}:0.15",
    }


def stage(path: Path, fn: Any) -> dict[str, Any]:
    """Run ``fn`` unless ``path`` holds its earlier result; returns the result (with its seconds)."""
    if path.is_file():
        return dict(json.loads(path.read_text()))
    t0 = time.monotonic()
    out = fn()
    out["seconds"] = round(time.monotonic() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return dict(out)


def cell(name: str, spec: str, seed: int, stages: set[str], attack_args: tuple[str, ...] = ()) -> dict[str, Any]:
    w = WORK / name / f"seed{seed}"
    res: dict[str, Any] = {"trigger": name, "spec": spec, "seed": seed}
    ev = ["--eval-trigger", spec, "--target", "0"]
    if "attack" in stages:
        res["attack"] = stage(w / "attack.json", lambda: run_cli(
            "attack", "--trigger", spec, "--target", "0", "--seed", str(seed), *attack_args, "--out",
            str(w / "badnet")))  # fmt: skip
    pd = w / "predeploy"
    if "predeploy" in stages:
        res["predeploy"] = stage(w / "predeploy.json", lambda: run_cli(
            "predeploy", "--model", str(w / "badnet" / "model.pt"), "--out", str(pd), "--seed", str(seed),
            "--epochs", "3", "--max-rounds", "3", *ev))  # fmt: skip
    if "detect" in stages:
        res["detect"] = stage(w / "detect.json", lambda: run_cli(
            "detect-eval", "--bundle", str(pd / "bundle"), "--trigger", spec, "--target", "0", "--out",
            str(w / "detect"), "--test-size", "5000", "--baselines", "500"))  # fmt: skip
    q = w / "cpd0.1" / "quarantine"
    if "stream" in stages:
        res["stream"] = stage(w / "stream.json", lambda: run_cli(
            "stream", "--bundle", str(pd / "bundle"), "--trigger", spec, "--target", "0", "--cpd", "0.1",
            "--n", "1000", "--seed", str(seed), "--out", str(q)))  # fmt: skip
    # the checkpoints predeploy wrote beside the bundle (its provenance names them)
    base = ["--bundle", str(pd / "bundle"), "--quarantine", str(q), *ev, *QUICK]
    if "repair" in stages:
        res["repair"] = stage(w / "repair.json", lambda: run_cli("repair", *base, "--out", str(w / "repair")))
        if res["repair"].get("kept_keys") is not None:  # evaluation only: the stream's truth.json
            from bench.bench_repair import purity

            res["purity"] = purity(q, res["repair"])
    for reset, name in (("trigger-channels", "reset-channels"), ("head", "reset-head")):
        if name in stages:
            res[name] = stage(w / f"{name}.json", lambda r=reset, n=name: run_cli(
                "repair", *base, "--reset", r, "--out", str(w / n)))  # fmt: skip
    if "detect-v2" in stages and (w / "repair" / "bundle" / "manifest.pb").is_file():
        res["detect-v2"] = stage(w / "detect-v2.json", lambda: run_cli(
            "detect-eval", "--bundle", str(w / "repair" / "bundle"), "--trigger", spec, "--target", "0", "--out",
            str(w / "detect-v2"), "--test-size", "5000"))  # fmt: skip
    if "clean-ft" in stages:
        res["clean-ft"] = stage(w / "clean-ft.json", lambda: run_cli(
            "repair", *base, "--learner", "none", "--unlearn-quarantine", "0", "--repair-base", "aug", "--out",
            str(w / "clean-ft")))  # fmt: skip
    for method in ("fine-pruning", "neural-cleanse", "ft-sam", "fst"):
        if method in stages:
            res[method] = stage(w / f"{method}.json", lambda m=method: run_cli(
                "defend", "--method", m, "--model", str(w / "badnet" / "model.pt"), "--out", str(w / m),
                "--seed", str(seed), *ev))  # fmt: skip
    if "retune" in stages:
        res["retune"] = stage(w / "retune.json", lambda: retune_cell(w, spec, seed))
    return res


def clean_model(seed: int, splits: Any) -> Any:
    """A cnn3 of the attack's recipe (its clean step) that never saw a trigger: the retuning attack's floor."""
    from edge_agent.formats.spec import InputSpec
    from trainer.science.models import Checkpoint, Preprocessed, build_model
    from trainer.science.training import train
    from trainer.stages.attack import AttackConfig

    path = WORK / "clean" / f"seed{seed}" / "model.pt"
    if path.is_file():
        return Checkpoint.load(path)
    cfg = AttackConfig(seed=seed)
    spec = InputSpec.for_image(splits.image_shape, None)
    model = Preprocessed(build_model(cfg.architecture, spec.image_shape, len(splits.class_names)), spec.preprocess)
    train(model, splits.train.images, splits.train.labels, cfg.train, seed, desc="clean", quiet=True,
          channels_last=False)  # fmt: skip
    ckpt = Checkpoint.from_model(model, cfg.architecture, spec, splits.class_names, cfg.train.to_dict(), {})
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save(path)
    return ckpt


def retune_cell(w: Path, spec: str, seed: int) -> dict[str, Any]:
    """The retuning attack on every model of the cell that exists (the BadNet first)."""
    from trainer.science.data import DataConfig, SplitConfig, load_splits
    from trainer.science.models import Checkpoint
    from trainer.science.triggers import parse_trigger
    from trainer.stages.retune import RetuneConfig, retune

    splits = load_splits(DataConfig(), SplitConfig())
    paths = {
        "badnet": w / "badnet" / "model.pt",
        "theta_aug": w / "predeploy" / "monitor.pt",
        "theta_repair": w / "repair" / "primary.pt",
        "clean-ft": w / "clean-ft" / "primary.pt",
        "fine-pruning": w / "fine-pruning" / "model.pt",
        "neural-cleanse": w / "neural-cleanse" / "model.pt",
        "ft-sam": w / "ft-sam" / "model.pt",
        "fst": w / "fst" / "model.pt",
        "reset-channels": w / "reset-channels" / "primary.pt",
        "reset-head": w / "reset-head" / "primary.pt",
    }
    models = {name: Checkpoint.load(p) for name, p in paths.items() if p.is_file()}
    models["never-poisoned"] = clean_model(seed, splits)
    return retune(models, splits, parse_trigger(spec), 0, RetuneConfig(seed=seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--triggers", nargs="+", default=["checker4", "square:4", "paste", "blend"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--attacker", default=None,
                    help="an attacker who knows the defense: adaptiveEPS, " + ", ".join(ATTACKERS))  # fmt: skip
    ap.add_argument("--threads", type=int, default=None, help="torch threads of every command (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        import os

        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the commands this bench starts
        torch.set_num_threads(args.threads)
    specs = trigger_pictures(WORK / "triggers")
    path = RESULTS / "field.json"
    cells = json.loads(path.read_text())["cells"] if path.is_file() else []
    for seed in args.seeds:
        for trigger in args.triggers:
            name = f"{trigger}+{args.attacker}" if args.attacker else trigger
            extra = attacker_args(args.attacker) if args.attacker else ()
            res = cell(name, specs[trigger], seed, set(args.stages), extra)
            res["machine"] = machine()
            old = [c for c in cells if (c["trigger"], c["seed"]) == (name, seed)]
            res = {**(old[0] if old else {}), **res}
            cells = [c for c in cells if (c["trigger"], c["seed"]) != (name, seed)] + [res]
            save("field", {"cells": cells})
            print(json.dumps({"trigger": name, "seed": seed, "stages": [s for s in STAGES if s in res]}), flush=True)


if __name__ == "__main__":
    main()
