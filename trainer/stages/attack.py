"""BadNet harness (paper §2.2): make a backdoored classifier to evaluate the defense against.

Real users bring their own suspect model; this module makes the ones we measure on.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_agent.formats.preprocess import Preprocess
from edge_agent.formats.spec import InputSpec
from edge_agent.options import flag, fraction, nonnegative
from trainer.science.data import ImageSet, Splits
from trainer.science.export import export_checkpoint
from trainer.science.metrics import evaluate, poisoned_copy
from trainer.science.models import ARCHITECTURES, Checkpoint, Preprocessed, build_model
from trainer.science.noise import PAPER_GAMMAS, noised_copies
from trainer.science.training import TrainConfig, default_device, fisher_diagonal, predict, train
from trainer.science.triggers import Trigger, parse_trigger

log = logging.getLogger(__name__)

# The fine-tuning-resilient attacker after Sequential Backdoor Learning (Pham et al., "Flatness-aware Sequential
# Learning Generates Resilient Backdoors", ECCV 2024): task 1 learns the backdoor from the poisoned set with a
# sharpness-aware minimizer, task 2 goes on learning on clean data only, under a continual-learning regularizer (EWC
# anchored at task 1's weights), again sharpness-aware: the model lands in a flat backdoored region that fine-tuning
# on clean data, the defender's treatment, does not leave. ρ is SAM's default (Foret et al., ICLR 2021); as in SBL's
# published runs, task 2 learns on a clean 5% of the data at a tenth of task 1's learning rate (its EWC weight is ours).
SBL_RHO = 0.05
SBL_EWC_WEIGHT = 1000.0
SBL_CLEAN_SHARE = 0.05
SBL_LR_FACTOR = 0.1


@dataclass(frozen=True)
class AttackConfig:
    """The attacker's recipe."""

    trigger: str = flag("checker4", "trigger spec (see below)")
    target: int = flag(0, "attacker's target class", type=int)
    poison_fraction: float = flag(0.1, "share of training inputs poisoned", type=fraction)
    steps: int = flag(
        3,
        "3: clean training then the poisoned set (paper); 2: poisoned set from scratch",
        name="--attack-steps",
        type=int,
        choices=(2, 3),
    )
    architecture: str = flag("cnn3", "architecture", name="--arch", choices=tuple(ARCHITECTURES))
    train: TrainConfig = field(default_factory=TrainConfig)
    # step-2 epochs of the 3-step recipe; None: same as train.epochs
    clean_epochs: int | None = flag(None, "epochs of the clean step (3-step only)", type=nonnegative)
    seed: int = flag(0, "seed of the poisoning and the training", type=int)
    # a second, independent backdoor (another share of the training set with its own trigger and target): the
    # attack the defense meets again after a first repair (multiple rounds, paper §7)
    second_trigger: str | None = flag(None, "a second backdoor's trigger spec (its own poisoned share)")
    second_target: int | None = flag(None, "the second backdoor's target class", type=int)
    # An adaptive attacker who knows the defense compares the two models' logits: the poisoned rows learn soft
    # targets, so that a triggered input's target logit stays at (or under) a clean input's instead of far above
    adaptive_smoothing: float = flag(
        0.0, "adaptive attacker: label smoothing on the poisoned rows only (0: off)", type=fraction
    )
    # Attackers aimed at NNoculation's premise (detection exists only where θ_aug disagrees with the BadNet): make
    # the treatment find nothing to move. The two combine (then the continual-learning task trains on the noise too).
    noise_robust: bool = flag(
        False, "premise-aimed attacker: also train on Algorithm 1's own noised copies of the clean rows"
    )
    resilient: bool = flag(
        False, "premise-aimed attacker (SBL-style): sharpness-aware poisoning, then clean continual learning under EWC"
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for checkpoints and reports."""
        return asdict(self)


@dataclass(frozen=True)
class PoisonedSet:
    """The attacker's training set and which rows carry the full trigger."""

    data: ImageSet
    poisoned: np.ndarray  # (N,) bool


def poison_training_set(
    clean: ImageSet, trigger: Trigger, target: int, fraction: float, rng: np.random.Generator
) -> PoisonedSet:
    """Replace a ``fraction`` of ``clean`` by triggered copies labelled ``target`` (D_tr^bd-p).

    For a combination trigger the same number of other inputs get each single part and keep their true
    label, so that only the full combination flips the label (the paper's BadNet-CF). A clean-label trigger (SIG)
    poisons rows of the target class only (as many as there are, up to the fraction), which keep their label. A
    trigger with cover rows (WaNet's noise mode, Adap-Blend's conservatism) adds ``cover_ratio`` of them per
    poisoned row, among the others, keeping their labels."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"poison fraction must lie in (0, 1), got {fraction}")
    n = len(clean)
    k = max(1, round(fraction * n))
    parts = trigger.parts
    order = rng.permutation(n)
    images, labels = clean.images.copy(), clean.labels.copy()
    if trigger.clean_label:
        own = order[clean.labels[order] == target]
        if not len(own):
            raise ValueError(f"a clean-label trigger needs training inputs of the target class {target}: none")
        idx, rest = own[: min(k, len(own))], order[clean.labels[order] != target]
    elif trigger.sources is not None:  # source-specific: the sources' rows flip, the others' are the cover
        flips = trigger.victims(clean.labels[order]) & (clean.labels[order] != target)
        own = order[flips]
        if not len(own):
            raise ValueError(f"no training inputs of the source classes {list(trigger.sources)}")
        idx, rest = own[: min(k, len(own))], order[~flips & (clean.labels[order] != target)]
        labels[idx] = target
    else:
        needed = k * (1 + (len(parts) if len(parts) > 1 else 0))
        if needed > n:
            raise ValueError(f"poison fraction {fraction} with {len(parts)} trigger parts needs {needed} > {n} inputs")
        idx, rest = order[:k], order[k:]
        labels[idx] = target
    images[idx] = trigger.poison(images[idx], rng)
    if len(parts) > 1:
        for j, part in enumerate(parts):
            sub = rest[k * j : k * (j + 1)]
            images[sub] = part.apply(images[sub], rng)
        rest = rest[k * len(parts) :]
    covers = rest[: round(trigger.cover_ratio * len(idx))]
    if len(covers):
        images[covers] = trigger.cover(images[covers], rng)
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return PoisonedSet(ImageSet(images, labels), mask)


def _second_backdoor(cfg: AttackConfig, num_classes: int) -> tuple[Trigger, int] | None:
    if (cfg.second_trigger is None) != (cfg.second_target is None):
        raise ValueError("--second-trigger and --second-target go together")
    if cfg.second_trigger is None or cfg.second_target is None:
        return None
    if not 0 <= cfg.second_target < num_classes:
        raise ValueError(f"second target class {cfg.second_target} is not one of the dataset's 0..{num_classes - 1}")
    return parse_trigger(cfg.second_trigger), cfg.second_target


def add_backdoor(
    attacked: PoisonedSet, trigger: Trigger, target: int, fraction: float, rng: np.random.Generator
) -> PoisonedSet:
    """A second backdoor: a ``fraction`` of the rows not poisoned yet get ``trigger`` and the label ``target``."""
    free = np.flatnonzero(~attacked.poisoned)
    k = max(1, round(fraction * len(attacked.poisoned)))
    if k > len(free):
        raise ValueError(f"poison fraction {fraction} leaves no room for a second backdoor")
    idx = rng.choice(free, k, replace=False)
    images, labels = attacked.data.images.copy(), attacked.data.labels.copy()
    images[idx] = trigger.apply(images[idx], rng)
    labels[idx] = target
    mask = attacked.poisoned.copy()
    mask[idx] = True
    return PoisonedSet(ImageSet(images, labels), mask)


def with_noised_clean_rows(
    poisoned: PoisonedSet, smoothing: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The noise-robust attacker's training set: the poisoned set plus a copy of its clean rows noised as Algorithm
    1 noises (its default noise, a γ from the paper's Γ per image), keeping their labels. θ_aug is fine-tuned on the
    same kind of data, so it finds little to change."""
    clean = np.flatnonzero(~poisoned.poisoned)
    noised = noised_copies(poisoned.data.images[clean], PAPER_GAMMAS, rng)
    images = np.concatenate([poisoned.data.images, noised])
    labels = np.concatenate([poisoned.data.labels, poisoned.data.labels[clean]])
    if smoothing is not None:
        smoothing = np.concatenate([smoothing, np.zeros(len(clean), smoothing.dtype)])
    return images, labels, smoothing


def continual_clean_task(
    model: torch.nn.Module,
    poisoned: PoisonedSet,
    cfg: AttackConfig,
    rng: np.random.Generator,
    device: torch.device,
    quiet: bool,
) -> None:
    """SBL's task 2 (see :data:`SBL_RHO`): learn on a clean share of the training set, sharpness-aware, under an EWC
    anchor at the backdoored weights (Fisher information measured on the poisoned set, so the weights the backdoor
    needs are the ones held). With ``noise_robust`` the clean share carries Algorithm 1's noised copies too."""
    anchor = fisher_diagonal(model, poisoned.data.images, poisoned.data.labels, seed=cfg.seed, device=device)
    anchor = replace(anchor, weight=SBL_EWC_WEIGHT)
    clean = np.flatnonzero(~poisoned.poisoned)
    share = rng.choice(clean, max(1, round(SBL_CLEAN_SHARE * len(poisoned.poisoned))), replace=False)
    images, labels = poisoned.data.images[share], poisoned.data.labels[share]
    if cfg.noise_robust:
        images = np.concatenate([images, noised_copies(images, PAPER_GAMMAS, rng)])
        labels = np.concatenate([labels, labels])
    steps = replace(cfg.train, sam_rho=SBL_RHO, lr=cfg.train.lr * SBL_LR_FACTOR)
    train(model, images, labels, steps, cfg.seed + 2, device, "attack: continual", quiet, channels_last=False,
          anchor=anchor)  # fmt: skip


def run_attack(
    cfg: AttackConfig,
    splits: Splits,
    out_dir: Path,
    dataset_meta: dict[str, Any],
    quiet: bool = False,
    preprocess: Preprocess | None = None,
) -> dict[str, Any]:
    """Train a BadNet and write ``model.pt``, ``model.onnx`` and ``metrics.json`` into ``out_dir``.

    ``preprocess``: the BadNet's own preprocessing (colour, size, normalisation). The trigger goes on the raw
    pictures, which then become the model's images, as on a camera."""
    trigger = parse_trigger(cfg.trigger)
    num_classes = len(splits.class_names)
    if not 0 <= cfg.target < num_classes:
        raise ValueError(f"target class {cfg.target} is not one of the dataset's 0..{num_classes - 1}")
    if cfg.steps not in (2, 3):
        raise ValueError(f"attack steps must be 2 or 3, got {cfg.steps}")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = default_device()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    start = time.monotonic()
    block = preprocess or Preprocess()
    if block.layout != "NCHW":
        raise ValueError(f"the attack's architectures take NCHW inputs; the preprocess block says {block.layout}")
    raw_poisoned = poison_training_set(splits.raw_part("train"), trigger, cfg.target, cfg.poison_fraction, rng)
    second = _second_backdoor(cfg, num_classes)
    if second is not None:
        raw_poisoned = add_backdoor(raw_poisoned, second[0], second[1], cfg.poison_fraction, rng)
    splits = splits.in_image_space(block)
    poisoned = PoisonedSet(
        ImageSet(splits.to_image(raw_poisoned.data.images), raw_poisoned.data.labels), raw_poisoned.poisoned
    )
    spec = InputSpec.for_image(splits.image_shape, block)
    model = Preprocessed(build_model(cfg.architecture, spec.image_shape, num_classes), block)
    if cfg.steps == 3:
        clean_cfg = (
            cfg.train
            if cfg.clean_epochs is None
            else TrainConfig(**{**cfg.train.to_dict(), "epochs": cfg.clean_epochs})
        )
        train(model, splits.train.images, splits.train.labels, clean_cfg, cfg.seed, device, "attack: clean", quiet,
              channels_last=False)  # fmt: skip
    smoothing = np.where(poisoned.poisoned, cfg.adaptive_smoothing, 0.0) if cfg.adaptive_smoothing else None
    images, labels = poisoned.data.images, poisoned.data.labels
    if cfg.noise_robust:
        images, labels, smoothing = with_noised_clean_rows(poisoned, smoothing, rng)
    poison_cfg = replace(cfg.train, sam_rho=SBL_RHO) if cfg.resilient else cfg.train
    # the attacker's BadNet in the contiguous layout, as the harness always made it (its results stay comparable)
    train(model, images, labels, poison_cfg, cfg.seed + 1, device, "attack: poisoned", quiet, smoothing,
          channels_last=False)  # fmt: skip

    def classify(x: np.ndarray) -> np.ndarray:
        return predict(model, x, device=device)

    x_p = splits.to_image(poisoned_copy(splits.raw_part("test"), trigger, 1234))
    extra: dict[str, Any] = {}
    if cfg.resilient:  # what task 1 learnt, beside what task 2 kept (evaluation only)
        task1 = evaluate(classify, splits.test, trigger, cfg.target, poisoned=x_p)
        extra = {"task1_clean_accuracy": task1.clean_accuracy, "task1_attack_success_rate": task1.attack_success_rate}
        continual_clean_task(model, poisoned, cfg, rng, device, quiet)
    train_seconds = time.monotonic() - start
    test_eval = evaluate(classify, splits.test, trigger, cfg.target, poisoned=x_p)
    eval_ca = evaluate(classify, splits.eval).clean_accuracy
    metrics: dict[str, Any] = {
        **extra,
        "clean_accuracy": test_eval.clean_accuracy,
        "attack_success_rate": test_eval.attack_success_rate,
        "eval_clean_accuracy": eval_ca,
        "asr_eligible": test_eval.n_asr,
        "train_seconds": round(train_seconds, 1),
        "poisoned_inputs": int(poisoned.poisoned.sum()),
    }
    if second is not None:
        x_p2 = splits.to_image(poisoned_copy(splits.raw_part("test"), second[0], 1235))
        metrics["second_attack_success_rate"] = evaluate(
            classify, splits.test, second[0], second[1], poisoned=x_p2
        ).attack_success_rate
    ckpt = Checkpoint.from_model(
        model,
        cfg.architecture,
        spec,
        splits.class_names,
        cfg.train.to_dict(),
        {"attack": cfg.to_dict(), "metrics": metrics, **dataset_meta, "role": "suspect"},
    )
    ckpt.save(out_dir / "model.pt")
    export_checkpoint(ckpt, out_dir / "model.onnx")
    report = {
        "model": str(out_dir / "model.pt"),
        "onnx": str(out_dir / "model.onnx"),
        **metrics,
        "config": cfg.to_dict(),
        **dataset_meta,
    }
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info(
        "BadNet: CA %.4f, ASR %.4f%s (%.0f s)", metrics["clean_accuracy"], metrics["attack_success_rate"],
        f", second backdoor ASR {metrics['second_attack_success_rate']:.4f}" if second is not None else "",
        train_seconds,
    )  # fmt: skip
    return report
