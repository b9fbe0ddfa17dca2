"""Supervised training and batched prediction on uint8 image arrays."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

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
# & Hutter's SGDR without restarts); the repair's fine-tuning anneals (measured in bench/NOTES.md, "The repair's
# fine-tuning recipe")
SCHEDULES = ("constant", "cosine")
# the arithmetic of the steps: fp32, or bf16 autocast (weights, optimizer state and the losses stay fp32); auto:
# bf16 where a timed probe finds it at least BF16_SPEEDUP times faster here (:func:`pick_precision`)
PRECISIONS = ("fp32", "bf16", "auto")
BF16_SPEEDUP = 1.3


@dataclass(frozen=True)
class TrainConfig:
    """One training run: the attacker's or the defender's fine-tuning."""

    epochs: int = flag(3, "training epochs", type=positive)
    lr: float = flag(1e-3, "learning rate", type=positive_float)
    batch_size: int = flag(128, "batch size", type=positive)
    optimizer: str = flag("adam", "optimizer", choices=tuple(OPTIMIZERS))
    weight_decay: float = 0.0
    schedule: str = "constant"  # one of SCHEDULES
    precision: str = flag("fp32", "arithmetic of the steps (auto: bf16 where it is faster here)", choices=PRECISIONS)
    # sharpness-aware minimization (Foret et al., ICLR 2021): each step takes the gradient at the weights moved by
    # ρ along the normalised gradient (the worst nearby point), so training ends in a flat region; 0: plain steps
    sam_rho: float = 0.0
    # adaptive SAM (ASAM, Kwon et al., ICML 2021): the neighbourhood scaled per weight by its magnitude, so ρ is
    # relative (FT-SAM's ρ = 2 is this kind)
    sam_adaptive: bool = False

    def __post_init__(self) -> None:
        if self.sam_rho < 0:
            raise ValueError(f"the SAM radius must be >= 0, got {self.sam_rho}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")

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


class Penalty(Protocol):
    """A term on the model's weights added to every step's loss (``weight`` 0: off)."""

    @property
    def weight(self) -> float: ...

    def penalty(self, model: nn.Module) -> torch.Tensor: ...


@dataclass(frozen=True)
class Anchor:
    """Elastic weight consolidation (Kirkpatrick et al., PNAS 2017): each step adds ``weight`` / 2 × Σ F·(θ − θ*)²,
    which holds the parameters that mattered to an earlier task (large Fisher information F) near their values θ*
    while the others move. ``reference`` and ``importance`` map parameter names to tensors (see
    :func:`fisher_diagonal`)."""

    reference: dict[str, torch.Tensor]
    importance: dict[str, torch.Tensor]
    weight: float

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """The term for ``model``'s current parameters."""
        total = torch.zeros((), device=next(model.parameters()).device)
        for name, p in model.named_parameters():
            if name in self.importance:
                ref, imp = self.reference[name].to(p.device), self.importance[name].to(p.device)
                total = total + (imp * (p.float() - ref) ** 2).sum()
        return 0.5 * self.weight * total


def fisher_diagonal(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    batches: int = 20,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | None = None,
) -> Anchor:
    """An :class:`Anchor` (weight 1) at ``model``'s current parameters: the empirical Fisher information's diagonal,
    the mean squared gradient of the cross-entropy over ``batches`` random batches of (``images``, ``labels``)."""
    device = device or default_device()
    model.to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for _ in range(batches):
        idx = torch.randint(len(labels), (min(batch_size, len(labels)),), generator=gen).numpy()
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(to_input(images[idx], device)), torch.from_numpy(
            labels[idx].astype(np.int64)).to(device))  # fmt: skip
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float() ** 2 / batches
    model.zero_grad(set_to_none=True)
    return Anchor({n: p.detach().float().cpu().clone() for n, p in params.items()},
                  {n: f.cpu() for n, f in fisher.items()}, 1.0)  # fmt: skip


