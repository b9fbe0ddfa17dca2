"""``nnoc-trainer``: the trainer's command line. It parses flags into configs and calls the stages."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_agent.console import write_out
from edge_agent.options import (
    add_flags,
    add_spec_flag,
    config_values,
    flag_defaults,
    fraction,
    from_args,
    option_value,
    out_folder,
    positive,
    positive_float,
    safe_name,
    short_help,
    spec_dict,
    spec_flags,
)
from trainer.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_GATE

log = logging.getLogger("trainer")


def _check_target(target: int | None, splits: Any) -> None:
    classes = len(splits.class_names)
    if target is not None and not 0 <= target < classes:
        raise ValueError(f"--target {target}: no target class {target}; the dataset has classes 0 to {classes - 1}")


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    g.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    g.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO, WARNING with --quiet)")


HARNESS_SPLIT = ("valid", "stream", "train", "test")
DATA_PARTS = ("data", "split", "harness")  # a spec's data parts: their flags are added by _add_data


def _add_data(p: argparse.ArgumentParser, product: bool) -> None:
    """The data flags: on the product's commands (``product``) the defender's own photos (``--data``) or, instead,
    the evaluation harness' dataset and splits (``--dataset``, named explicitly); elsewhere the harness' alone."""
    from trainer.science.data import DataConfig, DefenderData, SplitConfig

    if not product:
        g = p.add_argument_group("data (evaluation harness: the paper's splits)")
        add_flags(g, DataConfig)
        add_flags(g, SplitConfig)
        return
    g = p.add_argument_group("your data")
    add_flags(g, DefenderData)
    add_flags(g, SplitConfig, only=("eval_fraction", "seed"))
    h = p.add_argument_group("evaluation harness data (instead of --data: a dataset cut into the paper's splits)")
    add_flags(h, DataConfig)
    add_flags(h, SplitConfig, only=HARNESS_SPLIT)
    p.set_defaults(dataset=None)  # the harness is named, never fallen into
    for action in h._group_actions:
        if action.dest == "dataset":
            action.help = "the evaluation harness' dataset (named; no default here: your photos are --data)"


def _splits(args: argparse.Namespace, fit: Any = None) -> tuple[Any, dict[str, Any]]:
    """The data flags' splits and their description; ``fit``: the model's preprocessing block (an ImageFolder of
    mixed sizes is brought to its size with its resize rule)."""
    from trainer.science.data import DataConfig, DefenderData, SplitConfig, load_defender, load_splits

    own = from_args(DefenderData, args) if hasattr(args, "data") else DefenderData()
    if own.path is not None:
        if args.dataset is not None:
            raise ValueError("give --data (your photos) or --dataset (the evaluation harness), not both")
        splits = load_defender(own.path, args.eval_fraction, args.split_seed, fit)
        meta = {"data": str(own.path), "eval_fraction": args.eval_fraction, "split_seed": args.split_seed}
        return splits, meta | {"split_sizes": splits.sizes()}
    if args.dataset is None:
        raise ValueError(
            f"'{args.command}' needs your clean labelled photos: --data DIR (a folder per class; or idx files, or a "
            "CSV of path,label), or a model card (--card); the evaluation harness' data is named with --dataset"
        )
    data, split = from_args(DataConfig, args), from_args(SplitConfig, args)
    splits = load_splits(data, split, fit)
    meta = {
        "dataset": data.name,
        "data_dir": str(data.data_dir) if data.data_dir else None,
        "split": {**split.__dict__},
        "split_sizes": splits.sizes(),
    }
    return splits, meta


def _check_harness(splits: Any, flag: str, value: Any) -> None:
    """Evaluation-only flags need the harness' test split; the defender's photos are all D_valid."""
    if value is not None and splits.defender:
        raise ValueError(
            f"{flag} is evaluation only: it measures on the evaluation harness' test split (--dataset ...); your "
            "photos (--data) are all D_valid"
        )


def _bundle_splits(args: argparse.Namespace) -> Any:
    """The data flags' splits fitted to ``args.bundle``'s preprocessing and, for your own photos, labelled in its
    class order (folders matched by name). When the manifest cannot be read the command says what is wrong with the
    bundle when it loads it, after the data checks."""
    from edge_agent.formats.bundle import BundleError, read_manifest
    from edge_agent.formats.spec import preprocess_of

    try:
        manifest = read_manifest(args.bundle)
    except (BundleError, OSError):
        manifest = None
    splits, _ = _splits(args, preprocess_of(manifest.input_spec) if manifest is not None else None)
    names = tuple(manifest.class_names) if manifest is not None else ()
    if names and (splits.defender or set(names) == set(splits.class_names)):
        splits = splits.relabelled(names)
    return splits


def cmd_attack(args: argparse.Namespace) -> dict[str, Any]:
    """Train a BadNet (evaluation harness)."""
    from edge_agent.formats.preprocess import Preprocess
    from trainer.science.training import TrainConfig
    from trainer.stages.attack import AttackConfig, run_attack

    block = Preprocess.load(args.preprocess) if args.preprocess is not None else None
    splits, meta = _splits(args, block)
    _check_target(args.target, splits)
    cfg = from_args(AttackConfig, args, train=from_args(TrainConfig, args))
    return run_attack(cfg, splits, args.out, meta, quiet=args.quiet, preprocess=block)


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """CA (and ASR with a trigger) of a suspect, treated or repaired model (any door; triggers on the raw data)."""
    from trainer.science.metrics import evaluate
    from trainer.science.triggers import parse_trigger
    from trainer.stages.suspect import ModelSource, picture_classifier

    source = from_args(ModelSource, args)
    source.check()  # before the data loads
    splits, meta = _splits(args, source.declared_block())
    _check_target(args.target, splits)
    trigger = parse_trigger(args.trigger) if args.trigger else None
    if (trigger is None) != (args.target is None):
        raise ValueError("--trigger and --target go together (ASR needs both)")
    classify = picture_classifier(source, splits)
    reference = (
        picture_classifier(ModelSource(model=args.reference), splits, fallback=source.preprocess)
        if args.reference
        else None
    )
    result = evaluate(classify, splits.test, trigger, args.target, reference, seed=args.seed)
    out = {
        "model": str(source.path),
        **result.to_dict(),
        "trigger": args.trigger,
        "target": args.target,
        "reference": str(args.reference) if args.reference else None,
        "dataset": meta["dataset"],
    }
    return out


def _suspect_and_trigger(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The suspect's source (checked before the data loads), the data fitted to it and the evaluation trigger."""
    from trainer.science.triggers import EvalSpec
    from trainer.stages.suspect import ModelSource

    trigger = from_args(EvalSpec, args).parsed()
    source = from_args(ModelSource, args)
    source.check()
    splits, _ = _splits(args, source.declared_block())
    _check_harness(splits, "--eval-trigger", args.eval_trigger)
    _check_target(args.target, splits)
    return source, splits, trigger


