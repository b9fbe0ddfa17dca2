"""Clean accuracy (CA) and attack success rate (ASR), exactly as the paper's §2.3 defines them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trainer.science.data import ImageSet, Splits
from trainer.science.triggers import Trigger

# Anything that maps uint8 images (N, C, H, W) to predicted labels (N,): a torch model, an ONNX session.
Classifier = Callable[[np.ndarray], np.ndarray]


def clean_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of clean inputs classified as their true class (Definition 1)."""
    if len(labels) == 0:
        raise ValueError("clean accuracy of an empty set is undefined")
    return float(np.mean(pred == labels))


def asr_mask(
    labels: np.ndarray, reference_clean_pred: np.ndarray, target: int, victims: np.ndarray | None = None
) -> np.ndarray:
    """Which test inputs count for the ASR: true class != target and the BadNet right on the clean input (and,
    for a source-specific trigger, ``victims``: of a source class)."""
    mask = (labels != target) & (reference_clean_pred == labels)
    return mask if victims is None else mask & victims


def attack_success_rate(
    pred_poisoned: np.ndarray,
    labels: np.ndarray,
    reference_clean_pred: np.ndarray,
    target: int,
    victims: np.ndarray | None = None,
) -> float:
    """Fraction of the eligible poisoned inputs sent to ``target`` (Definition 2).

    ``reference_clean_pred`` are the *BadNet's* predictions on the clean inputs: the eligible set is fixed by
    the BadNet, so a treated model is measured on the same inputs as the BadNet it came from.
    """
    mask = asr_mask(labels, reference_clean_pred, target, victims)
    if not mask.any():
        raise ValueError("no test input is eligible for the ASR (all of the target class or all misclassified)")
    return float(np.mean(pred_poisoned[mask] == target))


@dataclass(frozen=True)
class Evaluation:
    """CA and (when a trigger is given) ASR of one model on one test set."""

    clean_accuracy: float
    attack_success_rate: float | None
    n_clean: int
    n_asr: int

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON form."""
        return dict(self.__dict__)


def poisoned_copy(test: ImageSet, trigger: Trigger, seed: int) -> np.ndarray:
    """The test images with ``trigger`` applied, reproducibly for ``seed``."""
    return trigger.apply(test.images, np.random.default_rng(seed))


def evaluate(
    classify: Classifier,
    test: ImageSet,
    trigger: Trigger | None = None,
    target: int | None = None,
    reference: Classifier | np.ndarray | None = None,
    seed: int = 1234,
    poisoned: np.ndarray | None = None,
) -> Evaluation:
    """CA of ``classify`` on ``test``; with a trigger and target also its ASR.

    ``reference`` is the BadNet (a classifier, or its clean predictions) that fixes the ASR's eligible set;
    without it the model under test is its own reference. ``poisoned`` may pass a precomputed poisoned copy.
    """
    clean_pred = classify(test.images)
    ca = clean_accuracy(clean_pred, test.labels)
    if trigger is None or target is None:
        return Evaluation(ca, None, len(test), 0)
    if reference is None:
        ref_pred = clean_pred
    elif isinstance(reference, np.ndarray):
        ref_pred = reference
    else:
        ref_pred = reference(test.images)
    x_p = poisoned if poisoned is not None else poisoned_copy(test, trigger, seed)
    victims = trigger.victims(test.labels)
    asr = attack_success_rate(classify(x_p), test.labels, ref_pred, target, victims)
    return Evaluation(ca, asr, len(test), int(asr_mask(test.labels, ref_pred, target, victims).sum()))


def evaluate_models(
    models: dict[str, Classifier], splits: Splits, trigger: Trigger, target: int, seed: int
) -> dict[str, dict[str, float | int | None]]:
    """Test CA and ASR of each of ``models`` (the first is the BadNet: it fixes the ASR's eligible inputs), the
    trigger put on the raw test pictures with ``seed`` (the same triggered copy for every model)."""
    reference = next(iter(models.values()))(splits.test.images)
    x_p = splits.to_image(poisoned_copy(splits.raw_part("test"), trigger, seed))
    return {
        name: evaluate(fn, splits.test, trigger, target, reference, poisoned=x_p).to_dict()
        for name, fn in models.items()
    }
