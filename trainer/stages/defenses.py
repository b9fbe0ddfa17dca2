"""Post-training backdoor defenses from the field, for side-by-side measurement with the repair (evaluation
harness: ``nnoc-trainer defend``; nothing here is shipped or published). Each starts from the suspect model and
the defender's clean data only (D_treat to fine-tune, D_eval to stop), the same budget the repair has.

- **Fine-pruning** (Liu, Dolan-Gavitt and Garg, RAID 2018): rank the channels of the last convolutional layer by
  their mean activation on clean data and prune the least active first (dormant channels are where backdoors
  hide), as long as clean accuracy holds; then fine-tune on clean data with the pruned channels held at zero.
  The paper stops pruning at a drop of validation accuracy; ours is ``--prune-max-drop`` (4 points) on D_eval.
  Pruned channels are zeroed through ``torch.nn.utils.prune`` (masks kept during fine-tuning, then made
  permanent); a BatchNorm right after the layer is pruned with it, so a pruned channel outputs exactly zero.
- **Neural Cleanse** (Wang et al., IEEE S&P 2019): for every label, reverse-engineer the smallest mask and
  pattern that send clean inputs to it (Adam, lr 0.1, β (0.5, 0.9); L1 cost from 1e-3, raised ×1.5 while the
  attack succeeds ≥ 99% and lowered ×1.5^1.5 when it does not, patience 5 checks, as the authors' code); the
  anomaly index of each label's L1 norm (distance below the median in units of 1.4826 × MAD) flags labels
  above 2; unlearning fine-tunes on clean data where 20% of the images carry a flagged label's reversed trigger
  and keep their true label. No oracle target: when no label is flagged the model is returned unchanged, as the
  paper's defender would ship it (``--nc-flag smallest`` unlearns the smallest norm's label instead). Budget
  here: 300 steps of 64 clean images per label (the authors ran more; a 28x28 checker's mask converged to its
  16 pixels well within it on the project's BadNet).
- **FT-SAM** (Zhu et al., ICCV 2023): fine-tune on clean data with adaptive sharpness-aware minimization at a large
  radius (ρ 2, label smoothing 0.1, the learning rate annealed along a cosine: BackdoorBench's settings), which
  shrinks the large-norm neurons a backdoor lives in where plain fine-tuning barely moves them. Budget: the
  repair's epochs at the BadNet's learning rate and optimizer.
- **FST**, feature shift tuning (Min et al., NeurIPS 2023): re-initialise the linear head and fine-tune the whole
  model on clean data with a penalty α·⟨W, W₀⟩ on the head's inner product with the BadNet's head W₀ (α 0.2, the
  paper's), so the features have to shift away from the ones the old head read, the backdoor's among them. The
  paper also projects W back to ‖W₀‖ after each step; here the penalty alone (its minimum is bounded by the
  cross-entropy). Budget: the repair's epochs at the BadNet's learning rate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_agent.options import flag, fraction, positive, positive_float
from trainer.science.data import Splits
from trainer.science.metrics import evaluate, evaluate_models
from trainer.science.models import Checkpoint
from trainer.science.pruning import (
    channel_activity,
    head_cosine,
    last_conv,
    masked,
    prune_channels,
    reset_head,
    unprune,
)
from trainer.science.training import TrainConfig, default_device, predict, to_input, train
from trainer.science.triggers import Trigger
from trainer.stages.publish import train_config_of, write_report

log = logging.getLogger(__name__)

DEFENSES = ("fine-pruning", "neural-cleanse", "ft-sam", "fst")
Classify = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class DefenseConfig:
    """The baselines' knobs (defaults: the papers' settings where they apply, see the module's text)."""

    method: str = flag("fine-pruning", "the defense to run", choices=DEFENSES)
    epochs: int = flag(5, "clean fine-tuning epochs after pruning / unlearning epochs (the repair's budget)",
                       type=positive)  # fmt: skip
    lr: float | None = flag(None, "fine-tuning lr (default: the BadNet's)", type=positive_float)
    prune_max_drop: float = flag(0.04, "fine-pruning: prune while D_eval CA stays within this of the BadNet's",
                                 type=fraction)  # fmt: skip
    nc_steps: int = flag(300, "neural-cleanse: optimisation steps per label", type=positive)
    nc_batch_size: int = flag(64, "neural-cleanse: clean images per step", type=positive)
    nc_threshold: float = flag(2.0, "neural-cleanse: anomaly index above which a label is flagged", type=positive_float)
    # "anomaly": the paper's outlier test; "smallest": unlearn the label of the smallest norm whatever its index
    # (a variant: it always unlearns something, also from a clean model)
    nc_flag: str = flag("anomaly", "neural-cleanse: which labels are unlearned", choices=("anomaly", "smallest"))
    nc_unlearn_share: float = flag(0.2, "neural-cleanse: share of clean images stamped for unlearning", type=fraction)
    sam_rho: float = flag(2.0, "ft-sam: radius of the adaptive SAM neighbourhood", type=positive_float)
    fst_alpha: float = flag(0.2, "fst: weight of the head's inner product with the BadNet's", type=positive_float)
    seed: int = flag(0, "seed of the optimisation and the fine-tuning", type=int)

    def __post_init__(self) -> None:
        if self.method not in DEFENSES:
            raise ValueError(f"unknown defense {self.method!r}; choose one of: {', '.join(DEFENSES)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for reports."""
        return asdict(self)


# --- fine-pruning ---------------------------------------------------------------------------------------------


def fine_pruning(
    suspect: Checkpoint, splits: Splits, cfg: DefenseConfig, out_dir: Path, quiet: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune the last conv layer's least active channels while D_eval CA holds, then fine-tune on D_treat."""
    device = default_device()
    model = suspect.build().to(device)
    name, _conv, layer = last_conv(model)
    activity = channel_activity(model, layer, splits.treat.images, device)
    order = np.argsort(activity, kind="stable")
    channels = len(order)
    base_ca = evaluate(lambda x: predict(model, x, device=device), splits.eval).clean_accuracy
    floor = base_ca - cfg.prune_max_drop
    step = max(1, channels // 64)
    curve: list[tuple[int, float]] = [(0, base_ca)]
    pruned = 0
    for n in range(step, channels, step):
        keep = torch.ones(channels)
        keep[torch.from_numpy(order[:n].copy())] = 0
        handle = masked(layer, keep)
        try:
            ca = evaluate(lambda x: predict(model, x, device=device), splits.eval).clean_accuracy
        finally:
            handle.remove()
        curve.append((n, ca))
        if ca < floor:
            break
        pruned = n
    log.info("fine-pruning: %s, pruned %d of %d channels (D_eval CA floor %.4f)", name, pruned, channels, floor)
    keep = torch.ones(channels)
    keep[torch.from_numpy(order[:pruned].copy())] = 0
    prune_channels(layer, keep)
    ca_pruned = evaluate(lambda x: predict(model, x, device=device), splits.eval).clean_accuracy
    ft = _fine_tune_config(suspect, cfg)
    train(model, splits.treat.images, splits.treat.labels, ft, cfg.seed, device, "fine-pruning: fine-tune", quiet)
    unprune(layer)
    _plot_pruning(out_dir / "pruning.png", curve, pruned, floor)
    return model, {
        "layer": name,
        "pruned_module": type(layer).__name__,
        "channels": channels,
        "pruned": pruned,
        "eval_ca_floor": floor,
        "eval_ca_pruned": ca_pruned,
        "curve": curve,
        "train": ft.to_dict(),
    }


def _plot_pruning(path: Path, curve: list[tuple[int, float]], pruned: int, floor: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([n for n, _ in curve], [ca for _, ca in curve], marker=".")
    ax.axhline(floor, color="gray", linestyle="--", label="floor")
    ax.axvline(pruned, color="tab:red", linestyle=":", label=f"pruned {pruned}")
    ax.set_xlabel("channels pruned (least active first)")
    ax.set_ylabel("D_eval clean accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- Neural Cleanse -------------------------------------------------------------------------------------------

NC_LR = 0.1
NC_INIT_COST = 1e-3
NC_SUCCESS = 0.99
NC_PATIENCE = 5
NC_CHECK_EVERY = 10  # steps per check of the cost schedule
NC_COST_UP = 1.5
NC_COST_DOWN = 1.5**1.5
MAD_CONSISTENCY = 1.4826


@dataclass
class Reversed:
    """One label's reverse-engineered trigger: mask (H, W) and pattern (C, H, W), both in [0, 1]."""

    label: int
    mask: np.ndarray
    pattern: np.ndarray
    norm: float  # L1 norm of the mask
    success: float  # share of clean inputs it sends to ``label``
    reached: bool  # whether any mask reached the success rate

    def stamp(self, images: np.ndarray) -> np.ndarray:
        """``images`` (N, C, H, W) uint8 with this trigger: (1 - m) x + m p."""
        x = images.astype(np.float32) / 255.0
        out = (1.0 - self.mask) * x + self.mask * self.pattern
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def reverse_trigger(
    model: nn.Module, images: np.ndarray, label: int, cfg: DefenseConfig, device: torch.device
) -> Reversed:
    """Neural Cleanse's optimisation for ``label`` on clean ``images``."""
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + label)
    c, h, w = images.shape[1:]
    mask_raw = (torch.rand(1, 1, h, w, generator=gen) * 2 - 1).to(device).requires_grad_(True)
    pattern_raw = (torch.rand(1, c, h, w, generator=gen) * 2 - 1).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=NC_LR, betas=(0.5, 0.9))
    loss_fn = nn.CrossEntropyLoss()
    target = torch.full((cfg.nc_batch_size,), label, dtype=torch.long, device=device)
    cost, up, down = NC_INIT_COST, 0, 0
    best: tuple[float, np.ndarray, np.ndarray, float] | None = None
    hits = seen = 0
    last_mask = last_pattern = None
    for step in range(1, cfg.nc_steps + 1):
        idx = torch.randint(0, len(images), (cfg.nc_batch_size,), generator=gen).numpy()
        x = to_input(images[idx], device)
        mask = (torch.tanh(mask_raw) + 1) / 2
        pattern = (torch.tanh(pattern_raw) + 1) / 2
        logits = model((1 - mask) * x + mask * pattern)
        l1 = mask.sum()
        loss = loss_fn(logits, target) + cost * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hits += int((logits.argmax(1) == label).sum())
        seen += len(idx)
        if step % NC_CHECK_EVERY:
            continue
        success = hits / seen
        hits = seen = 0
        last_mask, last_pattern = mask.detach()[0, 0].cpu().numpy(), pattern.detach()[0].cpu().numpy()
        if success >= NC_SUCCESS and (best is None or l1.item() < best[0]):
            best = (l1.item(), last_mask, last_pattern, success)
        if success >= NC_SUCCESS:
            up, down = up + 1, 0
        else:
            up, down = 0, down + 1
        if up >= NC_PATIENCE:
            up, cost = 0, cost * NC_COST_UP
        elif down >= NC_PATIENCE:
            down, cost = 0, cost / NC_COST_DOWN
    if best is not None:
        return Reversed(label, best[1], best[2], best[0], best[3], True)
    assert last_mask is not None and last_pattern is not None
    return Reversed(label, last_mask, last_pattern, float(last_mask.sum()), 0.0, False)


def anomaly_index(norms: np.ndarray) -> np.ndarray:
    """How far each norm lies below the median, in units of the consistent MAD (Neural Cleanse §IV)."""
    median = float(np.median(norms))
    mad = MAD_CONSISTENCY * float(np.median(np.abs(norms - median)))
    return (median - norms) / max(mad, 1e-12)


def neural_cleanse(
    suspect: Checkpoint, splits: Splits, cfg: DefenseConfig, out_dir: Path, quiet: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """Reverse-engineer a trigger per label, flag outliers, unlearn the flagged ones on D_treat."""
    device = default_device()
    model = suspect.build().to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    labels = len(suspect.class_names)
    found: list[Reversed] = []
    t0 = time.monotonic()
    for label in range(labels):
        found.append(reverse_trigger(model, splits.treat.images, label, cfg, device))
        r = found[-1]
        log.info("neural-cleanse: label %d norm %.1f success %.3f (%.0f s)", label, r.norm, r.success,
                 time.monotonic() - t0)  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(True)
    norms = np.array([r.norm for r in found])
    index = anomaly_index(norms)
    flagged = [int(i) for i in np.flatnonzero(index > cfg.nc_threshold)]
    if cfg.nc_flag == "smallest":
        flagged = [int(norms.argmin())]
    _plot_reversed(out_dir / "reversed.png", found, index, flagged)
    details: dict[str, Any] = {
        "norms": norms.round(2).tolist(),
        "anomaly_index": index.round(3).tolist(),
        "reached": [r.reached for r in found],
        "flagged": flagged,
        "reverse_seconds": round(time.monotonic() - t0, 1),
    }
    if not flagged:
        log.warning("neural-cleanse: no label's anomaly index is above %.1f: the model is left as it is",
                    cfg.nc_threshold)  # fmt: skip
        return model, details
    treat = splits.treat
    rng = np.random.default_rng(cfg.seed)
    stamped = rng.random(len(treat)) < cfg.nc_unlearn_share
    which = rng.integers(0, len(flagged), len(treat))
    images = treat.images.copy()
    for k, label in enumerate(flagged):
        sel = stamped & (which == k)
        images[sel] = found[label].stamp(treat.images[sel])
    ft = _fine_tune_config(suspect, cfg)
    train(model, images, treat.labels, ft, cfg.seed, device, "neural-cleanse: unlearn", quiet)
    details.update({"unlearn_stamped": int(stamped.sum()), "train": ft.to_dict()})
    return model, details


def _plot_reversed(path: Path, found: list[Reversed], index: np.ndarray, flagged: list[int]) -> None:
    """Each label's reversed trigger (mask × pattern) with its L1 norm and anomaly index; flagged ones in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(found), figsize=(1.4 * len(found), 1.9))
    for ax, r in zip(np.atleast_1d(axes), found, strict=True):
        img = (r.mask[None] * r.pattern).transpose(1, 2, 0)
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{r.label}: {r.norm:.0f}\nAI {index[r.label]:.1f}", fontsize=7,
                     color="tab:red" if r.label in flagged else "black")  # fmt: skip
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- FT-SAM ---------------------------------------------------------------------------------------------------

FT_SAM_SMOOTHING = 0.1


def ft_sam(
    suspect: Checkpoint, splits: Splits, cfg: DefenseConfig, out_dir: Path, quiet: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune on D_treat with adaptive SAM at radius ``cfg.sam_rho`` (see the module's text)."""
    device = default_device()
    model = suspect.build().to(device)
    ft = replace(_fine_tune_config(suspect, cfg), sam_rho=cfg.sam_rho, sam_adaptive=True, schedule="cosine")
    smoothing = np.full(len(splits.treat.labels), FT_SAM_SMOOTHING, np.float32)
    train(model, splits.treat.images, splits.treat.labels, ft, cfg.seed, device, "ft-sam", quiet, smoothing)
    return model, {"label_smoothing": FT_SAM_SMOOTHING, "train": ft.to_dict()}


# --- FST ------------------------------------------------------------------------------------------------------


def fst(
    suspect: Checkpoint, splits: Splits, cfg: DefenseConfig, out_dir: Path, quiet: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """Re-initialise the head, then fine-tune on D_treat under the head-shift penalty (see the module's text)."""
    device = default_device()
    model = suspect.build().to(device)
    shift = reset_head(model, cfg.fst_alpha, cfg.seed)
    ft = _fine_tune_config(suspect, cfg)
    train(model, splits.treat.images, splits.treat.labels, ft, cfg.seed, device, "fst", quiet, anchor=shift)
    return model, {"head": shift.name, "alpha": cfg.fst_alpha, "head_cosine_to_badnet": head_cosine(model, shift),
                   "train": ft.to_dict()}  # fmt: skip


# --- the command ------------------------------------------------------------------------------------------------


def _fine_tune_config(suspect: Checkpoint, cfg: DefenseConfig) -> TrainConfig:
    base = train_config_of(suspect)
    return replace(base, epochs=cfg.epochs, lr=cfg.lr or base.lr)


METHODS: dict[str, Callable[..., tuple[nn.Module, dict[str, Any]]]] = {
    "fine-pruning": fine_pruning,
    "neural-cleanse": neural_cleanse,
    "ft-sam": ft_sam,
    "fst": fst,
}


def run_defense(
    suspect: Checkpoint,
    splits: Splits,
    cfg: DefenseConfig,
    out_dir: Path,
    eval_trigger: Trigger | None = None,
    target: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run ``cfg.method`` on ``suspect`` (``splits`` in its image space); writes ``model.pt``, ``report.json`` and
    the method's picture into ``out_dir``; with ``eval_trigger`` the report has test CA/ASR before and after."""
    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = default_device()
    bd_model = suspect.build()
    defended, details = METHODS[cfg.method](suspect, splits, cfg, out_dir, quiet)

    def bd(x: np.ndarray) -> np.ndarray:
        return predict(bd_model, x, device=device)

    def after(x: np.ndarray) -> np.ndarray:
        return predict(defended, x, device=device)

    report: dict[str, Any] = {
        "method": cfg.method,
        "config": cfg.to_dict(),
        "details": details,
        "eval_clean_accuracy": {
            "badnet": evaluate(bd, splits.eval).clean_accuracy,
            "defended": evaluate(after, splits.eval).clean_accuracy,
        },
    }
    if eval_trigger is not None and target is not None:
        report["test"] = evaluate_models({"badnet": bd, "defended": after}, splits, eval_trigger, target, cfg.seed + 11)
    suspect.derive(defended, details.get("train", {}), {**suspect.meta, "defense": cfg.method}).save(
        out_dir / "model.pt"
    )
    report["model"] = str(out_dir / "model.pt")
    report["seconds"] = round(time.monotonic() - t0, 1)
    write_report(out_dir, report)
    return report