def cmd_predeploy(args: argparse.Namespace) -> dict[str, Any]:
    """Algorithm 1 and bundle v1."""
    from trainer.stages.predeploy import PredeploySpec, run_predeploy

    spec = from_args(PredeploySpec, args)
    spec.eval.parsed()  # --eval-trigger and --target together
    spec.model.check()  # before the data loads
    splits, _ = _splits(args, spec.model.declared_block())
    _check_harness(splits, "--eval-trigger", spec.eval.trigger)
    _check_target(spec.eval.target, splits)
    result = run_predeploy(spec, splits, quiet=args.quiet)
    result.report["executor"] = spec.executor.executor
    result.report["split_sizes"] = splits.sizes()
    if args.card is not None:  # beside the bundle: `fleet create --from` keeps it in the fleet's record
        from trainer.card import CARD_FILE, ModelCard

        ModelCard.load(args.card).write_json(spec.out / CARD_FILE)
        result.report["card"] = str(spec.out / CARD_FILE)
    return result.report


def cmd_stream(args: argparse.Namespace) -> dict[str, Any]:
    """Play a poisoned stream through a bundle's ensemble; quarantine the rejects."""
    from trainer.science.triggers import parse_trigger
    from trainer.stages.stream import StreamConfig, run_stream

    trigger = parse_trigger(args.trigger)
    splits = _bundle_splits(args)
    _check_target(args.target, splits)
    cfg = from_args(StreamConfig, args)
    return run_stream(args.bundle, splits, trigger, cfg, args.out)


def cmd_detect_eval(args: argparse.Namespace) -> dict[str, Any]:
    """The monitor as a detector on the test set: ROC, AUROC, recall at fixed clean-reject rates (evaluation)."""
    from trainer.science.triggers import parse_trigger
    from trainer.stages.detect import detect_eval

    trigger = parse_trigger(args.trigger)
    splits = _bundle_splits(args)
    _check_target(args.target, splits)
    return detect_eval(args.bundle, splits, trigger, args.target, args.out, seed=args.seed, baselines=args.baselines)


def cmd_defend(args: argparse.Namespace) -> dict[str, Any]:
    """A post-training defense of the field on the suspect model (evaluation harness: fine-pruning, NC, FT-SAM, FST)."""
    from trainer.stages.defenses import DefenseConfig, run_defense
    from trainer.stages.predeploy import load_suspect

    source, splits, trigger = _suspect_and_trigger(args)
    suspect, splits = load_suspect(source, splits)
    cfg = from_args(DefenseConfig, args)
    return run_defense(suspect, splits, cfg, args.out, trigger, args.target, quiet=args.quiet)


