"""Supervised training and batched prediction on uint8 image arrays."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from edge_agent.options import flag, positive, positive_float

log = logging.getLogger(__name__)


OPTIMIZERS: dict[str, Callable[[Any, TrainConfig], torch.optim.Optimizer]] = {
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=0.9, weight_decay=c.weight_decay),
    "adadelta": lambda p, c: torch.optim.Adadelta(p, lr=c.lr, weight_decay=c.weight_decay),
}
# the learning rate over a run: held, or annealed from ``lr`` to 0 along half a cosine, step by step (Loshchilov
# & Hutter's SGDR without restarts); the repair's fine-tuning anneals (measured in bench/NOTES.md, session 15)
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: the attacker's or the defender's fine-tuning."""

    epochs: int = flag(3, "training epochs", type=positive)
    lr: float = flag(1e-3, "learning rate", type=positive_float)
    batch_size: int = flag(128, "batch size", type=positive)
    optimizer: str = flag("adam", "optimizer", choices=tuple(OPTIMIZERS))
    weight_decay: float = 0.0
    schedule: str = "constant"  # one of SCHEDULES

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for checkpoints and reports."""
        return asdict(self)


def make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` (see :data:`OPTIMIZERS`)."""
    try:
        factory = OPTIMIZERS[cfg.optimizer]
    except KeyError:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}") from None
    return factory(params, cfg)


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_input(images: np.ndarray, device: torch.device, scale: float = 1.0 / 255.0) -> torch.Tensor:
    """(N, C, H, W) uint8 -> float32 tensor in [0, 1] on ``device``."""
    return torch.from_numpy(images).to(device).float().mul_(scale)


@dataclass(frozen=True)
class Unlearn:
    """Inputs to move off given labels while training: each step adds ``weight`` × the mean of −log(1 − p_label)
    over ``batch_size`` of ``images`` drawn at random, each against its own entry of ``labels``. The term teaches no
    answer (only "not this one") and vanishes once the model has left the label; the repair uses it on the purified
    quarantine, each input against the BadNet's answer to it (label-free)."""

    images: np.ndarray
    labels: np.ndarray
    weight: float
    batch_size: int = 32


def leave_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean −log(1 − p_label) over the rows, in log space: logsumexp over the other classes minus over all."""
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(others, dim=1)).mean()


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against targets smoothed per input by ``eps`` (N,): (1 − ε)·CE + ε·(mean −log p)."""
    logp = torch.log_softmax(logits, dim=1)
    hard = -logp.gather(1, labels[:, None])[:, 0]
    return ((1.0 - eps) * hard + eps * -logp.mean(dim=1)).mean()


def train(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    seed: int,
    device: torch.device | None = None,
    desc: str = "train",
    quiet: bool = False,
    smoothing: np.ndarray | None = None,
    unlearn: Unlearn | Sequence[Unlearn] | None = None,
) -> list[float]:
    """Train ``model`` in place on uint8 ``images`` (N, C, H, W) and ``labels`` (N,); returns epoch losses.

    ``smoothing`` (N,) in [0, 1]: label smoothing per input (its target keeps 1 − ε of the mass plus ε spread
    evenly over the classes); None: hard labels. ``unlearn``: a term that moves other inputs off a label
    (:class:`Unlearn`), or several, each on a batch of its own every step."""
    device = device or default_device()
    model.to(device).train()
    opt = make_optimizer(model.parameters(), cfg)
    loss_fn = nn.CrossEntropyLoss()
    eps_all = None if smoothing is None else torch.from_numpy(np.asarray(smoothing, dtype=np.float32))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    n = len(labels)
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels.astype(np.int64))
    terms = [unlearn] if isinstance(unlearn, Unlearn) else list(unlearn or [])
    unlearning = [
        (torch.from_numpy(u.images), torch.from_numpy(np.asarray(u.labels, dtype=np.int64)), u)
        for u in terms
        if len(u.images) and u.weight > 0
    ]
    losses: list[float] = []
    steps = (n + cfg.batch_size - 1) // cfg.batch_size
    anneal = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps) if cfg.schedule == "cosine" else None
    )
    with tqdm(total=cfg.epochs * steps, desc=desc, disable=quiet, leave=False, unit="batch") as bar:
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            total, count = 0.0, 0
            for start in range(0, n, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                x = x_all[idx].to(device).float().mul_(1.0 / 255.0)
                y = y_all[idx].to(device)
                opt.zero_grad(set_to_none=True)
                logits = model(x)
                if eps_all is None:
                    loss = loss_fn(logits, y)
                else:
                    loss = smoothed_cross_entropy(logits, y, eps_all[idx].to(device))
                for u_all, u_labels, term in unlearning:
                    pick = torch.randint(len(u_all), (min(term.batch_size, len(u_all)),), generator=gen)
                    u = u_all[pick].to(device).float().mul_(1.0 / 255.0)
                    loss = loss + term.weight * leave_label_loss(model(u), u_labels[pick].to(device))
                loss.backward()
                opt.step()
                if anneal is not None:
                    anneal.step()
                total += loss.item() * len(idx)
                count += len(idx)
                bar.update(1)
            losses.append(total / max(count, 1))
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
            level = logging.INFO if quiet else logging.DEBUG  # quiet: no bar, so a log line shows progress
            log.log(level, "%s epoch %d/%d loss %.4f", desc, epoch + 1, cfg.epochs, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def predict(
    model: nn.Module, images: np.ndarray, batch_size: int = 1024, device: torch.device | None = None
) -> np.ndarray:
    """Predicted labels (N,) int64 for uint8 ``images`` (N, C, H, W)."""
    device = device or default_device()
    model.to(device).eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start : start + batch_size], device)
        out.append(model(x).argmax(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
