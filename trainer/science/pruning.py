"""Cuts into a network before it is fine-tuned: channels of its last convolutional layer held at zero while it
trains (``torch.nn.utils.prune`` masks, made permanent afterwards), and a classifier head started anew and held
away from the old one (FST's shift). The harness' ``defend`` (fine-pruning, FST) and the repair's ``--reset`` share
them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from trainer.science.training import to_input


def last_conv(model: nn.Module) -> tuple[str, nn.Conv2d, nn.Module]:
    """The last Conv2d of ``model`` (module order), and the module whose output channels are pruned: the
    BatchNorm2d right after it when there is one (its output is what the next layer sees), else the conv."""
    named = list(model.named_modules())
    for i in range(len(named) - 1, -1, -1):
        name, mod = named[i]
        if isinstance(mod, nn.Conv2d):
            after = named[i + 1][1] if i + 1 < len(named) else None
            if isinstance(after, nn.BatchNorm2d) and after.num_features == mod.out_channels:
                return name, mod, after
            return name, mod, mod
    raise ValueError("fine-pruning needs a convolutional layer; this model has none (try --method neural-cleanse)")


@torch.no_grad()
def channel_activity(model: nn.Module, layer: nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Mean activation (after ReLU) of each output channel of ``layer`` over ``images``."""
    total: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        total.append(torch.relu(out).mean(dim=(0, 2, 3)) * len(out))

    handle = layer.register_forward_hook(hook)
    try:
        model.to(device).eval()
        for start in range(0, len(images), 512):
            model(to_input(images[start : start + 512], device))
    finally:
        handle.remove()
    return (torch.stack(total).sum(0) / len(images)).cpu().numpy()


def masked(layer: nn.Module, keep: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Zero the output channels of ``layer`` where ``keep`` is 0 (a forward hook, for the search)."""
    view = keep.view(1, -1, 1, 1)
    return layer.register_forward_hook(lambda _m, _i, out: out * view.to(out.device))


def prune_channels(layer: nn.Module, keep: torch.Tensor) -> None:
    """Hold the pruned output channels of ``layer`` (conv or batch norm) at zero while it trains."""
    for pname in ("weight", "bias"):
        param = getattr(layer, pname, None)
        if param is None:
            continue
        mask = keep.view(-1, *([1] * (param.dim() - 1))).expand_as(param).to(param.device)
        prune.custom_from_mask(layer, pname, mask)


def unprune(layer: nn.Module) -> None:
    """Make :func:`prune_channels`' masks permanent (the pruned weights stay zero, the masks go)."""
    for pname in ("weight", "bias"):
        if prune.is_pruned(layer) and hasattr(layer, pname + "_mask"):
            prune.remove(layer, pname)


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last Linear of ``model`` (module order): the classifier head."""
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ValueError("FST needs a linear classifier head; this model has none (try --method ft-sam)")
    return heads[-1]


@dataclass(frozen=True)
class HeadShift:
    """FST's term: ``weight`` × ⟨W, W₀⟩ over the head's weights (the parameter named ``name``)."""

    name: str
    original: torch.Tensor
    weight: float

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """The term for ``model``'s current head."""
        w = dict(model.named_parameters())[self.name]
        return self.weight * (w.float() * self.original.to(w.device)).sum()


def trigger_channels(
    model: nn.Module, suspicious: np.ndarray, clean: np.ndarray, device: torch.device
) -> tuple[str, nn.Module, np.ndarray]:
    """The last conv layer's output channels ordered by how much more ``suspicious`` inputs (the quarantine's)
    excite them than ``clean`` ones, most first, with that excess (mean activation after ReLU, suspicious minus
    clean). Returns (layer name, the layer to mask, [(channel, excess) ...] as an (n, 2) array)."""
    name, _conv, layer = last_conv(model)
    excess = channel_activity(model, layer, suspicious, device) - channel_activity(model, layer, clean, device)
    order = np.argsort(-excess, kind="stable")
    return name, layer, np.stack([order, excess[order]], axis=1)


def reset_head(model: nn.Module, weight: float, seed: int) -> HeadShift:
    """Re-initialise ``model``'s classifier head in place (seeded); returns FST's term holding it away from the old
    one (``weight`` × ⟨W, W₀⟩)."""
    name, head = last_linear(model)
    original = head.weight.detach().float().cpu().clone()
    torch.manual_seed(seed)
    head.reset_parameters()
    return HeadShift(name + ".weight", original, weight)


def head_cosine(model: nn.Module, shift: HeadShift) -> float:
    """Cosine between ``model``'s head now and the one :func:`reset_head` replaced."""
    w = dict(model.named_parameters())[shift.name].detach().float().cpu().flatten()
    return float(torch.nn.functional.cosine_similarity(w, shift.original.flatten(), dim=0))


def cut_while(layer: nn.Module, ranked: np.ndarray, holds: Any) -> tuple[torch.Tensor, int]:
    """Cut ``ranked`` channels of ``layer`` in order (those with a positive excess) while ``holds()`` stays true with
    the cut in place (a forward-hook mask); the cut is then held through training (:func:`prune_channels`, undone
    by :func:`unprune`). Returns the keep mask and how many were cut."""
    keep, cut = torch.ones(len(ranked)), 0
    for channel, excess in ranked:
        if excess <= 0:
            break
        keep[int(channel)] = 0
        handle = masked(layer, keep)
        try:
            ok = bool(holds())
        finally:
            handle.remove()
        if not ok:
            keep[int(channel)] = 1
            break
        cut += 1
    if cut:
        prune_channels(layer, keep)
    return keep, cut
