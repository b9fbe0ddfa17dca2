"""Edge ensemble throughput: two onnxruntime sessions vs one fused ONNX graph vs eager PyTorch, side by side.

Runs on the quick BadNet bundle of bench_predeploy (checker4, block). Batch 1 and 32, CPU. The fused graph
holds both models behind one input and returns both label vectors (argmax inside the graph).

Usage: python -m bench.bench_edge [--bundle DIR] [--seconds 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import compose, helper

from bench.common import ROOT, save


def fuse(primary: Path, monitor: Path) -> bytes:
    """One graph: input -> (primary labels, monitor labels)."""
    a = compose.add_prefix(onnx.load(primary), "p_")
    b = compose.add_prefix(onnx.load(monitor), "m_")
    inp = helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 1, 28, 28])
    nodes = [helper.make_node("Identity", ["input"], ["p_input"]), helper.make_node("Identity", ["input"], ["m_input"])]
    nodes += list(a.graph.node) + list(b.graph.node)
    nodes += [
        helper.make_node("ArgMax", ["p_logits"], ["primary"], axis=1, keepdims=0),
        helper.make_node("ArgMax", ["m_logits"], ["monitor"], axis=1, keepdims=0),
    ]
    outs = [helper.make_tensor_value_info(n, onnx.TensorProto.INT64, ["batch"]) for n in ("primary", "monitor")]
    graph = helper.make_graph(
        nodes, "ensemble", [inp], outs, initializer=list(a.graph.initializer) + list(b.graph.initializer)
    )
    model = helper.make_model(graph, opset_imports=a.opset_import, ir_version=a.ir_version)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def rate(fn: Callable[[np.ndarray], object], x: np.ndarray, seconds: float) -> float:
    """Inputs per second over ``seconds`` of repeated calls (after a warm-up)."""
    for _ in range(3):
        fn(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=ROOT / "runs" / "bench-predeploy" / "checker4" / "block" / "bundle")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    import torch

    from trainer.models import Checkpoint

    opts = ort.SessionOptions()
    prov = ["CPUExecutionProvider"]
    s_p = ort.InferenceSession(str(args.bundle / "primary.onnx"), opts, providers=prov)
    s_m = ort.InferenceSession(str(args.bundle / "monitor.onnx"), opts, providers=prov)
    s_f = ort.InferenceSession(fuse(args.bundle / "primary.onnx", args.bundle / "monitor.onnx"), opts, providers=prov)
    pd = args.bundle.parent
    t_p = Checkpoint.load(pd.parent / "badnet" / "model.pt").build()
    t_m = Checkpoint.load(pd / "monitor.pt").build()
    torch.set_grad_enabled(False)

    def two_sessions(x: np.ndarray) -> object:
        a = s_p.run(None, {"input": x})[0].argmax(1)
        b = s_m.run(None, {"input": x})[0].argmax(1)
        return a != b

    def fused(x: np.ndarray) -> object:
        a, b = s_f.run(None, {"input": x})
        return a != b

    def eager(x: np.ndarray) -> object:
        t = torch.from_numpy(x)
        return t_p(t).argmax(1) != t_m(t).argmax(1)

    rows = []
    rng = np.random.default_rng(0)
    for batch in (1, 32):
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        r = {
            "batch": batch,
            "two_sessions": rate(two_sessions, x, args.seconds),
            "fused": rate(fused, x, args.seconds),
            "eager_torch": rate(eager, x, args.seconds),
        }
        rows.append(r)
        print(r, flush=True)
    save("edge", {"rows": rows, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