def sam_ascent(model: nn.Module, rho: float, adaptive: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Move ``model``'s parameters by ρ along their normalised gradient (SAM's first step), in place; returns the
    moves, for :func:`sam_descent` to take back once the gradient at the moved point is known. ``adaptive``: ASAM's
    step, e = ρ·T²g / ‖Tg‖ with T = |w| per weight."""
    grads = [(p, p.grad) for p in model.parameters() if p.grad is not None]
    scales = [p.detach().float().abs() if adaptive else torch.ones((), device=p.device) for p, _ in grads]
    norm = torch.norm(torch.stack([(t * g.detach().float()).norm(2) for t, (_, g) in zip(scales, grads, strict=True)]))
    moves: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for t, (p, g) in zip(scales, grads, strict=True):
            e = (t * t * g.float() * rho / (norm + 1e-12)).to(p.dtype)
            p.add_(e)
            moves.append((p, e))
    return moves


def sam_descent(moves: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the parameters back where :func:`sam_ascent` found them (their gradients stay the moved point's)."""
    with torch.no_grad():
        for p, e in moves:
            p.sub_(e)


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
    channels_last: bool = True,
    anchor: Penalty | None = None,
) -> list[float]:
    """Train ``model`` in place on uint8 ``images`` (N, C, H, W) and ``labels`` (N,); returns epoch losses.

    ``smoothing`` (N,) in [0, 1]: label smoothing per input (its target keeps 1 − ε of the mass plus ε spread
    evenly over the classes); None: hard labels. ``unlearn``: a term that moves other inputs off a label
    (:class:`Unlearn`), or several, each on a batch of its own every step. ``channels_last`` False: the contiguous
    layout even where the model takes channels-last (the harness' BadNets stay the ones they were). ``anchor``: a
    term on the weights added to every step's loss (:class:`Penalty`: EWC's :class:`Anchor`, FST's head shift).
    One uninterrupted :class:`Run`."""
    run = Run(model, images, labels, cfg, seed, smoothing=smoothing, unlearn=unlearn, channels_last=channels_last,
              anchor=anchor)  # fmt: skip
    run.advance(None, device, desc, quiet)
    return run.losses


def _autocast(device: torch.device, precision: str) -> Any:
    """The autocast context of ``precision`` on ``device`` (fp32: none)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _batch(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B, C, H, W) on the host -> float32 in [0, 1] on ``device``, in the run's memory layout."""
    out = x.to(device, non_blocking=True).float().mul_(1.0 / 255.0)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def takes_channels_last(model: nn.Module, sample: torch.Tensor) -> bool:
    """Whether ``model`` runs on channels-last input and weights (a network from outside may ``view`` a tensor
    that only the contiguous layout allows): one forward pass in eval mode (no running statistics move, no
    dropout draws), the model left contiguous and in the mode it was in."""
    was_training = model.training
    try:
        model.to(memory_format=torch.channels_last).eval()
        with torch.no_grad():
            model(sample.contiguous(memory_format=torch.channels_last))
        return True
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return False
    finally:
        model.to(memory_format=torch.contiguous_format).train(was_training)


