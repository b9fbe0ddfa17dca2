"""Edge agent benchmarks (issue 4), side by side in one run, on the checker4 bundle of bench_predeploy.

throughput: the product's Ensemble with its two paths (two sessions; one fused graph, the default) against
eager PyTorch running the same two models; batch 1 and 32, CPU.
spool: the Agent (durable spool + ZeroMQ uplink to the real collector) against the bare ensemble at batch 1 on a
stream with 10% triggered inputs (about 10% rejects); throughput and p50/p99 latency.
swaps: 100 hot swaps (each loads a fresh Ensemble, v1 <-> v2) while 2 client threads call the Open Inference
Protocol endpoint; every reply is checked against the labels its reported version gives offline.

Usage: python -m bench.bench_edge [--bundle DIR] [--bundle-v2 DIR] [--seconds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, drain_agents, save, start_collector


def rate(fn: Callable[[np.ndarray], object], x: np.ndarray, seconds: float) -> float:
    """Inputs per second over ``seconds`` of repeated calls (after a warm-up)."""
    for _ in range(3):
        fn(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def latency_run(fn: Callable[[np.ndarray], object], xs: np.ndarray, seconds: float) -> dict[str, float]:
    """Batch-1 calls over a cycling stream for ``seconds``: rate and latency percentiles."""
    lat = []
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        fn(xs[i % len(xs)][None])
        lat.append(time.perf_counter() - t)
        i += 1
    total = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"rate": i / total, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def bench_throughput(bundle_dir: Path, seconds: float) -> list[dict[str, float]]:
    import torch

    from edge_agent.ensemble import Ensemble
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.runtime import RuntimeConfig
    from trainer.science.models import Checkpoint

    bundle = verify_bundle(bundle_dir)
    two = Ensemble(bundle, RuntimeConfig(ensemble_path="two-sessions"))
    fused = Ensemble(bundle, RuntimeConfig(ensemble_path="fused"))
    pd = bundle_dir.parent
    t_p = Checkpoint.load(pd.parent / "badnet" / "model.pt").build()
    t_m = Checkpoint.load(pd / "monitor.pt").build()
    torch.set_grad_enabled(False)

    def eager(x: np.ndarray) -> object:
        t = torch.from_numpy(x)
        return t_p(t).argmax(1) != t_m(t).argmax(1)

    rows = []
    rng = np.random.default_rng(0)
    for batch in (1, 32):
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        r: dict[str, float] = {"batch": batch}
        for _ in range(2):  # two rounds, best of each: the first round also warms caches
            for name, fn in (("two_sessions", two.classify), ("fused", fused.classify), ("eager_torch", eager)):
                r[name] = max(r.get(name, 0.0), rate(fn, x, seconds / 2))
        rows.append(r)
        print(r, flush=True)
    return rows


def _stream(n: int, spec_scale: float) -> np.ndarray:
    from trainer.science.data import DataConfig, SplitConfig, load_splits
    from trainer.science.triggers import parse_trigger, poison_fraction

    splits = load_splits(DataConfig(), SplitConfig())
    rng = np.random.default_rng(0)
    images, _ = poison_fraction(
        splits.stream.images[:n], splits.stream.labels[:n], parse_trigger("checker4"), 0.1, 0, rng
    )
    return (images.astype(np.float32) * np.float32(spec_scale)).astype(np.float32)


def bench_spool(bundle_dir: Path, seconds: float, tmp: Path) -> dict[str, Any]:
    from edge_agent.agent import Agent
    from edge_agent.ensemble import Ensemble
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.monitor import RejectMonitor
    from edge_agent.spool import Spool, SpoolConfig
    from edge_agent.uplink import Uplink, UplinkConfig
    from trainer.service.collector import quarantine_size

    bundle = verify_bundle(bundle_dir)
    spec = bundle.manifest.input_spec
    xs = _stream(2000, spec.scale)
    ens = Ensemble(bundle)
    reject_share = float(ens.classify(xs).rejected.mean())
    collector, port, stop = start_collector(tmp / "q", bundle.manifest.fleet, spec)
    agents = {}
    for durability in ("power", "process", "deferred"):
        spool = Spool(SpoolConfig(tmp / f"spool-{durability}.sqlite", durability=durability))
        agent = Agent(ens, spool, RejectMonitor(), f"bench-{durability}")
        cfg = UplinkConfig(f"tcp://127.0.0.1:{port}", f"bench-{durability}")
        agent.uplink = Uplink(spool, cfg, stats=agent.stats).start()
        agents[durability] = agent
    out: dict[str, Any] = {"reject_share": reject_share}
    for _ in range(2):  # alternate, best of each
        runs = {"bare": latency_run(ens.classify, xs, seconds / 3)}
        runs |= {f"agent_{d}": latency_run(a.classify, xs, seconds / 3) for d, a in agents.items()}
        for name, r in runs.items():
            if r["rate"] > out.get(name, {}).get("rate", 0):
                out[name] = r
    acked = drain_agents(agents.values(), 30)
    stop.set()
    collector.join(30)
    stored = quarantine_size(tmp / "q", bundle.manifest.fleet, bundle.version)
    out.update(
        acked=acked,
        stored=stored,
        ratio_power=out["agent_power"]["rate"] / out["bare"]["rate"],
        ratio_process=out["agent_process"]["rate"] / out["bare"]["rate"],
        ratio_deferred=out["agent_deferred"]["rate"] / out["bare"]["rate"],
    )
    print("spool:", out, flush=True)
    return out


def bench_swaps(v1: Path, v2: Path, tmp: Path, swaps: int = 100) -> dict[str, Any]:
    import threading

    import grpc

    from edge_agent.agent import Agent
    from edge_agent.ensemble import Ensemble
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.inference import serve
    from edge_agent.monitor import RejectMonitor
    from edge_agent.spool import Spool, SpoolConfig
    from protos.inference import grpc_predict_v2_pb2 as pb
    from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    bundles = {b.version: b for b in (verify_bundle(v1), verify_bundle(v2))}
    if len(bundles) != 2:
        raise SystemExit("the two bundles must have different versions")
    spec = bundles[min(bundles)].manifest.input_spec
    x = _stream(64, spec.scale)
    expected = {v: Ensemble(b).classify(x).labels for v, b in bundles.items()}
    differ = int((expected[min(bundles)] != expected[max(bundles)]).sum())
    spool = Spool(SpoolConfig(tmp / "swap-spool.sqlite", durability="power"))
    agent = Agent(Ensemble(bundles[min(bundles)]), spool, RejectMonitor(), "swap-0")
    server, port = serve(agent, bundles[min(bundles)].manifest.fleet, "127.0.0.1:0")
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0, "misversioned": 0}
    lock = threading.Lock()

    def client() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            req = pb.ModelInferRequest(model_name=bundles[min(bundles)].manifest.fleet)
            req.inputs.add(name=spec.input_name, datatype="FP32", shape=list(x.shape))
            req.raw_input_contents.append(x.tobytes())
            while not stop.is_set():
                try:
                    resp = stub.ModelInfer(req, timeout=10)
                    labels = np.frombuffer(resp.raw_output_contents[0], dtype="<i8")
                    v = int(resp.parameters["bundle_version"].int64_param)
                    key = "ok" if v in expected and np.array_equal(labels, expected[v]) else "misversioned"
                except grpc.RpcError:
                    key = "failed"
                with lock:
                    counts[key] += 1

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    for i in range(swaps):
        agent.swap(Ensemble(bundles[sorted(bundles)[(i + 1) % 2]]))
    dt = time.perf_counter() - t0
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    server.stop(1).wait()
    spool.close()
    out = {"swaps": swaps, "seconds": dt, "labels_differing_between_versions": differ, **counts}
    print("swaps:", out, flush=True)
    return out


def main() -> None:
    import tempfile

    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=ROOT / "runs" / "bench-predeploy" / "checker4" / "block" / "bundle")
    ap.add_argument(
        "--bundle-v2", type=Path, default=ROOT / "runs" / "bench-repair" / "checker4" / "cpd0.1" / "purified" / "bundle"
    )
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    mp.set_start_method("spawn", force=True)
    rows = bench_throughput(args.bundle, args.seconds)
    with tempfile.TemporaryDirectory() as d:
        spool = bench_spool(args.bundle, 2 * args.seconds, Path(d))
        swaps = bench_swaps(args.bundle, args.bundle_v2, Path(d))
    save("edge", {"rows": rows, "threads": torch.get_num_threads(), "spool": spool, "swaps": swaps})


if __name__ == "__main__":
    main()
