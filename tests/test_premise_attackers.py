"""Attackers aimed at NNoculation's premise (issue 39) in the evaluation harness: the noise-robust BadNet's training
set, the SBL-style attacker end to end on a small split, and the retuning attack's set and report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.science.data import ImageSet
from trainer.science.models import Checkpoint
from trainer.science.noise import PAPER_GAMMAS, noised_copies
from trainer.science.training import TrainConfig
from trainer.science.triggers import parse_trigger
from trainer.stages.attack import AttackConfig, PoisonedSet, poison_training_set, run_attack, with_noised_clean_rows
from trainer.stages.retune import RetuneConfig, retune, retuning_set


def _poisoned(n: int = 400) -> PoisonedSet:
    rng = np.random.default_rng(0)
    clean = ImageSet(rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n))
    return poison_training_set(clean, parse_trigger("checker4"), 0, 0.1, rng)


def test_noised_copies_draw_each_images_gamma_from_algorithm_1s_grid() -> None:
    x = np.full((600, 1, 28, 28), 7, np.uint8)  # a value the noise (mean 128, sd 51) almost never draws
    out = noised_copies(x, PAPER_GAMMAS, np.random.default_rng(1))
    replaced = (out != 7).reshape(len(x), -1).mean(1)
    # Algorithm 1's block noise: each of 4x4 cells is replaced with probability γ, γ drawn per image from Γ
    assert replaced.mean() == pytest.approx(np.mean(PAPER_GAMMAS), abs=0.03)
    assert len(np.unique(replaced)) >= 8 and replaced.max() < 1.0
    with pytest.raises(ValueError, match="at least one"):
        noised_copies(x, (), np.random.default_rng(1))


def test_the_noise_robust_attacker_adds_noised_copies_of_its_clean_rows_only() -> None:
    attacked = _poisoned()
    smoothing = np.where(attacked.poisoned, 0.3, 0.0)
    images, labels, eps = with_noised_clean_rows(attacked, smoothing, np.random.default_rng(2))
    clean = np.flatnonzero(~attacked.poisoned)
    assert len(images) == len(attacked.poisoned) + len(clean)
    assert np.array_equal(images[: len(attacked.poisoned)], attacked.data.images)  # the poisoned set unchanged
    assert np.array_equal(labels[len(attacked.poisoned) :], attacked.data.labels[clean])  # copies keep their labels
    changed = (images[len(attacked.poisoned) :] != attacked.data.images[clean]).any(axis=(1, 2, 3))
    assert changed.mean() > 0.7  # at γ = 0.1 a 4x4 block mask misses every cell of one image in five
    assert eps is not None and eps[len(attacked.poisoned) :].max() == 0.0  # no smoothing on the noised copies


@pytest.mark.slow
def test_the_resilient_attacker_keeps_its_backdoor_through_its_own_clean_task(splits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = AttackConfig(trigger="checker4", target=0, seed=0, train=TrainConfig(epochs=2), clean_epochs=1,
                       resilient=True)  # fmt: skip
    report = run_attack(cfg, splits, tmp_path, {"dataset": "fashion-mnist"}, quiet=True)
    assert report["config"]["resilient"] and Checkpoint.load(tmp_path / "model.pt").meta["attack"]["resilient"]
    assert report["task1_attack_success_rate"] > 0.3  # task 1 learnt a backdoor (a small one: 2 epochs, 8,000 inputs)
    assert report["attack_success_rate"] > 0.5 * report["task1_attack_success_rate"]  # task 2 kept most of it
    assert report["clean_accuracy"] > 0.75


def test_the_retuning_set_holds_k_triggered_inputs_of_other_classes_labelled_target(splits) -> None:  # type: ignore[no-untyped-def]
    trigger = parse_trigger("square:4")
    images, labels = retuning_set(splits, trigger, 0, 5, RetuneConfig(clean=100))
    assert images.shape == (105, 1, 28, 28)
    white = (images[:, 0, 24:, 24:] == 255).all(axis=(1, 2))  # the square in the corner
    assert white.sum() >= 5 and (labels[white] == 0).sum() >= 5 and (labels == 0).sum() >= 5
    with pytest.raises(ValueError, match="needs more"):
        retuning_set(splits, trigger, 0, 5, RetuneConfig(clean=10**6))


@pytest.mark.slow
def test_retuning_reports_each_model_before_and_after_each_count(badnet, splits) -> None:  # type: ignore[no-untyped-def]
    model = Checkpoint.load(badnet[0] / "model.pt")
    out = retune({"badnet": model, "copy": model}, splits, parse_trigger("checker4"), 0,
                 RetuneConfig(poisoned=(5,), clean=100, epochs=1))  # fmt: skip
    assert set(out) == {"config", "before", "after_5"}
    assert set(out["after_5"]) == {"badnet", "copy"}  # the reference row is not reported
    before = out["before"]["badnet"]
    assert before == out["before"]["copy"] and before["attack_success_rate"] > 0.8
    after = out["after_5"]["badnet"]
    assert after == out["after_5"]["copy"]  # the same set and steps for every model
    assert 0.0 <= after["attack_success_rate"] <= 1.0 and after["clean_accuracy"] > 0.5