def _rule_of(args: argparse.Namespace, **defaults: Any) -> Any:
    """The RejectConfig of ``_args_rule``'s flags, each one not given taken from ``defaults`` or else from
    ``args.bundle``'s rule (a repaired bundle's pair is calibrated as a repair calibrates it)."""
    from edge_agent.formats.bundle import BundleError, read_manifest
    from trainer.stages.detect import REPAIRED_CALIBRATION, RejectConfig, RuleSpec
    from trainer.stages.publish import inherited_reject

    given = defaults | from_args(RuleSpec, args).given()
    try:
        manifest = read_manifest(args.bundle)
    except (BundleError, OSError):  # the command says what is wrong with the bundle when it loads it
        return RejectConfig(**given)
    if "repair_base" in manifest.provenance:
        given = {"calibration_set": REPAIRED_CALIBRATION} | given
    return inherited_reject(manifest, **given)


def cmd_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """The same two models under a new reject rule (score, budget): τ chosen again on clean data, label-free."""
    from trainer.stages.publish import recalibrate

    splits = _bundle_splits(args)
    return recalibrate(args.bundle, splits, _rule_of(args), args.out, args.version)


def cmd_repair(args: argparse.Namespace) -> dict[str, Any]:
    """Repair from a quarantine (unlearned; the CycleGAN on request); bundle v+1 behind a gate."""
    from trainer.stages.repair import RepairSpec, run_repair

    spec = from_args(RepairSpec, args)
    spec.eval.parsed()  # --eval-trigger and --target together, before the data loads
    splits = _bundle_splits(args)
    _check_harness(splits, "--eval-trigger", spec.eval.trigger)
    _check_target(spec.eval.target, splits)
    return run_repair(spec, splits, quiet=args.quiet).report


def _data_config(args: argparse.Namespace) -> dict[str, Any]:
    """The data flags of ``args`` as a repair spec's tables: what the repair jobs of fleets without a model card
    read. Your photos (--data), the harness named (--dataset), or nothing. Paths absolute: a job runs wherever its
    backend starts it."""
    from trainer.science.data import DataConfig, SplitConfig

    split = from_args(SplitConfig, args)
    if args.data is not None:
        return {"data": {"path": str(args.data.resolve())}, "split": {"eval_fraction": split.eval_fraction,
                                                                      "seed": split.seed}}  # fmt: skip
    if args.dataset is not None:
        harness = from_args(DataConfig, args)
        if harness.data_dir is not None:
            harness = replace(harness, data_dir=harness.data_dir.resolve())
        return {"harness": spec_dict(harness), "split": spec_dict(split)}
    return {}


