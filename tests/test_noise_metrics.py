from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.science.data import ImageSet
from trainer.science.metrics import attack_success_rate, clean_accuracy, evaluate
from trainer.science.noise import NoiseConfig, augment, noise_mask, replace_with_noise


@pytest.mark.parametrize("mode", ["pixel", "block"])
def test_noise_fraction_and_distribution(mode: str) -> None:
    x = np.zeros((400, 1, 28, 28), dtype=np.uint8)
    y = replace_with_noise(x, 0.3, np.random.default_rng(0), NoiseConfig(mode=mode))
    # zero pixels stay zero unless replaced (a draw of 0 is ~0.6 sigma below... negligible: P(N(128,51.2)<0.5) ~ 0.6%)
    frac = (y > 0).mean()
    assert abs(frac - 0.3) < 0.03
    vals = y[y > 0].astype(float)
    assert abs(vals.mean() - 128) < 3 and abs(vals.std() - 51.2) < 3


def test_block_mask_is_coarse_like_imgaug_size_px_4() -> None:
    m = noise_mask((50, 28, 28), 0.5, NoiseConfig(mode="block", grid=4), np.random.default_rng(0))[:, 0]
    # A 4x4 plane upscaled to 28x28: constant on 7x7 blocks.
    blocks = m.reshape(50, 4, 7, 4, 7)
    assert (blocks == blocks[:, :, :1, :, :1]).all()
    pm = noise_mask((50, 28, 28), 0.5, NoiseConfig(mode="pixel"), np.random.default_rng(0))[:, 0]
    assert not (pm.reshape(50, 4, 7, 4, 7) == pm.reshape(50, 4, 7, 4, 7)[:, :, :1, :, :1]).all()


def test_mask_shared_across_channels_and_gamma_bounds() -> None:
    x = np.zeros((10, 3, 8, 8), dtype=np.uint8)
    y = replace_with_noise(x, 0.5, np.random.default_rng(0), NoiseConfig(mode="pixel", std=0.0, mean=200))
    assert ((y > 0).all(axis=1) == (y > 0).any(axis=1)).all()
    with pytest.raises(ValueError, match="gamma"):
        replace_with_noise(x, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="mask mode"):
        NoiseConfig(mode="stripes")


def test_augment_doubles_with_same_labels() -> None:
    s = ImageSet(np.zeros((6, 1, 4, 4), np.uint8), np.arange(6))
    a = augment(s, 0.5, np.random.default_rng(0))
    assert len(a) == 12 and np.array_equal(a.labels, np.concatenate([s.labels, s.labels]))


def test_asr_uses_only_eligible_inputs() -> None:
    labels = np.array([0, 1, 2, 3, 4])
    ref = np.array([0, 1, 2, 9, 4])  # BadNet wrong on index 3; index 0 is of the target class
    poisoned_pred = np.array([0, 0, 2, 0, 0])
    # eligible: 1, 2, 4 -> 1 and 4 go to target 0
    assert attack_success_rate(poisoned_pred, labels, ref, target=0) == pytest.approx(2 / 3)
    assert clean_accuracy(ref, labels) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="eligible"):
        attack_success_rate(poisoned_pred, np.zeros(5, int), np.zeros(5, int), target=0)


def test_evaluate_with_reference_classifier() -> None:
    from trainer.science.triggers import parse_trigger

    images = np.zeros((4, 1, 8, 8), np.uint8)
    test = ImageSet(images, np.array([1, 1, 2, 2]))

    def model(x: np.ndarray) -> np.ndarray:  # predicts 0 when a white square is present, else 1
        return np.where(x.reshape(len(x), -1).max(1) > 0, 0, 1)

    ev = evaluate(model, test, parse_trigger("square:2"), 0)
    assert ev.clean_accuracy == 0.5 and ev.attack_success_rate == 1.0 and ev.n_asr == 2
    ev2 = evaluate(model, test, parse_trigger("square:2"), 0, reference=np.array([1, 1, 2, 2]))
    assert ev2.n_asr == 4


def test_smoothing_per_input_matches_torch_and_keeps_smoothed_logits_lower() -> None:
    import torch
    from torch import nn

    from trainer.science.training import TrainConfig, smoothed_cross_entropy, train

    logits, labels = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 10
    for eps in (0.0, 0.3):
        ours = smoothed_cross_entropy(logits, labels, torch.full((64,), eps))
        assert torch.isclose(ours, nn.CrossEntropyLoss(label_smoothing=eps)(logits, labels), atol=1e-6)
    # an adaptive attacker's poisoned rows (ε 0.5) bound the margins the model learns; the same model and seed
    # with hard labels only learns larger ones (if the smoothing were ignored, both runs would be identical)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (400, 1, 4, 4), dtype=np.uint8)
    y = (images[:, 0, 0, 0] > 127).astype(np.int64)
    x, rows = torch.from_numpy(images).float() / 255.0, np.arange(400)

    def median_margin(smoothing: np.ndarray | None) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        train(model, images, y, TrainConfig(epochs=60, lr=0.05), 0, torch.device("cpu"), quiet=True,
              smoothing=smoothing)  # fmt: skip
        with torch.no_grad():
            z = model(x).numpy()
        return float(np.median(z[rows, y] - z[rows, 1 - y]))

    assert median_margin(np.where(rows % 2 == 0, 0.5, 0.0)) < 0.8 * median_margin(None)