def pick_precision(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    device: torch.device | None = None,
    speedup: float = BF16_SPEEDUP,
) -> str:
    """``cfg.precision`` with ``auto`` resolved on this machine: time a few training steps of a copy of ``model``
    in fp32 and in bf16 autocast and take bf16 only where it is at least ``speedup`` times faster (it is on
    CPUs with AVX-512 BF16 for small convnets, and slower for a resnet18 at 32 px: bench/BENCHMARKS "Algorithm 1's
    cost"). The model itself is untouched; weights stay fp32 either way."""
    if cfg.precision != "auto":
        return cfg.precision
    device = device or default_device()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32"
    import copy

    n = min(len(labels), cfg.batch_size)
    x = torch.from_numpy(images[:n])
    y = torch.from_numpy(labels[:n].astype(np.int64)).to(device)
    probe = copy.deepcopy(model).to(device).train()
    channels_last = takes_channels_last(probe, _batch(x[:2], device, False))
    if channels_last:
        probe.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(probe.parameters(), lr=0.0)
    xb = _batch(x, device, channels_last)
    rng_state = torch.get_rng_state()  # dropout draws of the probe do not shift the run's

    def seconds(precision: str, steps: int = 3) -> float:
        for i in range(steps + 1):  # the first step warms the kernels up
            if i == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            with _autocast(device, precision):
                loss = nn.functional.cross_entropy(probe(xb), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    try:
        fp32, bf16 = seconds("fp32"), seconds("bf16")
    except RuntimeError as e:  # an operator without a bf16 kernel here
        log.info("bf16 autocast does not run here (%s): fp32", str(e).splitlines()[0][:200])
        return "fp32"
    finally:
        torch.set_rng_state(rng_state)
    chosen = "bf16" if fp32 >= speedup * bf16 else "fp32"
    log.info("precision: %s (a step takes %.0f ms in fp32, %.0f ms in bf16 autocast)", chosen,
             fp32 / 3 * 1000, bf16 / 3 * 1000)  # fmt: skip
    return chosen


class Run:
    """A training run that can stop after any step and go on later: :meth:`advance` to step k, then to step m,
    computes what one uninterrupted run to step m computes (the batch order, the optimizer's and the schedule's
    state, the dropout draws all carry over). Successive halving grows candidates this way; the run pickles, so a
    Ray task can take one and hand it back.

    Steps run in channels-last layout where the model takes it (:func:`takes_channels_last`; ``channels_last``
    False: never), in ``cfg.precision``
    (``auto``: :func:`pick_precision` on the first advance); between advances the model is contiguous fp32."""

    def __init__(
        self,
        model: nn.Module,
        images: np.ndarray,
        labels: np.ndarray,
        cfg: TrainConfig,
        seed: int,
        smoothing: np.ndarray | None = None,
        unlearn: Unlearn | Sequence[Unlearn] | None = None,
        channels_last: bool = True,
        anchor: Penalty | None = None,
    ) -> None:
        self.anchor = anchor if anchor is not None and anchor.weight > 0 else None
        self.model, self.images, self.labels, self.cfg, self.seed = model, images, labels, cfg, seed
        self.smoothing = None if smoothing is None else np.asarray(smoothing, dtype=np.float32)
        terms = [unlearn] if isinstance(unlearn, Unlearn) else list(unlearn or [])
        self.unlearn = [u for u in terms if len(u.images) and u.weight > 0]
        self.steps_per_epoch = (len(labels) + cfg.batch_size - 1) // cfg.batch_size
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.step = 0
        self.losses: list[float] = []
        self.channels_last: bool | None = None if channels_last else False  # None: decided on the first advance
        self._order: torch.Tensor | None = None  # this epoch's batch order; None: the next step starts an epoch
        self._pos = 0
        self._sum, self._count = 0.0, 0
        self._states: dict[str, Any] = {}  # optimizer, schedule, generator and torch RNG between advances

    @property
    def epochs_done(self) -> float:
        """Epochs trained so far (fractional mid-epoch)."""
        return self.step / max(self.steps_per_epoch, 1)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def _loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: torch.Tensor | None,
        extra: list[tuple[torch.Tensor, torch.Tensor, float]],
        device: torch.device,
    ) -> torch.Tensor:
        """One batch's loss: the cross-entropy (smoothed per input by ``eps``), the unlearning terms on their own
        batches ``extra`` and the anchor."""
        with _autocast(device, self.cfg.precision):
            logits = model(x)
            if eps is None:
                out = nn.functional.cross_entropy(logits, y)
            else:
                out = smoothed_cross_entropy(logits.float(), y, eps)
            for u, u_y, weight in extra:
                out = out + weight * leave_label_loss(model(u).float(), u_y)
        return out if self.anchor is None else out + self.anchor.penalty(model)

    def advance(
        self, until: int | None = None, device: torch.device | None = None, desc: str = "train", quiet: bool = False
    ) -> nn.Module:
        """Train to step ``until`` (None: the end of the run); returns the model, in eval mode."""
        cfg = self.cfg
        until = self.total_steps if until is None else min(until, self.total_steps)
        device = device or default_device()
        model = self.model.to(device).train()
        n = len(self.labels)
        x_all = torch.from_numpy(self.images)
        y_all = torch.from_numpy(self.labels.astype(np.int64))
        if device.type == "cuda":  # once on the device: no host-to-device copy per batch
            x_all, y_all = x_all.to(device), y_all.to(device)
        if cfg.precision == "auto":
            self.cfg = cfg = replace(cfg, precision=pick_precision(model, self.images, self.labels, cfg, device))
        if self.channels_last is None:
            self.channels_last = takes_channels_last(model, _batch(x_all[:2], device, False))
            model.train()
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        opt = make_optimizer(model.parameters(), cfg)
        anneal = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.total_steps, 1))
            if cfg.schedule == "cosine"
            else None
        )
        gen = torch.Generator()
        if self._states:
            opt.load_state_dict(self._states["optimizer"])
            if anneal is not None:
                anneal.load_state_dict(self._states["schedule"])
            gen.set_state(self._states["generator"])
            torch.set_rng_state(self._states["rng"])
            if device.type == "cuda" and "cuda_rng" in self._states:
                torch.cuda.set_rng_state(self._states["cuda_rng"])
        else:
            gen.manual_seed(self.seed)
            torch.manual_seed(self.seed)  # dropout masks
        eps_all = None if self.smoothing is None else torch.from_numpy(self.smoothing)
        unlearning = [
            (torch.from_numpy(u.images), torch.from_numpy(np.asarray(u.labels, dtype=np.int64)), u)
            for u in self.unlearn
        ]
        with tqdm(
            total=self.total_steps, initial=self.step, desc=desc, disable=quiet, leave=False, unit="batch"
        ) as bar:
            while self.step < until:
                if self._order is None:
                    self._order, self._pos, self._sum, self._count = torch.randperm(n, generator=gen), 0, 0.0, 0
                idx = self._order[self._pos : self._pos + cfg.batch_size]
                x = _batch(x_all[idx.to(x_all.device)], device, self.channels_last)
                y = y_all[idx.to(y_all.device)].to(device)
                eps = None if eps_all is None else eps_all[idx].to(device)
                extra = [
                    (_batch(u_all[pick], device, self.channels_last), u_labels[pick].to(device), term.weight)
                    for u_all, u_labels, term in unlearning
                    for pick in [torch.randint(len(u_all), (min(term.batch_size, len(u_all)),), generator=gen)]
                ]
                opt.zero_grad(set_to_none=True)
                loss = self._loss(model, x, y, eps, extra, device)
                loss.backward()
                if cfg.sam_rho > 0:  # the step's gradient is the one at the worst point within ρ
                    moves = sam_ascent(model, cfg.sam_rho, cfg.sam_adaptive)
                    opt.zero_grad(set_to_none=True)
                    self._loss(model, x, y, eps, extra, device).backward()
                    sam_descent(moves)
                opt.step()
                if anneal is not None:
                    anneal.step()
                self._sum += loss.item() * len(idx)
                self._count += len(idx)
                self._pos += len(idx)
                self.step += 1
                bar.update(1)
                if self._pos >= n:  # the epoch is done
                    self.losses.append(self._sum / max(self._count, 1))
                    self._order = None
                    bar.set_postfix(epoch=len(self.losses), loss=f"{self.losses[-1]:.4f}")
                    level = logging.INFO if quiet else logging.DEBUG  # quiet: no bar, so a log line shows progress
                    log.log(level, "%s epoch %d/%d loss %.4f", desc, len(self.losses), cfg.epochs, self.losses[-1])
        self._states = {
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "rng": torch.get_rng_state(),
            **({"schedule": anneal.state_dict()} if anneal is not None else {}),
            **({"cuda_rng": torch.cuda.get_rng_state()} if device.type == "cuda" else {}),
        }
        model.to(memory_format=torch.contiguous_format).eval()
        return model


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