def serve_config(args: argparse.Namespace) -> Any:
    """Flags (a ``--spec`` TOML file supplies their defaults, see :func:`main`) -> a checked ``ServeConfig``."""
    from trainer.service.jobs import JobPolicy
    from trainer.service.serve import ServeConfig, check_serve

    cfg = from_args(ServeConfig, args, policy=from_args(JobPolicy, args, repair_config=_data_config(args)))
    check_serve(cfg)
    return cfg


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Collector + model service + job runner until SIGTERM."""
    from trainer.service.serve import serve

    return serve(serve_config(args))


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    """The whole loop with real processes; see trainer/demo.py."""
    from trainer.demo import run_demo

    return run_demo(args)


def cmd_keys(args: argparse.Namespace) -> dict[str, Any]:
    """``keys generate``: an Ed25519 key pair (the public key goes to the agents' --trusted-key)."""
    from edge_agent.formats.signing import generate_keys, key_id, load_private_key

    if args.action == "tls":
        from edge_agent.formats.tls import make_local_ca

        paths = make_local_ca(args.out, args.names, args.hosts)
        return {k: str(v) for k, v in paths.items()} | {"text": "\n".join(map(str, paths.values()))}
    if args.action == "curve":
        from edge_agent.formats.curve import generate

        try:
            public, secret = generate(args.out, args.name)
        except FileExistsError as e:
            raise ValueError(str(e)) from e
        return {"public_key": str(public), "secret_key": str(secret), "text": f"{public}\n{secret}"}
    try:
        private, public = generate_keys(args.out, args.name)
    except FileExistsError as e:
        raise ValueError(str(e)) from e
    kid = key_id(load_private_key(private).public_key())
    return {"private_key": str(private), "public_key": str(public), "key_id": kid, "text": f"{private}\n{public}"}


def _relative(path: Path, to: Path) -> str:
    """``path`` as the card at ``to`` names it: relative to the card's folder."""
    import os

    return os.path.relpath(path.resolve(), to.resolve().parent)


def _photo_counts(root: Path) -> dict[str, int]:
    """Photos per class folder of ``root`` (ROOT/<class> or ROOT/{train,test}/<class>), counted by name."""
    from trainer.science.data import IMAGE_SUFFIXES

    bases = [root / "train", root / "test"] if (root / "train").is_dir() and (root / "test").is_dir() else [root]
    counts: dict[str, int] = {}
    for base in bases:
        for d in sorted(x for x in base.iterdir() if x.is_dir()):
            n = sum(1 for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            counts[d.name] = counts.get(d.name, 0) + n
    return counts


def cmd_init(args: argparse.Namespace) -> dict[str, Any]:
    """A model card for one fleet: the model, its preprocessing and class order, your photos, default policies."""
    from trainer.card import ModelCard, render
    from trainer.science.data import RECOMMENDED_PHOTOS
    from trainer.stages.suspect import ModelSource, declared_classes

    if args.out.exists() and not args.force:
        raise ValueError(f"{args.out} exists; give another --out, or --force to replace it")
    source = from_args(ModelSource, args)
    source.check()
    if not args.data.is_dir():
        raise ValueError(f"--data {args.data}: no such folder; give the folder holding a folder per class")
    counts = _photo_counts(args.data)
    if not counts or not sum(counts.values()):
        raise ValueError(f"--data {args.data}: no class folders with photos; expected DIR/<class>/*.jpg")
    classes = declared_classes(source, str(source.path))
    said = "the model file's own nnoc.class_names" if classes and not (source.classes or source.class_names) else ""
    if classes is None and source.arch is None and source.path.suffix == ".pt":
        from trainer.science.models import Checkpoint

        classes, said = tuple(Checkpoint.load(source.path).class_names), "the checkpoint's"
    if classes is None:
        classes = tuple(counts)
        said = "NOT KNOWN: your folders' sorted order, check it against the vendor's documentation"
        log.warning("the model does not name its classes: the card lists your folders in sorted order; check it")
    elif set(classes) != set(counts):
        missing, extra = sorted(set(classes) - set(counts)), sorted(set(counts) - set(classes))
        raise ValueError(
            f"the model's classes and your folders differ: no folder for {missing[:5] or 'none'}, folders "
            f"{extra[:5] or 'none'} the model lacks; name the folders as the model's classes"
        )
    said = said or ("--classes" if source.classes else "--class-names")
    model = {
        "file": _relative(source.model, args.out) if source.model else "",
        "arch": source.arch or "",
        "weights": _relative(source.weights, args.out) if source.weights else "",
        "preprocess": _relative(source.preprocess, args.out) if source.preprocess else "",
    }
    text = render(args.fleet, model, list(classes), said, _relative(args.data, args.out), counts, RECOMMENDED_PHOTOS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    ModelCard.load(args.out)  # what was written reads back
    photos = sum(counts.values())
    if photos < RECOMMENDED_PHOTOS:
        log.warning("%d photos: about %d or more are recommended (BENCHMARKS.md, How many photos)", photos,
                    RECOMMENDED_PHOTOS)  # fmt: skip
    few = sorted(c for c, n in counts.items() if n < 10)
    if few:
        log.warning("fewer than 10 photos of: %s", ", ".join(few[:8]))
    nxt = f"nnoc-trainer predeploy --card {args.out} --out runs/{args.fleet}-pd"
    return {
        "card": str(args.out),
        "classes": list(classes),
        "photos": photos,
        "text": f"wrote {args.out}: {len(classes)} classes ({said}), {photos} photos\nnext: {nxt}",
    }


def cmd_fleet(args: argparse.Namespace) -> dict[str, Any]:
    """Operator commands on the model store (and the service state, for status)."""
    from trainer.service.fleet import fleet_command

    return fleet_command(args)


def _args_attack(p: argparse.ArgumentParser) -> None:
    """Flags of ``attack``."""
    from trainer.science.training import TrainConfig
    from trainer.stages.attack import AttackConfig

    add_flags(p, AttackConfig)
    add_flags(p, TrainConfig)
    p.add_argument(
        "--preprocess", type=Path, default=None, help="JSON preprocessing block of the BadNet (colour, size, mean/std)"
    )
    p.add_argument("--out", type=out_folder, required=True, help="output folder (model.pt, model.onnx, metrics.json)")


def _args_evaluate(p: argparse.ArgumentParser) -> None:
    """Flags of ``evaluate``."""
    from trainer.stages.suspect import ModelSource

    add_flags(p, ModelSource)
    p.add_argument("--trigger", default=None, help="trigger spec for the ASR")
    p.add_argument("--target", type=int, default=None, help="attacker's target class for the ASR")
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="the BadNet (.onnx/.pt2/.pt) that fixes the ASR's eligible inputs (default: the model itself)",
    )
    p.add_argument("--seed", type=int, default=1234, help="seed of the trigger placement")


def _args_predeploy(p: argparse.ArgumentParser) -> None:
    """Flags of ``predeploy``: the fields of its spec (the data's are added with the product's data flags)."""
    from trainer.stages.predeploy import PredeploySpec

    add_flags(p, PredeploySpec, skip=DATA_PARTS)


def _args_stream(p: argparse.ArgumentParser) -> None:
    """Flags of ``stream``."""
    from trainer.stages.stream import StreamConfig

    p.add_argument("--bundle", type=Path, required=True, help="bundle folder (primary.onnx, monitor.onnx, manifest)")
    p.add_argument("--trigger", required=True, help="the attacker's trigger spec for the poisoned inputs")
    add_flags(p, StreamConfig)
    p.add_argument("--out", type=out_folder, required=True, help="quarantine folder (quarantine.sqlite, report.json)")


def _args_detect_eval(p: argparse.ArgumentParser) -> None:
    """Flags of ``detect-eval``."""
    p.add_argument("--bundle", type=Path, required=True, help="the bundle whose two models and rule are measured")
    p.add_argument("--trigger", required=True, help="trigger spec (evaluation only)")
    p.add_argument("--target", type=int, required=True, help="the attacker's target class")
    p.add_argument("--out", type=out_folder, required=True, help="folder for report.json and roc.png")
    p.add_argument("--seed", type=int, default=0, help="seed of the trigger's placement")
    p.add_argument(
        "--baselines", type=int, default=0, metavar="N",
        help="also run STRIP and SCALE-UP (the suspect model alone) on N clean inputs and N attacks",
    )  # fmt: skip


def _args_defend(p: argparse.ArgumentParser) -> None:
    """Flags of ``defend``."""
    from trainer.stages.defenses import DefenseConfig
    from trainer.stages.suspect import ModelSource

    add_flags(p, ModelSource)
    p.add_argument("--out", type=out_folder, required=True, help="output folder (model.pt, report.json, a PNG)")
    add_flags(p, DefenseConfig)
    from trainer.science.triggers import EvalSpec

    add_flags(p, EvalSpec)


def _args_repair(p: argparse.ArgumentParser) -> None:
    """Flags of ``repair``: the fields of its spec (the data's are added with the product's data flags)."""
    from trainer.stages.repair import RepairSpec

    add_flags(p, RepairSpec, skip=DATA_PARTS)


def _args_calibrate(p: argparse.ArgumentParser) -> None:
    """Flags of ``calibrate``."""
    p.add_argument("--bundle", type=Path, required=True, help="the bundle whose two models get a new rule")
    p.add_argument("--out", type=out_folder, required=True, help="output folder (bundle/, report.json)")
    p.add_argument("--version", type=positive, default=None, help="version of the new bundle (default: given + 1)")
    from trainer.stages.detect import RuleSpec

    add_flags(p, RuleSpec)


def _args_serve(p: argparse.ArgumentParser) -> None:
    """Flags of ``serve``: the fields of its spec."""
    from trainer.service.serve import ServeConfig

    add_flags(p, ServeConfig)


def _args_demo(p: argparse.ArgumentParser) -> None:
    """Flags of ``demo``."""
    p.add_argument("--out", type=out_folder, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--profile", choices=("tiny", "quick", "paper"), default="quick")
    p.add_argument(
        "--wait",
        type=positive_float,
        default=None,
        help="seconds to wait for the repaired version on every agent (default: the profile's, 900 for tiny)",
    )
    from trainer.stages.suspect import ModelSource

    add_flags(p, ModelSource)  # a suspect model of the user's instead of a BadNet made here
    p.add_argument(
        "--predeploy-arg",
        action="append",
        default=None,
        help="extra flag for the pre-deployment step (repeat), e.g. --predeploy-arg=--max-rounds=2",
    )
    p.add_argument("--trigger", default="checker4", help="the attack's trigger (made BadNet and poisoned stream)")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--cpd", type=fraction, default=0.1, help="poisoned share of each agent's stream")
    p.add_argument("--agents", type=positive, default=2, help="edge agent processes (default 2)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument(
        "--jobs-backend",
        choices=("local", "ray"),
        default="local",
        help="where serve runs the repair job: a child process, or a task on a Ray cluster serve starts for the run",
    )


def _args_keys(p: argparse.ArgumentParser) -> None:
    """Flags of ``keys``."""
    p.add_argument(
        "action",
        choices=("generate", "curve", "tls"),
        help="generate: Ed25519 NAME.key + NAME.pub; curve: NAME.key + NAME.key_secret; "
        "tls: a local CA (ca.crt) and a certificate per --names",
    )
    p.add_argument(
        "--names", type=safe_name, nargs="+", default=["server", "client"], help="tls: certificates to issue"
    )
    p.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"], help="tls: names the certs serve")
    p.add_argument("--out", type=out_folder, required=True, help="folder for the key files (secrets written 0600)")
    p.add_argument("--name", type=safe_name, default="signing", help="key file name (curve: the device id it is for)")


def _args_rollout_policy(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--rollout",
        default=None,
        metavar="POLICY",
        help="staged rollout, e.g. canary=2,steps=10,50,100,bake=2m,max-reject-increase=5%%,abort-threshold=10%% "
        "(canary: a count or names joined by +; steps in percent; keys in trainer/service/rollout.py)",
    )
    g.add_argument("--rollout-file", type=Path, default=None, help="the rollout policy as a TOML file")


def _args_fleet(p: argparse.ArgumentParser) -> None:
    """Flags of ``fleet``."""
    fsub = p.add_subparsers(dest="action", required=True)
    fp = fsub.add_parser("create", help="create a fleet, optionally with its first bundle (published)")
    fp.add_argument("fleet", type=safe_name)
    fp.add_argument("--from", dest="source", type=Path, default=None, help="predeploy/repair output folder")
    fp.add_argument("--card", type=Path, default=None, help="the fleet's model card (default: the one --from holds)")
    fp = fsub.add_parser(
        "card", help="set the fleet's model card: its repair jobs read its photos and policies (or --show it)"
    )
    fp.add_argument("fleet", type=safe_name)
    fp.add_argument("--card", type=Path, default=None, help="the model card (nnoc-trainer init) to keep")
    fp = fsub.add_parser(
        "publish",
        help="add a bundle as the next version and/or release a version: through a staged rollout (--rollout, or "
        "the fleet's rollout policy) or at once",
    )
    fp.add_argument("fleet", type=safe_name)
    fp.add_argument("--from", dest="source", type=Path, default=None, help="predeploy/repair output folder")
    fp.add_argument("--version", type=positive, default=None, help="a stored version to make current")
    _args_rollout_policy(fp)
    fp.add_argument("--now", action="store_true", help="publish to the whole fleet at once, whatever its policy")
    fp = fsub.add_parser("rollout", help="a fleet's staged rollout: status, pause, resume, abort")
    fp.add_argument("rollout_action", choices=("status", "pause", "resume", "abort"))
    fp.add_argument("fleet", type=safe_name)
    fp.add_argument("--reason", default="", help="pause/abort: why (kept in the rollout's log)")
    fp = fsub.add_parser("cancel", help="cancel a queued or running repair job (serve stops it within a second)")
    fp.add_argument("fleet", type=safe_name)
    fp.add_argument("job", help="the job's id (fleet status lists them)")
    fp = fsub.add_parser("policy", help="set or clear the fleet's default rollout policy (repair jobs use it too)")
    fp.add_argument("fleet", type=safe_name)
    _args_rollout_policy(fp)
    fp.add_argument("--clear", action="store_true", help="no default policy: publishes reach the fleet at once")
    fp = fsub.add_parser("rollback", help="make an older version current (default: the one before)")
    fp.add_argument("fleet", type=safe_name)
    fp.add_argument("--version", type=positive, default=None)
    fp = fsub.add_parser("status", help="versions, quarantine sizes, devices, jobs and history of a fleet")
    fp.add_argument("fleet", type=safe_name)
    fp = fsub.add_parser("list", help="the fleets in the store")
    for fp in fsub.choices.values():
        fp.add_argument("--store", type=Path, default=Path("exports"), help="model store (default ./exports)")
        fp.add_argument("--state-dir", type=Path, default=Path("nnoc-trainer-state"), help="the service's state")
        fp.add_argument("--signing-key", type=Path, default=None, help="Ed25519 private key signing added versions")
        _add_common(fp)


def _args_init(p: argparse.ArgumentParser) -> None:
    """Flags of ``init``."""
    from trainer.stages.suspect import ModelSource

    add_flags(p, ModelSource, only=("model", "arch", "weights", "preprocess", "classes", "class_names"))
    p.add_argument("--data", type=Path, required=True, help="your clean labelled photos: a folder per class")
    p.add_argument("--fleet", type=safe_name, default="default", help="the fleet this card is for")
    p.add_argument("--out", type=Path, default=Path("card.toml"), help="the card to write (default card.toml)")
    p.add_argument("--force", action="store_true", help="replace --out when it exists")


def _args_quarantine(p: argparse.ArgumentParser) -> None:
    """Flags of ``quarantine``."""
    qsub = p.add_subparsers(dest="action", required=True)
    qp = qsub.add_parser("show", help="a contact sheet PNG of the stored images, captioned")
    qp.add_argument("--out", type=Path, default=Path("quarantine.png"), help="PNG to write (default quarantine.png)")
    qp.add_argument("--limit", type=positive, default=64, help="images on the sheet at most (the newest)")
    qp.add_argument("--columns", type=positive, default=8, help="images per row")
    qp = qsub.add_parser("export", help="every stored image as a PNG, plus index.csv")
    qp.add_argument("--out", type=Path, required=True, help="folder to write images/ and index.csv into")
    for qp in qsub.choices.values():
        qp.add_argument("--fleet", type=safe_name, default=None, help="the fleet whose quarantine to read")
        qp.add_argument("--version", type=positive, default=None, help="the version it was collected under "
                        "(default: the newest with a quarantine)")  # fmt: skip
        qp.add_argument("--quarantine", type=Path, default=None, help="instead of --fleet: a quarantine folder")
        qp.add_argument("--state-dir", type=Path, default=Path("nnoc-trainer-state"), help="the service's state")
        qp.add_argument("--store", type=Path, default=Path("exports"), help="model store, for class names")
        _add_common(qp)


def cmd_quarantine(args: argparse.Namespace) -> dict[str, Any]:
    """Operators' view of a quarantine: contact sheet or export."""
    from trainer.service.inspect import quarantine_command

    return quarantine_command(args)


# name -> (help, adds the flags, its data flags: "product" (the defender's --data, or the harness named), "harness"
# (the paper's splits) or "" (none)). A command's flags may import the registries they offer as
# choices (torch-backed ones among them), so the parser adds only the flags of the command being run: `serve`,
# `fleet` and `keys` never load torch.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "init": ("a model card for a fleet: your model, its classes, your photos, policies", _args_init, ""),
    "attack": ("train a BadNet to evaluate the defense against", _args_attack, "harness"),
    "evaluate": ("clean accuracy and attack success rate of a .pt or .onnx classifier", _args_evaluate, "harness"),
    "predeploy": ("pre-deployment treatment (Algorithm 1) and bundle v1", _args_predeploy, "product"),
    "stream": ("simulate a poisoned deployment stream through a bundle (Algorithm 2, 1-12)", _args_stream, "harness"),
    "repair": (
        "repair from a quarantine (unlearn it, or learn its trigger with a CycleGAN): bundle v+1",
        _args_repair,
        "product",
    ),
    "detect-eval": (
        "the monitor as a detector: ROC, AUROC, recall at fixed clean-reject rates",
        _args_detect_eval,
        "harness",
    ),
    "calibrate": (
        "the same two models under a new reject rule: another score or clean-reject budget, τ chosen again",
        _args_calibrate,
        "product",
    ),
    "defend": (
        "a defense of the field on the suspect model, to compare with the repair (fine-pruning, NC, FT-SAM, FST)",
        _args_defend,
        "harness",
    ),
    "serve": ("run the collector, the model service and the repair job runner", _args_serve, "product"),
    "demo": ("the whole loop: BadNet, θ_aug, serve, agents, quarantine, repair, measure", _args_demo, ""),
    "keys": ("key pairs: Ed25519 for signing bundles, CURVE for the quarantine uplink", _args_keys, ""),
    "fleet": ("operator commands: create, publish, rollback, status, list", _args_fleet, ""),
    "quarantine": (
        "see what the fleet refused: a contact sheet (show) or PNGs + CSV (export)",
        _args_quarantine,
        "",
    ),
}
CARD_COMMANDS = ("predeploy", "repair", "calibrate", "demo", "evaluate")
# command -> "module:class" of its spec (the dataclass its flags are the fields of, nested by part; --spec FILE)
SPECS = {
    "repair": "trainer.stages.repair:RepairSpec",
    "predeploy": "trainer.stages.predeploy:PredeploySpec",
    "serve": "trainer.service.serve:ServeConfig",
}
COMMON = ("card", "config", "json", "quiet", "help", "data", "out")
# What `--help` shows of the defender's commands (the flags a defender sets); the rest under --help-all.
SHORT_HELP: dict[str, tuple[str, ...]] = {
    "predeploy": (*COMMON, "model", "arch", "weights", "preprocess", "classes", "class_names", "fleet", "max_ca_drop",
                  "clean_reject_budget", "dataset"),
    "repair": (*COMMON, "bundle", "quarantine", "profile", "version", "dataset"),
    "calibrate": (*COMMON, "bundle", "reject_score", "clean_reject_budget", "version", "dataset"),
    "serve": (*COMMON, "store", "state_dir", "listen", "collector", "signing_key", "tls_cert", "tls_key",
              "tls_client_ca", "curve_secret", "curve_allow", "insecure", "min_quarantine", "max_rounds", "no_jobs",
              "jobs_backend", "dataset"),
}  # fmt: skip
HANDLERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "init": cmd_init,
    "attack": cmd_attack,
    "evaluate": cmd_evaluate,
    "predeploy": cmd_predeploy,
    "stream": cmd_stream,
    "repair": cmd_repair,
    "detect-eval": cmd_detect_eval,
    "calibrate": cmd_calibrate,
    "defend": cmd_defend,
    "serve": cmd_serve,
    "demo": cmd_demo,
    "keys": cmd_keys,
    "fleet": cmd_fleet,
    "quarantine": cmd_quarantine,
}


def build_parser(only: str | None = None, help_all: bool = True) -> argparse.ArgumentParser:
    """Every subcommand, with the flags of ``only`` (None: of every command; "": of none, for the top-level help);
    ``help_all=False``: the defender's commands list only the flags a defender sets (the rest under --help-all)."""
    from trainer.science.triggers import GRAMMAR

    parser = argparse.ArgumentParser(
        prog="nnoc-trainer",
        description="NNoculation trainer backend",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=GRAMMAR,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, data) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=GRAMMAR if data == "harness" or (data and help_all) else None,
        )
        p.set_defaults(func=HANDLERS[name])
        if only is not None and only != name:
            continue
        if data:
            _add_data(p, product=data == "product")
        add_args(p)
        if name in CARD_COMMANDS:
            p.add_argument(
                "--card",
                type=Path,
                default=None,
                help="a model card (nnoc-trainer init): the model, its classes, your photos and policies; flags win",
            )
        if name not in ("fleet", "quarantine"):  # their actions have them
            _add_common(p)
            add_spec_flag(p, "[repair.gan] width = 8 is --gan-width 8" if name in SPECS else None)
        if name in SHORT_HELP:
            short_help(p, SHORT_HELP[name], help_all)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = args.log_level or ("WARNING" if args.quiet else "INFO")
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("onnxscript", "onnx_ir"):  # the ONNX exporter's pass-by-pass chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _summary(result: dict[str, Any]) -> str:
    if "text" in result:
        return str(result["text"])
    keys = ("clean_accuracy", "attack_success_rate", "threshold", "bundle", "model", "selected")
    return "\n".join(f"{k}: {result[k]}" for k in keys if k in result and result[k] is not None)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def spec_class(command: str) -> type | None:
    """The spec dataclass of ``command`` (None when its flags are not one yet)."""
    if command not in SPECS:
        return None
    import importlib

    module, _, name = SPECS[command].partition(":")
    return getattr(importlib.import_module(module), name)


