"""Post-deployment repair (paper §4.3, Algorithm 2 lines 13-16) as a batch job.

quarantine -> purify (label-free) -> CycleGAN (clean D_valid <-> quarantine) -> D_treat^rt = G(D_treat) with
the clean labels -> fine-tune θ_bd (or θ_aug) on D_treat^rt ∪ D_treat -> gate on D_eval -> bundle v+1 whose
primary is θ_repair and whose monitor stays θ_aug.

The fine-tuning set is D_treat (not all of D_valid) so that the gate's D_eval stays held out. Nothing here
reads ASR or which inputs were poisoned: ``eval_trigger`` only adds test CA/ASR to the report.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.formats.bundle import read_manifest, sha256_file, write_bundle
from protos.nnoc.v1 import bundle_pb2
from trainer.errors import GateError
from trainer.science.cyclegan import CycleGANConfig, save_sample_grid, train_cyclegan, translate
from trainer.science.data import ImageSet, Splits
from trainer.science.export import export_checkpoint
from trainer.science.metrics import evaluate, poisoned_copy
from trainer.science.models import Checkpoint
from trainer.science.training import TrainConfig, default_device, predict, train
from trainer.science.triggers import Trigger
from trainer.service.quarantine import Quarantine, QuarantineStore

log = logging.getLogger(__name__)

REPAIR_BASES = ("bd", "aug")
PURIFIERS = ("majority", "excess", "none")
LEARNERS = ("cyclegan", "none")


@dataclass(frozen=True)
class RepairConfig:
    """The repair job's knobs."""

    # Which model is fine-tuned: θ_bd (the paper's Algorithm 2) or θ_aug (the authors' code). θ_aug measured
    # better (BENCHMARKS.md: lower ASR at a similar CA), so it is the default.
    base: str = "aug"
    purify: str = "excess"  # measured better than "majority" at low CPD (BENCHMARKS.md)
    learner: str = "cyclegan"  # "none": fine-tune on clean D_treat alone (the baseline the bench compares to)
    dominance: float = 2.0  # majority filter: the top BadNet label needs >= this x the runner-up's count
    min_quarantine: int = 20  # fewer (after purification) is an error, not a meaningless model
    clean_domain: int = 500  # CycleGAN domain U: this many clean D_valid images (paper: 500)
    cyclegan: CycleGANConfig = field(default_factory=CycleGANConfig)
    epochs: int = 5  # fine-tuning epochs
    lr: float | None = None  # None: the BadNet's own learning rate (paper)
    emphasis: int = 0  # extra copies of the generated images that flip θ_bd (see run_repair)
    max_ca_drop: float = 0.03  # gate: θ_repair's D_eval CA >= θ_bd's D_eval CA - this
    seed: int = 0

    def __post_init__(self) -> None:
        if self.base not in REPAIR_BASES:
            raise ValueError(f"unknown repair base {self.base!r}; choose one of: {', '.join(REPAIR_BASES)}")
        if self.learner not in LEARNERS:
            raise ValueError(f"unknown trigger learner {self.learner!r}; choose one of: {', '.join(LEARNERS)}")
        if self.purify not in PURIFIERS:
            raise ValueError(f"unknown purifier {self.purify!r}; choose one of: {', '.join(PURIFIERS)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for reports."""
        return asdict(self)


@dataclass(frozen=True)
class Purified:
    """Which quarantined inputs the CycleGAN trains on, and the quarantine's dominant BadNet label."""

    keep: np.ndarray  # (N,) bool
    dominant: int | None  # None: no label dominates (e.g. an all-to-all attack): the raw quarantine is kept
    counts: dict[int, int]


def purify(
    primary_labels: np.ndarray,
    method: str = "majority",
    dominance: float = 2.0,
    baseline_counts: np.ndarray | None = None,
    z_min: float = 3.0,
) -> Purified:
    """Label-free purification of a quarantine from the BadNet's labels alone.

    A targeted backdoor sends every triggered input to one label, while clean disagreements spread over the
    confusable classes. ``majority`` keeps the rejects whose BadNet label is the most common one when it
    dominates (top count >= ``dominance`` x runner-up). ``excess`` compares each label's count with what clean
    disagreements alone would give (``baseline_counts``: the BadNet labels of the inputs on which the two models
    disagree on clean data) and keeps the label with the largest excess when its z-score reaches ``z_min``; it
    finds the attacked label even when it is not the most common one (low CPD). Without a clear label,
    everything is kept (e.g. an all-to-all attack).
    """
    n = len(primary_labels)
    values, counts = np.unique(primary_labels, return_counts=True)
    table = {int(v): int(c) for v, c in zip(values, counts, strict=True)}
    keep_all = Purified(np.ones(n, dtype=bool), None, table)
    if method == "none" or n == 0:
        return keep_all
    if method == "excess":
        if baseline_counts is None:
            raise ValueError("excess purification needs the clean disagreement baseline")
        k = max(len(baseline_counts), int(primary_labels.max()) + 1)
        base = np.zeros(k)
        base[: len(baseline_counts)] = baseline_counts
        share = (base + 1.0) / (base.sum() + k)  # Laplace-smoothed share of clean disagreements per label
        observed = np.bincount(primary_labels, minlength=k)
        expected = n * share
        z = (observed - expected) / np.sqrt(expected * (1.0 - share))
        top = int(np.argmax(z))
        return Purified(primary_labels == top, top, table) if z[top] >= z_min else keep_all
    order = np.argsort(-counts, kind="stable")
    top = int(values[order[0]])
    runner_up = int(counts[order[1]]) if len(order) > 1 else 0
    if counts[order[0]] < dominance * runner_up:
        return keep_all
    return Purified(primary_labels == top, top, table)


def _locate_checkpoint(bundle_dir: Path, role: str, override: Path | None, manifest: bundle_pb2.Manifest) -> Path:
    path = override or bundle_dir.parent / f"{role}.pt"
    if not path.is_file():
        raise ValueError(
            f"no {role} checkpoint at {path}: repair fine-tunes torch weights, which live next to the bundle "
            f"(written by predeploy/repair); pass --{role}-checkpoint"
        )
    want = manifest.provenance.get(f"{role}_checkpoint_sha256")
    if want and sha256_file(path) != want:
        raise ValueError(f"{path} is not the {role} checkpoint this bundle was made from (sha256 differs)")
    return path


def flip_rate(classify: Any, images: np.ndarray, label: int) -> float:
    """Share of ``images`` that ``classify`` sends to ``label`` (the generator's label-free score)."""
    return float(np.mean(classify(images) == label)) if len(images) else 0.0


def plot_history(path: Path, history: list[dict[str, float]], best_epoch: int, score_name: str) -> None:
    """Per-epoch CycleGAN losses and the label-free score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    ax[0].plot(epochs, [h["loss_g"] for h in history], label="generators")
    ax[0].plot(epochs, [h["loss_d"] for h in history], label="discriminators")
    ax[0].set_xlabel("epoch")
    ax[0].set_title("CycleGAN losses", fontsize=10)
    ax[0].legend()
    if any("score" in h for h in history):
        ax[1].plot(epochs, [h.get("score", np.nan) for h in history], color="tab:red")
        ax[1].axvline(best_epoch, color="gray", linestyle="--", label=f"kept: epoch {best_epoch}")
        ax[1].legend()
    ax[1].set_xlabel("epoch")
    ax[1].set_title(score_name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_repair(
    bundle_dir: Path,
    quarantine_path: Path,
    splits: Splits,
    cfg: RepairConfig,
    out_dir: Path,
    eval_trigger: Trigger | None = None,
    target: int | None = None,
    primary_checkpoint: Path | None = None,
    monitor_checkpoint: Path | None = None,
    quiet: bool = False,
    version: int | None = None,
) -> dict[str, Any]:
    """Run the repair job and write ``out_dir/{bundle/, primary.pt, monitor.pt, report.json, samples.png}``.

    Raises :class:`GateError` (after writing the report) when θ_repair misses the D_eval floor. ``version``:
    the new bundle's version (default: the deployed one + 1; a model store passes its next free number).
    """
    t_start = time.monotonic()
    manifest = read_manifest(bundle_dir)
    bd_path = _locate_checkpoint(bundle_dir, "primary", primary_checkpoint, manifest)
    aug_path = _locate_checkpoint(bundle_dir, "monitor", monitor_checkpoint, manifest)
    bd_ckpt, aug_ckpt = Checkpoint.load(bd_path), Checkpoint.load(aug_path)
    if tuple(bd_ckpt.input_spec.shape) != splits.image_shape:
        raise ValueError(
            f"bundle expects inputs {tuple(bd_ckpt.input_spec.shape)}, the dataset has {splits.image_shape}"
        )
    device = default_device()
    bd_model, aug_model = bd_ckpt.build(), aug_ckpt.build()

    def bd(x: np.ndarray) -> np.ndarray:
        return predict(bd_model, x, device=device)

    def aug(x: np.ndarray) -> np.ndarray:
        return predict(aug_model, x, device=device)

    with QuarantineStore(quarantine_path, create=False) as store:
        quarantine: Quarantine = store.load(bd_ckpt.input_spec.scale)
    if len(quarantine) and quarantine.images.shape[1:] != splits.image_shape:
        raise ValueError(f"quarantine holds inputs {quarantine.images.shape[1:]}, the dataset has {splits.image_shape}")
    baseline = None
    if cfg.purify == "excess":  # the BadNet labels of clean disagreements on D_valid (no labels read)
        p_bd, p_aug = bd(splits.valid.images), aug(splits.valid.images)
        baseline = np.bincount(p_bd[p_bd != p_aug], minlength=len(splits.class_names))
    pur = purify(quarantine.primary, cfg.purify, cfg.dominance, baseline)
    v_images = quarantine.images[pur.keep]
    log.info("quarantine: %d inputs, kept %d (dominant BadNet label %s)", len(quarantine), len(v_images), pur.dominant)
    if len(v_images) < cfg.min_quarantine:
        raise ValueError(
            f"only {len(v_images)} quarantined inputs to learn from (of {len(quarantine)}; minimum "
            f"{cfg.min_quarantine}); collect more stream inputs or lower --min-quarantine"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(cfg.seed)
    u_idx = rng.choice(len(splits.valid), min(cfg.clean_domain, len(splits.valid)), replace=False)
    u_images = splits.valid.images[u_idx]
    # The generator's label-free score on the defender's own D_treat images.
    treat = splits.treat
    if pur.dominant is not None:
        dom = pur.dominant
        probe = treat.images[treat.labels != dom][:1000]
        score_name = f"flip rate: θ_bd(G(clean)) = {dom}"

        def score(gen: np.ndarray) -> float:
            return flip_rate(bd, gen, dom)
    else:
        probe = treat.images[:1000]
        score_name = "ensemble disagreement on G(clean)"

        def score(gen: np.ndarray) -> float:
            return float(np.mean(bd(gen) != aug(gen)))

    if cfg.learner == "cyclegan":
        gan = train_cyclegan(u_images, v_images, cfg.cyclegan, score, probe, out_dir / "cyclegan.pt", quiet, device)
        generator = gan.generator

        def generate(x: np.ndarray) -> np.ndarray:
            return translate(generator, x, device=device)

        gan_info: dict[str, Any] = {
            "best_epoch": gan.best_epoch,
            "best_score": gan.best_score,
            "epochs_run": len(gan.history),
            "stopped_early": gan.stopped_early,
            "seconds": round(gan.seconds, 1),
            "history": gan.history,
        }
        plot_history(out_dir / "cyclegan.png", gan.history, gan.best_epoch, score_name)
    else:  # the baseline without a trigger learner: fine-tuning on clean D_treat alone

        def generate(x: np.ndarray) -> np.ndarray:
            return x.copy()

        gan_info = {"best_epoch": None, "best_score": None, "epochs_run": 0, "history": []}
    generated = generate(treat.images)
    save_sample_grid(out_dir / "samples.png", treat.images[:10], generated[:10])

    # D_repair = G(D_treat) with the clean labels ∪ D_treat. Generated images that the BadNet sends to the
    # quarantine's dominant label demonstrably carry a working trigger: they are repeated ``emphasis`` more
    # times (label-free: it reads θ_bd's answers, never the attack's ground truth).
    parts = [ImageSet(generated, treat.labels), treat]
    n_flipping = 0
    if pur.dominant is not None and cfg.emphasis > 0:
        flips = (bd(generated) == pur.dominant) & (treat.labels != pur.dominant)
        n_flipping = int(flips.sum())
        parts += [ImageSet(generated[flips], treat.labels[flips])] * cfg.emphasis
    repair_set = ImageSet.concat(*parts)
    base_ckpt = bd_ckpt if cfg.base == "bd" else aug_ckpt
    base_train = TrainConfig(**{k: v for k, v in bd_ckpt.train.items() if k in TrainConfig.__dataclass_fields__})
    ft = replace(base_train, epochs=cfg.epochs, lr=cfg.lr or base_train.lr)
    model = base_ckpt.build()
    train(model, repair_set.images, repair_set.labels, ft, cfg.seed, device, "repair: fine-tune", quiet)

    def repaired(x: np.ndarray) -> np.ndarray:
        return predict(model, x, device=device)

    bd_eval_ca = evaluate(bd, splits.eval).clean_accuracy
    rep_eval_ca = evaluate(repaired, splits.eval).clean_accuracy
    floor = bd_eval_ca - cfg.max_ca_drop
    gen_eval = generate(splits.eval.images)
    label_free: dict[str, Any] = {
        "score_name": score_name,
        "best_score": gan_info["best_score"],
        "best_epoch": gan_info["best_epoch"],
    }
    if pur.dominant is not None:
        mask = splits.eval.labels != pur.dominant
        label_free["flip_rate_bd_on_G_eval"] = flip_rate(bd, gen_eval[mask], pur.dominant)
        label_free["flip_rate_repaired_on_G_eval"] = flip_rate(repaired, gen_eval[mask], pur.dominant)
    label_free["accuracy_repaired_on_G_eval"] = float(np.mean(repaired(gen_eval) == splits.eval.labels))
    report: dict[str, Any] = {
        "bundle": str(bundle_dir),
        "quarantine": str(quarantine_path),
        "parent_version": int(manifest.version),
        "config": cfg.to_dict(),
        "quarantine_size": len(quarantine),
        "purified_size": int(pur.keep.sum()),
        "dominant_label": pur.dominant,
        "label_counts": pur.counts,
        "kept_keys": [list(k) for k, keep in zip(quarantine.keys, pur.keep, strict=True) if keep],
        "cyclegan": gan_info,
        "label_free": label_free,
        "repair_set": {"size": len(repair_set), "generated": len(generated), "flipping_generated": n_flipping},
        "eval_clean_accuracy": {"badnet": bd_eval_ca, "repaired": rep_eval_ca, "floor": floor},
        "gate": {"eval_ca_badnet": bd_eval_ca, "eval_ca_repaired": rep_eval_ca, "floor": floor},
        "samples": str(out_dir / "samples.png"),
    }
    if eval_trigger is not None and target is not None:
        ref = bd(splits.test.images)
        x_p = poisoned_copy(splits.test, eval_trigger, cfg.seed + 11)
        report["test"] = {
            name: evaluate(fn, splits.test, eval_trigger, target, ref, poisoned=x_p).to_dict()
            for name, fn in (("badnet", bd), ("monitor", aug), ("repaired", repaired))
        }
    report["seconds"] = round(time.monotonic() - t_start, 1)
    if rep_eval_ca < floor:
        report["published"] = False
        report["error"] = (
            f"gate: repaired D_eval CA {rep_eval_ca:.4f} is below the floor {floor:.4f} "
            f"(BadNet {bd_eval_ca:.4f} - {cfg.max_ca_drop}); no bundle published"
        )
        (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        raise GateError(report["error"])

    rep_ckpt = Checkpoint.from_model(
        model,
        bd_ckpt.architecture,
        bd_ckpt.input_spec,
        bd_ckpt.class_names,
        ft.to_dict(),
        {
            "role": "primary",
            "repaired_from": cfg.base,
            "parent_version": int(manifest.version),
            "parent_primary_sha256": sha256_file(bd_path),
            "eval_clean_accuracy": rep_eval_ca,
            **{k: v for k, v in bd_ckpt.meta.items() if k in ("dataset", "split")},
        },
    )
    rep_ckpt.save(out_dir / "primary.pt")
    if aug_path.resolve() != (out_dir / "monitor.pt").resolve():
        shutil.copyfile(aug_path, out_dir / "monitor.pt")
    if version is None:
        version = int(manifest.version) + 1
    if version <= int(manifest.version):
        raise ValueError(f"--version {version} must be above the deployed bundle's v{manifest.version}")
    export_checkpoint(rep_ckpt, out_dir / "primary.onnx", version=str(version))
    monitor_onnx = bundle_dir / next(a.name for a in manifest.artifacts if a.role == "monitor")
    new = bundle_pb2.Manifest()
    new.CopyFrom(manifest)
    new.ClearField("created_at")
    new.ClearField("signature")
    new.version, new.parent_version, new.created_by = version, manifest.version, "nnoc-trainer repair"
    new.provenance.update(
        {
            "primary_checkpoint_sha256": sha256_file(out_dir / "primary.pt"),
            "monitor_checkpoint_sha256": sha256_file(out_dir / "monitor.pt"),
            "repair_base": cfg.base,
            "quarantine_size": str(len(quarantine)),
            "purified_size": str(int(pur.keep.sum())),
            "dominant_label": "" if pur.dominant is None else str(pur.dominant),
        }
    )
    test = report.get("test", {})
    mon_art = next(a for a in manifest.artifacts if a.role == "monitor")
    written = write_bundle(
        out_dir / "bundle",
        {"primary": out_dir / "primary.onnx", "monitor": monitor_onnx},
        new,
        {
            "primary": {
                "eval_clean_accuracy": rep_eval_ca,
                "test_clean_accuracy": test.get("repaired", {}).get("clean_accuracy"),
                "attack_success_rate": test.get("repaired", {}).get("attack_success_rate"),
            },
            "monitor": {
                k: getattr(mon_art.metrics, k)
                for k in ("eval_clean_accuracy", "test_clean_accuracy", "attack_success_rate")
                if mon_art.metrics.HasField(k)
            },
        },
    )
    (out_dir / "primary.onnx").unlink()
    report.update({"published": True, "bundle_out": str(out_dir / "bundle"), "version": int(written.version)})
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
