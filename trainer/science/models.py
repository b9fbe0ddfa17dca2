"""Classifier architectures (registry :data:`ARCHITECTURES`), the checkpoint format, and the module that puts a
network behind its preprocessing.

Our networks take float32 input of shape (B, C, H, W) in [0, 1] and return logits (B, num_classes). Layer sizes
are derived from the input shape at construction, so the same name fits 28x28 gray and 32x32 RGB inputs without
adaptive pooling (which exports poorly to ONNX for odd sizes). Networks from outside (ONNX, .pt2, torchvision or
timm by name: :mod:`trainer.science.importers`) take whatever their preprocessing block makes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_agent.formats.preprocess import Preprocess
from edge_agent.formats.spec import InputSpec

CHECKPOINT_FORMAT = "nnoc-model/1"


def _flat_features(features: nn.Module, input_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).numel())


class SmallCNN(nn.Module):
    """Three conv blocks and two dense layers: the paper-scale net for 28x28 inputs."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 32) -> None:
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_flat_features(self.features, input_shape), 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 in [0, 1] -> (B, num_classes) logits."""
        return self.classifier(self.features(x))


class DeepCNN(nn.Module):
    """Six conv layers (three double blocks with batch norm) and two dense layers, as the paper's GTSRB net."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = input_shape[0]
        for w in (width, 2 * width, 4 * width):
            layers += [
                nn.Conv2d(c, w, 3, padding=1),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_flat_features(self.features, input_shape), 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 in [0, 1] -> (B, num_classes) logits."""
        return self.classifier(self.features(x))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "cnn3": SmallCNN,
    "cnn6": DeepCNN,
}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Instantiate architecture ``name`` for ``input_shape`` (C, H, W) and ``num_classes``."""
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}") from None
    return factory(input_shape, num_classes)


def eval_mode(net: nn.Module) -> nn.Module:
    """``net`` in eval mode; a torch.export module, which has no train/eval switch, is returned as it is."""
    try:
        return net.eval()
    except (NotImplementedError, RuntimeError):  # torch.export's GraphModule: "Calling train() is not supported"
        return net


class Preprocessed(nn.Module):
    """A network behind its preprocessing block.

    Takes the model's image as float32 in [0, 1] (``image / 255``: what training and prediction feed) and gives
    ``net`` what :meth:`Preprocess.model_input` gives the exported model (scale, mean, std, layout), so the
    trainer trains and measures exactly what the edge runs. ``freeze_norm``: BatchNorm and Dropout stay in eval
    mode while training (models exported in eval mode have their statistics folded or frozen).
    """

    def __init__(self, net: nn.Module, preprocess: Preprocess, freeze_norm: bool = False) -> None:
        super().__init__()
        self.net = eval_mode(net) if freeze_norm else net
        self.freeze_norm = freeze_norm
        k = preprocess.scale * 255.0
        mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, -1, 1, 1)
        # (x * k - mean) / std as one multiply-add
        self.register_buffer("mul", k / std, persistent=False)
        self.register_buffer("add", -mean / std, persistent=False)
        self.identity = math.isclose(k, 1.0, rel_tol=1e-9) and not mean.any() and bool((std == 1).all())
        self.nhwc = preprocess.layout == "NHWC"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 in [0, 1] -> (B, num_classes) logits."""
        if not self.identity:
            x = x * self.get_buffer("mul") + self.get_buffer("add")
        if self.nhwc:
            x = x.permute(0, 2, 3, 1)
        return self.net(x)

    def train(self, mode: bool = True) -> Preprocessed:
        """Set training mode; with ``freeze_norm`` the network itself stays in eval mode."""
        self.training = mode
        if not self.freeze_norm:
            self.net.train(mode)
        return self


@dataclass
class Checkpoint:
    """A classifier with everything that made it: enough to reload, verify and explain itself."""

    # "cnn3"/"cnn6" (ours), "torchvision:NAME", "timm:NAME", or "onnx"/"pt2" (the graph file is ``source``)
    architecture: str
    input_spec: InputSpec
    class_names: tuple[str, ...]
    state_dict: dict[str, torch.Tensor]
    train: dict[str, Any]  # the TrainConfig that produced the weights (optimizer, lr, ...); {} when unknown
    meta: dict[str, Any]  # anything else: attack config, dataset, split, metrics, parent model
    source: bytes = b""  # onnx/pt2: the user's file, which the weights belong to
    freeze_norm: bool = False  # fine-tune with BatchNorm/Dropout in eval mode (see Preprocessed)

    def network(self) -> nn.Module:
        """The bare network with these weights (what is exported), on the CPU, in eval mode."""
        if self.architecture in ARCHITECTURES:
            net = build_model(self.architecture, self.input_spec.image_shape, len(self.class_names))
        else:
            from trainer.science import importers

            if self.architecture == "onnx":
                net = importers.onnx_module(self.source)
            elif self.architecture == "pt2":
                net = importers.pt2_module(self.source)
            else:
                net = importers.arch_module(self.architecture, len(self.class_names))
        net.load_state_dict(self.state_dict)
        return eval_mode(net)

    def build(self) -> Preprocessed:
        """The network behind its preprocessing (takes image / 255), in eval mode, on the CPU."""
        return Preprocessed(self.network(), self.input_spec.preprocess, self.freeze_norm).eval()

    def derive(self, model: nn.Module, train: dict[str, Any], meta: dict[str, Any]) -> Checkpoint:
        """A checkpoint of ``model`` (built from this one and trained further) with the same recipe."""
        net = model.net if isinstance(model, Preprocessed) else model
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        return Checkpoint(
            self.architecture, self.input_spec, self.class_names, state, train, meta, self.source, self.freeze_norm
        )

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename)."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "architecture": self.architecture,
            "input_spec": self.input_spec.to_dict(),
            "class_names": list(self.class_names),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "train": self.train,
            "meta": self.meta,
            # a uint8 tensor: torch's safe loader (weights_only) takes tensors, not raw bytes
            "source": torch.frombuffer(bytearray(self.source), dtype=torch.uint8) if self.source else None,
            "freeze_norm": self.freeze_norm,
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)

    @staticmethod
    def load(path: Path) -> Checkpoint:
        """Read a checkpoint written by :meth:`save`; a foreign file is a clear error."""
        if not path.is_file():
            raise ValueError(f"model file {path} does not exist")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a foreign or corrupt file
            raise ValueError(f"{path} is not a readable nnoc checkpoint: {e}") from e
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{path} is not an nnoc checkpoint (format {CHECKPOINT_FORMAT}); "
                "make one with 'nnoc-trainer attack', or pass an .onnx classifier where the command accepts it"
            )
        return Checkpoint(
            architecture=payload["architecture"],
            input_spec=InputSpec.from_dict(payload["input_spec"]),
            class_names=tuple(payload["class_names"]),
            state_dict=payload["state_dict"],
            train=payload["train"],
            meta=payload["meta"],
            source=payload["source"].numpy().tobytes() if payload.get("source") is not None else b"",
            freeze_norm=bool(payload.get("freeze_norm", False)),
        )

    @staticmethod
    def from_model(
        model: nn.Module,
        architecture: str,
        input_spec: InputSpec,
        class_names: tuple[str, ...],
        train: dict[str, Any],
        meta: dict[str, Any],
    ) -> Checkpoint:
        """Snapshot ``model``'s weights (copied to the CPU)."""
        net = model.net if isinstance(model, Preprocessed) else model
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        return Checkpoint(architecture, input_spec, class_names, state, train, meta)