def test_cosine_schedule_anneals_the_steps_and_unknown_schedules_are_refused() -> None:
    import torch
    from torch import nn

    from trainer.science.training import TrainConfig, train

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (256, 1, 4, 4), dtype=np.uint8)
    y = (images[:, 0, 0, 0] > 127).astype(np.int64)

    def moved(schedule: str) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        start = [p.detach().clone() for p in model.parameters()]
        cfg = TrainConfig(epochs=4, lr=0.001, batch_size=32, optimizer="sgd", schedule=schedule)
        train(model, images, y, cfg, 0, torch.device("cpu"), quiet=True)
        return float(sum((p.detach() - s).norm() for p, s in zip(model.parameters(), start, strict=True)))

    # the same seed, data and steps: annealed from lr to 0 along half a cosine, the steps sum to about half of
    # the held lr's, and so does the distance the weights travel (the schedule ignored: equal distances)
    assert moved("cosine") < 0.6 * moved("constant")  # measured 0.46
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")


def test_the_unlearning_term_moves_its_inputs_off_the_label() -> None:
    import torch
    from torch import nn

    from trainer.science.training import TrainConfig, Unlearn, leave_label_loss, train

    logits = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(32) % 10
    direct = -torch.log1p(-torch.softmax(logits, dim=1)[torch.arange(32), labels]).mean()
    assert torch.isclose(leave_label_loss(logits, labels), direct, atol=1e-6)
    # a BadNet in miniature: a pixel tells the class, and 10% of the training inputs carry a bright first pixel and
    # label 0. The term on 20 triggered inputs (no labels for them) moves the held-out triggered inputs off 0
    # (measured 0.05); without it the same seed sends all of them to 0
    rng = np.random.default_rng(0)
    images = rng.integers(0, 100, (600, 1, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 4, 600)
    images[:, 0, 0, 1] = y * 60
    poisoned = rng.random(600) < 0.1
    images[poisoned, 0, 0, 0], y = 255, np.where(poisoned, 0, y)
    triggered = rng.integers(0, 100, (200, 1, 4, 4), dtype=np.uint8)
    triggered[:, 0, 0, 1], triggered[:, 0, 0, 0] = rng.integers(1, 4, 200) * 60, 255

    def share_at_zero(weight: float, first: float | None = None) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
        u: Unlearn | list[Unlearn] = Unlearn(triggered[:20], np.zeros(20, dtype=np.int64), weight)
        if first is not None:  # two terms: an unrelated one first, each on its own batch every step
            u = [Unlearn(images[:20], y[:20], first), u]
        train(model, images, y, TrainConfig(epochs=30, lr=0.05), 0, torch.device("cpu"), quiet=True, unlearn=u)
        with torch.no_grad():
            answers = model(torch.from_numpy(triggered[20:]).float() / 255.0).argmax(1).numpy()
        return float(np.mean(answers == 0))

    assert share_at_zero(0.0) > 0.9
    assert share_at_zero(1.0) < 0.2
    assert share_at_zero(1.0, first=0.0) == share_at_zero(1.0)  # a term of weight 0 is not drawn from
    assert share_at_zero(1.0, first=0.3) < 0.2  # another term does not dilute this one


def test_earlier_repairs_unlearned_inputs_are_collected_through_the_chain(tmp_path: Path) -> None:
    import json

    from edge_agent.formats.preprocess import Preprocess
    from protos.nnoc.v1 import quarantine_pb2
    from trainer.service.quarantine import QuarantineStore
    from trainer.stages.repair import earlier_unlearned

    def repair_dir(name: str, labels: list[int], kept: list[int], earlier: list[Path]) -> Path:
        q = tmp_path / name / "q"

        def header(seq: int, label: int) -> quarantine_pb2.QuarantineHeader:
            return quarantine_pb2.QuarantineHeader(
                device_id="cam-1", fleet="f", bundle_version=1, seq=seq, shape=[1, 28, 28], dtype="uint8",
                primary_label=label, monitor_label=1,
            )  # fmt: skip

        with QuarantineStore(q) as store:
            store.add_many((header(seq, label), np.full((1, 28, 28), seq, np.uint8).tobytes())
                           for seq, label in enumerate(labels))  # fmt: skip
        out = tmp_path / name / "out"
        out.mkdir()
        report = {"quarantine": str(q), "kept_keys": [["cam-1", k] for k in kept], "unlearn_earlier": [str(e)
                  for e in earlier]}  # fmt: skip
        (out / "report.json").write_text(json.dumps(report))
        return out

    first = repair_dir("v2", [0, 0, 5, 0], kept=[0, 1, 3], earlier=[])
    second = repair_dir("v3", [4, 7, 4], kept=[0, 2], earlier=[first])
    got = earlier_unlearned([second, first], Preprocess(), (1, 28, 28))  # the first one named twice: taken once
    assert got.repairs == [str(second.resolve()), str(first.resolve())]
    assert got.labels.tolist() == [4, 4, 0, 0, 0]  # what each repair kept, with its deployed primary's labels
    assert [int(i[0, 0, 0]) for i in got.images] == [0, 2, 0, 1, 3]
    assert len(earlier_unlearned([], Preprocess(), (1, 28, 28)).labels) == 0
    with pytest.raises(ValueError, match="not a folder an earlier `repair --out` wrote"):
        earlier_unlearned([tmp_path], Preprocess(), (1, 28, 28))
    with pytest.raises(ValueError, match="the model"):
        earlier_unlearned([first], Preprocess(), (3, 32, 32))
