"""Post-purification robustness (evaluation harness): is a repaired model repaired, or does a handful of the
attacker's samples turn it back into a BadNet?

The retuning attack of Min et al. ("Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor
Defense", NeurIPS 2024): fine-tune the purified model on a small set holding a few poisoned samples (the attacker's
trigger, labelled with its target) among clean ones, and measure the ASR it returns to. A backdoor that was
removed has to be learned anew from those few samples; one that was only hidden comes back at once. Every model
is re-tuned on the same set with the same steps, so the BadNet (the ceiling), clean fine-tuning and a model that
never saw the trigger (the floor: what k samples teach from scratch) read against each other.

Evaluation only: it reads the trigger and the target, which nothing the defense chooses may see.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from trainer.science.data import Splits
from trainer.science.metrics import Classifier, evaluate_models
from trainer.science.models import Checkpoint
from trainer.science.training import default_device, predict, train
from trainer.science.triggers import Trigger
from trainer.stages.publish import train_config_of


@dataclass(frozen=True)
class RetuneConfig:
    """The re-tuning set and its steps: ``poisoned`` samples (one run per count) among ``clean`` ones, drawn from
    the attacker's training split; ``epochs`` of the model's own optimizer at its own learning rate."""

    poisoned: tuple[int, ...] = (5, 20)
    clean: int = 500
    epochs: int = 5
    batch_size: int = 32
    seed: int = 0


def retuning_set(
    splits: Splits, trigger: Trigger, target: int, k: int, cfg: RetuneConfig
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` triggered training pictures of classes other than ``target`` labelled ``target``, and ``cfg.clean``
    clean ones with their labels (the model's images, shuffled)."""
    rng = np.random.default_rng([cfg.seed, k])
    raw = splits.raw_part("train")
    eligible = np.flatnonzero((raw.labels != target) & trigger.victims(raw.labels))
    if k + cfg.clean > len(eligible):
        raise ValueError(f"a re-tuning set of {k} + {cfg.clean} needs more than {len(eligible)} training inputs")
    rows = rng.choice(eligible, k + cfg.clean, replace=False)
    poisoned, clean = rows[:k], rows[k:]
    images = np.concatenate([splits.to_image(trigger.apply(raw.images[poisoned], rng)), splits.train.images[clean]])
    labels = np.concatenate([np.full(k, target, raw.labels.dtype), splits.train.labels[clean]])
    order = rng.permutation(len(labels))
    return images[order], labels[order]


def retune(
    models: dict[str, Checkpoint], splits: Splits, trigger: Trigger, target: int, cfg: RetuneConfig
) -> dict[str, Any]:
    """Test CA and ASR of each model before and after re-tuning with each count of poisoned samples. The first
    model is the BadNet: its clean answers fix the ASR's eligible inputs, as everywhere in the harness."""
    device = default_device()
    result: dict[str, Any] = {"config": {**cfg.__dict__, "poisoned": list(cfg.poisoned)}}
    nets = {name: ckpt.build() for name, ckpt in models.items()}
    result["before"] = _measure(nets, splits, trigger, target, cfg.seed, device)
    for k in cfg.poisoned:
        images, labels = retuning_set(splits, trigger, target, k, cfg)
        tuned = {}
        for name, ckpt in models.items():
            net = ckpt.build()
            steps = replace(train_config_of(ckpt), epochs=cfg.epochs, batch_size=cfg.batch_size, schedule="constant",
                            sam_rho=0.0, precision="fp32")  # fmt: skip
            train(net, images, labels, steps, cfg.seed, device, f"retune {name} k={k}", quiet=True,
                  channels_last=False)  # fmt: skip
            tuned[name] = net
        # the BadNet before re-tuning fixes the eligible inputs for every row
        result[f"after_{k}"] = _measure({"reference": nets[next(iter(nets))], **tuned}, splits, trigger, target,
                                        cfg.seed, device, drop_reference=True)  # fmt: skip
    return result


def _measure(
    nets: dict[str, Any],
    splits: Splits,
    trigger: Trigger,
    target: int,
    seed: int,
    device: Any,
    drop_reference: bool = False,
) -> dict[str, Any]:
    fns: dict[str, Classifier] = {name: _classifier(net, device) for name, net in nets.items()}
    out = evaluate_models(fns, splits, trigger, target, seed + 1234)
    if drop_reference:
        out.pop("reference")
    return {name: {"clean_accuracy": r["clean_accuracy"], "attack_success_rate": r["attack_success_rate"]}
            for name, r in out.items()}  # fmt: skip


def _classifier(net: Any, device: Any) -> Classifier:
    def classify(x: np.ndarray) -> np.ndarray:
        return predict(net, x, device=device)

    return classify
