"""Classifier architectures (registry :data:`ARCHITECTURES`) and the checkpoint format.

Every network takes float32 input of shape (B, C, H, W) in [0, 1] and returns logits (B, num_classes).
Layer sizes are derived from the input shape at construction, so the same name fits 28x28 gray and
32x32 RGB inputs without adaptive pooling (which exports poorly to ONNX for odd sizes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


@dataclass
class Checkpoint:
    """A classifier with everything that made it: enough to reload, verify and explain itself."""

    architecture: str
    input_spec: InputSpec
    class_names: tuple[str, ...]
    state_dict: dict[str, torch.Tensor]
    train: dict[str, Any]  # the TrainConfig that produced the weights (optimizer, lr, ...)
    meta: dict[str, Any]  # anything else: attack config, dataset, split, metrics, parent model

    def build(self) -> nn.Module:
        """The network with these weights, in eval mode, on the CPU."""
        model = build_model(self.architecture, self.input_spec.shape, len(self.class_names))
        model.load_state_dict(self.state_dict)
        return model.eval()

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
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return Checkpoint(architecture, input_spec, class_names, state, train, meta)
