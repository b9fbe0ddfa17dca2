"""The NNoculation ensemble (paper §4.3, Algorithm 2 lines 1-12): answer when θ_bd and θ_aug agree,
reject (label -1) when they disagree."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import onnxruntime as ort

from edge_agent.formats.bundle import VerifiedBundle
from edge_agent.formats.preprocess import PreprocessError, Yuv420
from edge_agent.formats.reject import RejectRule
from edge_agent.formats.spec import accepted_range, image_shape_of, preprocess_of
from edge_agent.fuse import MONITOR_OUT, NONFINITE_OUT, PRIMARY_OUT, REJECTED_OUT, SCORE_OUT, FuseError, fuse_models
from edge_agent.runtime import RuntimeConfig, make_session, warm_up
from protos.nnoc.v1 import bundle_pb2

log = logging.getLogger(__name__)

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
    score: np.ndarray  # (N,) float32, the reject rule's score (rejected where above its threshold)
    nonfinite: np.ndarray  # (N,) bool, NaN or an infinity in a model's logits or the score (always rejected)

    def part(self, start: int, stop: int) -> Decision:
        """Rows ``start:stop`` (one request's share of a batch)."""
        return Decision(*(getattr(self, f.name)[start:stop] for f in fields(self)))


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
    lo, hi = float(x.min()), float(x.max())  # NaN anywhere makes both NaN
    if np.isnan(lo) or np.isnan(hi) or np.isinf(lo) or np.isinf(hi):
        raise InputError("input holds NaN or infinite values")
    low, high = accepted_range(spec)
    if lo < low or hi > high:
        raise InputError(
            f"input values span [{lo:.4g}, {hi:.4g}], outside the model's range [{spec.min_value}, {spec.max_value}]"
            " (send the preprocessed tensor: the manifest's preprocessing block says how)"
        )
    return np.ascontiguousarray(x)


def to_model_image(pictures: np.ndarray | Yuv420, spec: bundle_pb2.InputSpec) -> np.ndarray:
    """uint8 pictures (N, C, H, W), C 1 or 3, of any size (or one video frame's YUV planes) -> the model's image
    (N, C', H', W') uint8: the spec's colour conversion and resize (what the quarantine stores)."""
    try:
        return preprocess_of(spec).fitted(image_shape_of(spec)).image(pictures)
    except PreprocessError as e:
        raise InputError(str(e)) from None


def image_to_input(images: np.ndarray, spec: bundle_pb2.InputSpec) -> np.ndarray:
    """The model's uint8 images -> its input tensor (scale, mean/std, layout, the spec's dtype)."""
    try:
        x = preprocess_of(spec).model_input(images)
    except PreprocessError as e:
        raise InputError(str(e)) from None
    return x.astype(np.dtype(spec.dtype), copy=False)


def to_model_input(pictures: np.ndarray, spec: bundle_pb2.InputSpec) -> np.ndarray:
    """uint8 pictures (N, C, H, W), C 1 or 3, of any size -> the model's input, through the spec's preprocessing
    (colour and resize to the model's image, then scale/mean/std and layout)."""
    return image_to_input(to_model_image(pictures, spec), spec)


ENSEMBLE_PATHS = ("fused", "two-sessions", "timed")


def _time_calls(fn: Callable[[np.ndarray], object], x: np.ndarray, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return time.perf_counter() - t0


class Ensemble:
    """θ_bd (primary) and θ_aug (monitor) side by side in onnxruntime.

    Two ways to run them: one fused graph (``edge_agent.fuse``; the default, measured 2-3x faster here, see
    BENCHMARKS.md) or two sessions. ``RuntimeConfig.ensemble_path`` picks: "fused" falls back to two sessions,
    logged, when the models cannot share a graph or the fused graph disagrees with them on a probe batch;
    "timed" also times both at batch 1 and 32 at load and keeps the faster (``self.timings``: seconds).
    ``self.path`` says which path serves.
    """

    def __init__(self, bundle: VerifiedBundle, runtime: RuntimeConfig | None = None) -> None:
        runtime = runtime or RuntimeConfig()
        if runtime.ensemble_path not in ENSEMBLE_PATHS:
            raise ValueError(f"unknown ensemble path {runtime.ensemble_path!r}; choose one of {list(ENSEMBLE_PATHS)}")
        self.bundle = bundle
        self.spec = bundle.manifest.input_spec
        self.rule = RejectRule.of(bundle.manifest)
        self.timings: dict[str, float] = {}
        primary_path, monitor_path = bundle.model_path("primary"), bundle.model_path("monitor")
        self.primary = make_session(primary_path, runtime)
        self.monitor = make_session(monitor_path, runtime)
        self.input_name = self.spec.input_name or self.primary.get_inputs()[0].name
        classes = len(bundle.manifest.class_names)
        for role, session in (("primary", self.primary), ("monitor", self.monitor)):
            names = [i.name for i in session.get_inputs()]
            if names != [self.input_name]:
                raise ValueError(f"{role} model takes inputs {names}, the manifest says [{self.input_name!r}]")
            outs = session.get_outputs()
            width = outs[0].shape[-1] if outs and outs[0].shape else None
            if len(outs) != 1 or len(outs[0].shape) != 2 or (classes and isinstance(width, int) and width != classes):
                got = [(o.name, o.shape) for o in outs]
                raise ValueError(
                    f"{role} model has outputs {got}; expected one (batch, {classes or 'classes'}) score output"
                )
        shape = [int(d) for d in self.spec.shape]
        example = np.zeros((1, *shape), dtype=np.dtype(self.spec.dtype))
        for session in (self.primary, self.monitor):
            warm_up(session, example)
        self.fused: ort.InferenceSession | None = None
        self.path = "two-sessions"
        if runtime.ensemble_path != "two-sessions":
            try:
                graph = fuse_models(primary_path, monitor_path, self.input_name, self.rule)
                self.fused = make_session(primary_path.with_name("ensemble.onnx"), runtime, model=graph)
                warm_up(self.fused, example)
            except (FuseError, ValueError) as e:
                log.warning("serving two sessions: %s", e)
        if self.fused is not None:
            self.path = self._pick(shape, timed=runtime.ensemble_path == "timed")

    def _pick(self, shape: list[int], timed: bool) -> str:
        """Check the fused graph against the two sessions; with ``timed``, keep whichever is faster here."""
        rng = np.random.default_rng(0)
        lo, hi = self.spec.min_value, self.spec.max_value
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            lo, hi = 0.0, 1.0
        probe = rng.uniform(lo, hi, (32, *shape)).astype(np.dtype(self.spec.dtype))
        fused, two = self._run_fused(probe), self._run_two(probe)
        same = all(np.array_equal(a, b) for a, b in zip(fused[:2] + fused[3:], two[:2] + two[3:], strict=True))
        if not same or not np.allclose(fused[2], two[2], rtol=1e-4, atol=1e-5):
            log.warning("fused graph disagrees with the two sessions on a probe batch; serving two sessions")
            return "two-sessions"
        if not timed:
            return "fused"
        paths = (("fused", self._run_fused), ("two-sessions", self._run_two))
        for _, fn in paths:  # the first calls at a new batch size grow onnxruntime's memory arena: not timed
            _time_calls(fn, probe[:1], 3), _time_calls(fn, probe, 3)
        for _ in range(3):  # rounds, best of each: the idle path's spinning threads can steal a round
            for name, fn in paths:
                t = _time_calls(fn, probe[:1], 100) + _time_calls(fn, probe, 10)
                self.timings[name] = min(t, self.timings.get(name, t))
        path = min(self.timings, key=self.timings.__getitem__)
        log.info("ensemble path %s (load-time probe, s: %s)", path, {k: round(v, 4) for k, v in self.timings.items()})
        return path

    def _run_two(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        feed = {self.input_name: x}
        p_logits = np.asarray(self.primary.run(None, feed)[0])
        m_logits = np.asarray(self.monitor.run(None, feed)[0])
        score, rejected, bad = self.rule.decide(p_logits, m_logits)
        primary, monitor = p_logits.argmax(1).astype(np.int64), m_logits.argmax(1).astype(np.int64)
        return primary, monitor, score, rejected, bad

    def _run_fused(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        assert self.fused is not None
        primary, monitor, score, rejected, bad = self.fused.run(
            [PRIMARY_OUT, MONITOR_OUT, SCORE_OUT, REJECTED_OUT, NONFINITE_OUT], {self.input_name: x}
        )
        return (
            np.asarray(primary, dtype=np.int64),
            np.asarray(monitor, dtype=np.int64),
            np.asarray(score, dtype=np.float32),
            np.asarray(rejected, dtype=bool),
            np.asarray(bad, dtype=bool),
        )

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the primary model."""
        return str(self.primary.get_providers()[0])

    def classify(self, x: np.ndarray) -> Decision:
        """Classify a checked batch; raises :class:`InputError` for a bad batch (the models never see it)."""
        x = check_input(x, self.spec)
        primary, monitor, score, rejected, bad = self._run_fused(x) if self.path == "fused" else self._run_two(x)
        return Decision(np.where(rejected, REJECTED, primary), rejected, primary, monitor, score, bad)
