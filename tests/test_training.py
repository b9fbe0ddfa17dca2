"""The training run that successive halving grows: stopped and continued, it computes what one run computes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from trainer.science.models import build_model
from trainer.science.training import (
    Run,
    TrainConfig,
    Unlearn,
    fisher_diagonal,
    pick_precision,
    sam_ascent,
    sam_descent,
    takes_channels_last,
    train,
)


def _data(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_run_stopped_and_continued_ends_with_the_weights_of_one_run(schedule: str) -> None:
    images, labels = _data()
    away = Unlearn(images[:40], labels[:40], 0.5, batch_size=8)  # draws from the batch generator every step
    cfg = TrainConfig(epochs=3, lr=3e-3, batch_size=64, optimizer="adam", schedule=schedule)
    torch.manual_seed(123)
    whole = build_model("cnn3", (1, 28, 28), 10)  # dropout: the torch RNG must carry over too
    pieces = build_model("cnn3", (1, 28, 28), 10)
    pieces.load_state_dict(whole.state_dict())
    losses = train(whole, images, labels, cfg, seed=5, device=torch.device("cpu"), quiet=True, unlearn=away)
    run = Run(pieces, images, labels, cfg, seed=5, unlearn=away)
    assert run.total_steps == 3 * 5
    for until in (2, 5, 11, None):  # mid-epoch, at an epoch's end, mid-epoch again, the rest
        torch.manual_seed(999)  # anything else drawing from torch's RNG between the pieces changes nothing
        run.advance(until, torch.device("cpu"), quiet=True)
    assert run.finished and run.epochs_done == 3
    assert run.losses == pytest.approx(losses, abs=0)
    for (name, a), b in zip(whole.state_dict().items(), pieces.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_run_pickles_between_its_pieces_as_a_ray_task_hands_it_back() -> None:
    import pickle

    images, labels = _data(200, 1)
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=50)
    torch.manual_seed(0)
    a, b = build_model("cnn3", (1, 28, 28), 10), build_model("cnn3", (1, 28, 28), 10)
    b.load_state_dict(a.state_dict())
    train(a, images, labels, cfg, seed=1, device=torch.device("cpu"), quiet=True)
    run = Run(b, images, labels, cfg, seed=1)
    run.advance(3, torch.device("cpu"), quiet=True)
    run = pickle.loads(pickle.dumps(run))
    model = run.advance(None, torch.device("cpu"), quiet=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), model.state_dict().values(), strict=True))


def test_channels_last_is_used_where_the_model_takes_it_and_left_where_it_does_not() -> None:
    class Viewing(torch.nn.Module):  # an outsider's habit: .view on a conv's output needs the contiguous layout
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.head = torch.nn.Linear(4 * 28 * 28, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.head(y.view(y.shape[0], -1))

    x = torch.rand(2, 1, 28, 28)
    assert takes_channels_last(build_model("cnn3", (1, 28, 28), 10), x)
    viewing = Viewing()
    assert not takes_channels_last(viewing, x)
    assert viewing.conv.weight.is_contiguous() and viewing.training  # left as it was
    images, labels = _data(100, 2)
    run = Run(viewing, images, labels, TrainConfig(epochs=1, batch_size=50), seed=0)
    run.advance(None, torch.device("cpu"), quiet=True)  # trains, in the contiguous layout
    assert run.finished and run.channels_last is False
    asked = Run(build_model("cnn3", (1, 28, 28), 10), images, labels, TrainConfig(epochs=1, batch_size=50), seed=0,
                channels_last=False)  # fmt: skip
    asked.advance(None, torch.device("cpu"), quiet=True)  # the attack's BadNets: contiguous although cnn3 takes it
    assert asked.channels_last is False and asked.finished


def test_precision_auto_resolves_to_one_the_run_records_and_an_explicit_one_is_kept() -> None:
    images, labels = _data(128, 3)
    model = build_model("cnn3", (1, 28, 28), 10)
    before = [p.detach().clone() for p in model.parameters()]
    chosen = pick_precision(model, images, labels, TrainConfig(precision="auto"), torch.device("cpu"))
    assert chosen in ("fp32", "bf16")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))  # probed on a copy
    assert pick_precision(model, images, labels, TrainConfig(precision="fp32"), torch.device("cpu")) == "fp32"
    run = Run(model, images, labels, TrainConfig(epochs=1, precision="auto"), seed=0)
    run.advance(None, torch.device("cpu"), quiet=True)
    assert run.cfg.precision in ("fp32", "bf16") and run.cfg.to_dict()["precision"] != "auto"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        TrainConfig(precision="fp16")


def _distance(a: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    return sum(float(((p.detach() - reference[n]) ** 2).sum()) for n, p in a.named_parameters()) ** 0.5


def test_sam_steps_at_the_worst_nearby_point_and_puts_the_weights_back() -> None:
    images, labels = _data(200, 2)
    torch.manual_seed(0)
    model = build_model("cnn3", (1, 28, 28), 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.from_numpy(images[:32]).float() / 255
    torch.nn.functional.cross_entropy(model.eval()(x), torch.from_numpy(labels[:32])).backward()
    moves = sam_ascent(model, 0.05)
    assert _distance(model, before) == pytest.approx(0.05, rel=1e-3)  # ρ along the normalised gradient
    sam_descent(moves)
    assert _distance(model, before) < 1e-6
    plain, sharp = build_model("cnn3", (1, 28, 28), 10), build_model("cnn3", (1, 28, 28), 10)
    sharp.load_state_dict(plain.state_dict())
    cpu = torch.device("cpu")
    a = train(plain, images, labels, TrainConfig(epochs=3, batch_size=50), seed=1, device=cpu, quiet=True)
    b = train(sharp, images, labels, TrainConfig(epochs=3, batch_size=50, sam_rho=0.05), seed=1, device=cpu,
              quiet=True)  # fmt: skip
    assert b != a and b[-1] < b[0]  # another path, and it learns
    with pytest.raises(ValueError, match="SAM radius"):
        TrainConfig(sam_rho=-1.0)


def test_an_ewc_anchor_holds_the_weights_that_mattered_to_the_first_task() -> None:
    images, labels = _data(300, 3)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    first = build_model("cnn3", (1, 28, 28), 10)
    train(first, images[:150], labels[:150], TrainConfig(epochs=2, batch_size=50), seed=0, device=cpu, quiet=True)
    anchor = fisher_diagonal(first, images[:150], labels[:150], batches=5, device=cpu)
    assert anchor.penalty(first).item() == 0.0  # nothing moved yet
    assert all(float(f.sum()) >= 0 for f in anchor.importance.values()) and any(
        float(f.sum()) > 0 for f in anchor.importance.values()
    )
    free, held = build_model("cnn3", (1, 28, 28), 10), build_model("cnn3", (1, 28, 28), 10)
    free.load_state_dict(first.state_dict())
    held.load_state_dict(first.state_dict())
    second = TrainConfig(epochs=2, batch_size=50, lr=3e-3)
    train(free, images[150:], labels[150:], second, seed=1, device=cpu, quiet=True)
    train(held, images[150:], labels[150:], second, seed=1, device=cpu, quiet=True,
          anchor=replace(anchor, weight=1e6))  # fmt: skip
    weighted = {n: anchor.importance[n] for n, _ in first.named_parameters()}

    def moved(m: torch.nn.Module) -> float:  # how far the important weights went
        ref = anchor.reference
        return sum(float((weighted[n] * (p.detach() - ref[n]) ** 2).sum()) for n, p in m.named_parameters())

    assert moved(held) < 0.5 * moved(free)
