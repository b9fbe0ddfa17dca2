"""The model's input spec: what a classifier eats, carried by checkpoints, ONNX metadata and bundle manifests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_agent.formats.preprocess import Preprocess
from protos.nnoc.v1 import bundle_pb2


@dataclass(frozen=True)
class InputSpec:
    """What the model eats: its image (uint8 (C, H, W) after colour and resize) through ``preprocess``.

    ``shape`` is the input tensor's per-example shape in ``layout`` order; ``scale``, ``layout`` and the value
    range repeat what ``preprocess`` implies, for readers that check inputs without it.
    """

    shape: tuple[int, int, int]
    dtype: str = "float32"
    layout: str = "NCHW"
    scale: float = 1.0 / 255.0
    min_value: float = 0.0
    max_value: float = 1.0
    input_name: str = "input"
    output_name: str = "logits"
    preprocess: Preprocess = field(default_factory=Preprocess)

    @staticmethod
    def for_image(
        image_shape: tuple[int, int, int],
        preprocess: Preprocess | None = None,
        input_name: str = "input",
        output_name: str = "logits",
    ) -> InputSpec:
        """The spec of a model whose image is ``image_shape`` (C, H, W), fed through ``preprocess``."""
        p = preprocess or Preprocess()
        lo, hi = p.input_range()
        return InputSpec(
            shape=p.model_shape(image_shape),
            layout=p.layout,
            scale=p.scale,
            min_value=lo,
            max_value=hi,
            input_name=input_name,
            output_name=output_name,
            preprocess=p,
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's image (uint8), whatever the input layout."""
        if self.layout == "NHWC":
            return self.shape[2], self.shape[0], self.shape[1]
        return self.shape

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for checkpoints, JSON and ONNX metadata."""
        return {**self.__dict__, "shape": list(self.shape), "preprocess": self.preprocess.to_dict()}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict` (a spec written before the preprocessing block gets today's default)."""
        values = {**d, "shape": tuple(int(v) for v in d["shape"])}
        block = values.pop("preprocess", None)
        scale = float(values.get("scale", 1.0 / 255.0))
        p = Preprocess.from_dict(block, "input spec") if block is not None else Preprocess(scale=scale)
        return InputSpec(**values, preprocess=p)

    def message(self) -> bundle_pb2.InputSpec:
        """The manifest's form of this spec."""
        p = self.preprocess
        return bundle_pb2.InputSpec(
            shape=list(self.shape),
            dtype=self.dtype,
            layout=self.layout,
            scale=self.scale,
            min_value=self.min_value,
            max_value=self.max_value,
            input_name=self.input_name,
            output_name=self.output_name,
            preprocess=bundle_pb2.Preprocess(
                color=p.color or "",
                size=list(p.size or ()),
                resize=p.resize,
                interpolation=p.interpolation,
                scale=p.scale,
                mean=list(p.mean),
                std=list(p.std),
                layout=p.layout,
            ),
        )


def preprocess_of(spec: bundle_pb2.InputSpec) -> Preprocess:
    """The preprocessing block of a manifest's input spec (a bundle without one: divide by ``scale``)."""
    if not spec.HasField("preprocess"):
        return Preprocess(scale=spec.scale or 1.0 / 255.0, layout=spec.layout or "NCHW")
    m = spec.preprocess
    return Preprocess(
        color=m.color or None,
        size=(int(m.size[0]), int(m.size[1])) if len(m.size) == 2 else None,
        resize=m.resize or "stretch",
        interpolation=m.interpolation or "bilinear",
        scale=m.scale,
        mean=tuple(m.mean) or (0.0,),
        std=tuple(m.std) or (1.0,),
        layout=m.layout or "NCHW",
    )


def image_shape_of(spec: bundle_pb2.InputSpec) -> tuple[int, int, int]:
    """(C, H, W) of the model's image for a manifest's input spec."""
    s = tuple(int(d) for d in spec.shape)
    if len(s) != 3:
        raise ValueError(f"the input spec's shape {list(s)} is not (C, H, W) or (H, W, C)")
    return (s[2], s[0], s[1]) if spec.layout == "NHWC" else (s[0], s[1], s[2])


def accepted_range(spec: bundle_pb2.InputSpec) -> tuple[float, float]:
    """The values an input tensor may hold: the spec's range widened by float32 rounding of
    ``(x * scale - mean) / std`` (the edge and the collector check against the same bounds)."""
    slack = 1e-5 * max(1.0, spec.max_value - spec.min_value)
    return spec.min_value - slack, spec.max_value + slack