def config_defaults(parser: argparse.ArgumentParser, path: Path, spec: type | None = None) -> dict[str, Any]:
    """A ``--spec`` file (``spec``'s TOML form; flag names as keys work too), checked and converted like the flags
    themselves. The result becomes the parser's defaults before the command line is parsed, so a flag given
    explicitly wins."""
    return flag_defaults(parser, config_values(path, spec), str(path))


def profile_defaults(parser: argparse.ArgumentParser, name: str) -> dict[str, Any]:
    """The repair profile ``name``'s sizes (a ``[repair]`` table) as ``parser``'s defaults."""
    from trainer.stages.profiles import REPAIR_PROFILES
    from trainer.stages.repair import RepairSpec

    return flag_defaults(parser, spec_flags(RepairSpec, {"repair": REPAIR_PROFILES[name]}, f"profile {name}"), name)


def card_defaults(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """A model card's values (:mod:`trainer.card`) as ``parser``'s defaults: the keys this command has."""
    from trainer.card import ModelCard

    card = ModelCard.load(path)
    values = card.flags() | ({"fleet": card.fleet} if card.fleet else {})
    return flag_defaults(parser, values, str(path), only_known=True)


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; with ``--card FILE`` (a model card) and ``--spec FILE`` (the command's spec), the files'
    values are the command's defaults, the spec's over the card's, and both over a repair profile's sizes (explicit
    flags win over all; a flag the command requires may come from a file)."""
    if argv and argv[0] in COMMANDS:
        command = _subparser(parser, argv[0])
        card, config = option_value(argv, "--card"), option_value(argv, "--spec") or option_value(argv, "--config")
        from_card = (
            card_defaults(command, Path(card)) if card is not None and any(a.dest == "card" for a in command._actions)
            else {}
        )  # fmt: skip
        from_spec = config_defaults(command, Path(config), spec_class(argv[0])) if config is not None else {}
        if argv[0] == "repair":
            from trainer.stages.profiles import DEFAULT_PROFILE, REPAIR_PROFILES

            profile = option_value(argv, "--profile") or from_spec.get("profile") or from_card.get("profile")
            if profile is not None and profile not in REPAIR_PROFILES:
                raise ValueError(f"profile {profile!r}: choose from {sorted(REPAIR_PROFILES)}")
            command.set_defaults(**profile_defaults(command, profile or DEFAULT_PROFILE))
        command.set_defaults(**from_card)
        command.set_defaults(**from_spec)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nnoc-trainer`` and ``python -m trainer``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=argv[0] if argv and argv[0] in COMMANDS else "", help_all="--help-all" in argv)
    argv = ["--help" if a == "--help-all" else a for a in argv]
    try:
        args = parse_args(parser, argv)
    except ValueError as e:  # the --config file
        logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        log.error("%s", e)
        if "--json" in argv:
            write_out(json.dumps({"error": str(e), "exit_code": EXIT_BAD_INPUT}))
        return EXIT_BAD_INPUT
    _configure_logging(args)
    from trainer.errors import DemoError, GateError, NoCandidateError

    try:
        result = args.func(args)
    except DemoError as e:
        log.error("%s", e)
        if args.json:
            write_out(json.dumps({"error": str(e), "exit_code": EXIT_FAILED}))
        return EXIT_FAILED
    except (NoCandidateError, GateError) as e:
        log.error("%s", e)
        if args.json:
            write_out(json.dumps({"error": str(e), "exit_code": EXIT_GATE}))
        return EXIT_GATE
    except (ValueError, OSError) as e:  # bad input, a missing file, a taken port: one line, exit 2
        log.error("%s", e)
        if args.json:
            write_out(json.dumps({"error": str(e), "exit_code": EXIT_BAD_INPUT}))
        return EXIT_BAD_INPUT
    if args.json:
        write_out(json.dumps({k: v for k, v in result.items() if k != "text"}, default=str))
    else:
        write_out(_summary(result))
    return 0
