"""onnxruntime sessions: provider choice (TensorRT -> CUDA -> CPU), threads, graph optimisation, warm-up."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_agent.options import flag, nonnegative

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GRAPH_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class RuntimeConfig:
    """How sessions are made. ``providers`` None: the best the installed onnxruntime offers."""

    providers: tuple[str, ...] | None = flag(
        None, "onnxruntime providers, in order (default: the best installed)", nargs="+"
    )
    # 0: onnxruntime's default (one per core)
    intra_op_threads: int = flag(0, "intra-op threads (0: one per core)", name="--threads", type=nonnegative)
    inter_op_threads: int = 0
    graph_optimization: str = flag("all", "onnxruntime graph optimizations", choices=tuple(GRAPH_OPT_LEVELS))
    # onnxruntime's worker threads spin after each run (lower latency when nothing else needs the cores); with
    # camera sources decoding on the same cores, spinning takes their time. auto: off with --source, else on.
    spin: str = flag("auto", "intra-op threads spin-wait between runs", choices=("auto", "on", "off"))
    # onnxruntime's CUDA provider computes convolutions and matrix products in TF32 unless told not to: on an H100
    # the cnn3 ensemble's reject scores then differ from the CPU's by up to 0.01 and a label in 10,000 flips
    # (measured, BENCHMARKS.md). The threshold τ was chosen on fp32 scores, so the edge keeps fp32 by default.
    tf32: str = flag(
        "off", "let the CUDA provider compute in TF32 (faster, scores drift from fp32)", choices=("off", "on")
    )
    # How the ensemble runs its two models: "fused" (one graph, see edge_agent/fuse.py), "two-sessions", or
    # "timed" (time both at load and keep the faster one).
    ensemble_path: str = flag(
        "fused",
        "run both models in one fused graph (default), in two sessions, or time both at load",
        choices=("fused", "two-sessions", "timed"),
    )


_PROVIDER_LIBS = {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda"}


@functools.cache
def provider_loads(provider: str) -> bool:
    """Whether a GPU provider's shared library and its CUDA/TensorRT dependencies can be loaded here.

    onnxruntime-gpu lists its GPU providers as available even on a machine without CUDA; asking for one
    there prints errors and falls back. Loading the provider library first tells the two cases apart.
    """
    lib = _PROVIDER_LIBS.get(provider)
    if lib is None:
        return True
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from pip packages, where installed
        try:
            ort.preload_dlls(directory="")
        except Exception:  # preload is best effort; the probe below decides
            log.debug("onnxruntime.preload_dlls failed", exc_info=True)
    path = os.path.join(os.path.dirname(ort.__file__), "capi", f"libonnxruntime_providers_{lib}.so")
    try:
        ctypes.CDLL(path, mode=os.RTLD_LAZY)
    except OSError as e:
        log.info("%s is not usable here (%s); skipping it", provider, e)
        return False
    return True


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Providers to ask for, in order; the CPU is always last. Unknown names are an error.

    Without ``requested``: TensorRT, then CUDA, then the CPU, keeping those that can load on this machine.
    """
    available = ort.get_available_providers()
    if requested:
        unknown = [p for p in requested if p not in available]
        if unknown:
            raise ValueError(f"execution providers {unknown} are not available; this onnxruntime offers {available}")
        chosen = list(requested)
    else:
        chosen = [p for p in PREFERRED_PROVIDERS if p in available and provider_loads(p)]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def with_provider_options(providers: Sequence[str], tf32: bool = False) -> list[str | tuple[str, dict[str, str]]]:
    """``providers`` as onnxruntime takes them, with the options this project sets: the CUDA provider computes
    in full fp32 (``use_tf32`` 0) unless ``tf32``, so a GPU answers what the trainer measured on fp32."""
    return [(p, {"use_tf32": "1" if tf32 else "0"}) if p == "CUDAExecutionProvider" else p for p in providers]


def make_session(path: Path, cfg: RuntimeConfig | None = None, model: bytes | None = None) -> ort.InferenceSession:
    """Load an ONNX model (from ``path``, or from ``model`` bytes named ``path``); logs which provider runs.

    A GPU provider may fail to load and fall back; the log says what actually runs.
    """
    cfg = cfg or RuntimeConfig()
    if cfg.graph_optimization not in GRAPH_OPT_LEVELS:
        raise ValueError(
            f"unknown graph optimisation {cfg.graph_optimization!r}; choose one of {list(GRAPH_OPT_LEVELS)}"
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg.intra_op_threads
    opts.inter_op_num_threads = cfg.inter_op_threads
    if cfg.spin == "off":
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.graph_optimization_level = GRAPH_OPT_LEVELS[cfg.graph_optimization]
    opts.log_severity_level = 3  # GPU providers that cannot load are reported by us, once, below
    try:
        source = model if model is not None else str(path)
        providers = with_provider_options(choose_providers(cfg.providers), tf32=cfg.tf32 == "on")
        session = ort.InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime's own exception types for corrupt or unsupported files
        raise ValueError(f"cannot load ONNX model {path}: {e}") from e
    log.info("%s runs on %s", path.name, session.get_providers()[0])
    return session


def warm_up(session: ort.InferenceSession, example: np.ndarray, runs: int = 2) -> None:
    """Run ``example`` through the session so the first real request does not pay for lazy initialisation."""
    name = session.get_inputs()[0].name
    for _ in range(runs):
        session.run(None, {name: example})
