"""The model's input spec: what a classifier eats, carried by checkpoints, ONNX metadata and bundle manifests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protos.nnoc.v1 import bundle_pb2


@dataclass(frozen=True)
class InputSpec:
    """What the model eats: raw uint8 (C, H, W) pixels times ``scale`` as float32, NCHW."""

    shape: tuple[int, int, int]
    dtype: str = "float32"
    layout: str = "NCHW"
    scale: float = 1.0 / 255.0
    min_value: float = 0.0
    max_value: float = 1.0
    input_name: str = "input"
    output_name: str = "logits"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for checkpoints, JSON and ONNX metadata."""
        return {**self.__dict__, "shape": list(self.shape)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict`."""
        return InputSpec(**{**d, "shape": tuple(int(v) for v in d["shape"])})

    def message(self) -> bundle_pb2.InputSpec:
        """The manifest's form of this spec."""
        return bundle_pb2.InputSpec(
            shape=list(self.shape),
            dtype=self.dtype,
            layout=self.layout,
            scale=self.scale,
            min_value=self.min_value,
            max_value=self.max_value,
            input_name=self.input_name,
            output_name=self.output_name,
        )
