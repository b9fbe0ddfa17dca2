"""The NNoculation ensemble (paper §4.3, Algorithm 2 lines 1-12): answer when θ_bd and θ_aug agree,
reject (label -1) when they disagree."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.bundle import VerifiedBundle
from edge_agent.runtime import RuntimeConfig, make_session, warm_up
from protos.nnoc.v1 import bundle_pb2

REJECTED = -1


class InputError(ValueError):
    """An input that does not match the bundle's input spec; it never reaches the models."""


@dataclass(frozen=True)
class Decision:
    """Per-input outcome of one batch: labels (-1 when rejected) and both models' predictions."""

    labels: np.ndarray  # (N,) int64, -1 where rejected
    rejected: np.ndarray  # (N,) bool
    primary: np.ndarray  # (N,) int64, θ_bd's label
    monitor: np.ndarray  # (N,) int64, θ_aug's label


def disagreement(pred_a: np.ndarray, pred_b: np.ndarray) -> np.ndarray:
    """Which inputs the two models label differently."""
    return np.asarray(pred_a != pred_b)


def check_input(x: np.ndarray, spec: bundle_pb2.InputSpec) -> np.ndarray:
    """Validate a batch (N, *shape) against ``spec``; returns it as a contiguous array of the spec's dtype."""
    shape = tuple(int(d) for d in spec.shape)
    if not isinstance(x, np.ndarray):
        raise InputError(f"input must be an array, got {type(x).__name__}")
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise InputError(f"input shape {tuple(x.shape)} does not match (batch, {', '.join(map(str, shape))})")
    if x.shape[0] == 0:
        raise InputError("empty batch: send at least one input")
    if x.dtype != np.dtype(spec.dtype):
        raise InputError(f"input dtype {x.dtype} does not match the model's {spec.dtype}")
    if not np.isfinite(x).all():
        raise InputError("input holds NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < spec.min_value or hi > spec.max_value:
        raise InputError(
            f"input values span [{lo:.4g}, {hi:.4g}], outside the model's range [{spec.min_value}, {spec.max_value}]"
            f" (raw pixels must be multiplied by {spec.scale:.6g})"
        )
    return np.ascontiguousarray(x)


def scale_raw(pixels: np.ndarray, spec: bundle_pb2.InputSpec) -> np.ndarray:
    """Raw uint8 pixels (N, *shape) -> the model's input (times ``spec.scale``, in the spec's dtype)."""
    return (pixels.astype(np.float32) * np.float32(spec.scale)).astype(np.dtype(spec.dtype))


class Ensemble:
    """θ_bd (primary) and θ_aug (monitor) side by side in onnxruntime."""

    def __init__(self, bundle: VerifiedBundle, runtime: RuntimeConfig | None = None) -> None:
        self.bundle = bundle
        self.spec = bundle.manifest.input_spec
        self.primary = make_session(bundle.model_path("primary"), runtime)
        self.monitor = make_session(bundle.model_path("monitor"), runtime)
        self.input_name = self.spec.input_name or self.primary.get_inputs()[0].name
        for role, session in (("primary", self.primary), ("monitor", self.monitor)):
            names = [i.name for i in session.get_inputs()]
            if names != [self.input_name]:
                raise ValueError(f"{role} model takes inputs {names}, the manifest says [{self.input_name!r}]")
        example = np.zeros((1, *[int(d) for d in self.spec.shape]), dtype=np.dtype(self.spec.dtype))
        for session in (self.primary, self.monitor):
            warm_up(session, example)

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the primary model."""
        return str(self.primary.get_providers()[0])

    def classify(self, x: np.ndarray) -> Decision:
        """Classify a checked batch; raises :class:`InputError` for a bad batch (the models never see it)."""
        x = check_input(x, self.spec)
        feed = {self.input_name: x}
        primary = np.asarray(self.primary.run(None, feed)[0]).argmax(1).astype(np.int64)
        monitor = np.asarray(self.monitor.run(None, feed)[0]).argmax(1).astype(np.int64)
        rejected = disagreement(primary, monitor)
        return Decision(np.where(rejected, REJECTED, primary), rejected, primary, monitor)
