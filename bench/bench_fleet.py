"""Fleet at scale (issue 16): thousands of Subscribe streams on one model-service process, side by side in one run.

The model service runs in a process of its own (its resident memory read from /proc before the subscriptions and
with all of them open). Simulated agents are ``grpc.aio`` clients in ``--procs`` processes, each over
``--channels`` channels (HTTP/2 connections) carrying its share of the streams. Measured: seconds until every
subscription received its first notice, then the time from publish (the store's fleet.json changes, as
``nnoc-trainer fleet publish`` does it) to the first and the last notice of the new version, and resident memory
per open subscription.

    python -m bench.bench_fleet [--subscribers 2000] [--procs 4] [--channels 8] [--label after]

``--label before`` with ``--threads N`` measures the thread-per-stream server of earlier commits (it needs a
worker thread per stream: N >= subscribers); the report puts the labels side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, save

FLEET = "bench"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _placeholder_bundle(dest: Path, version: int) -> Path:
    """A bundle with placeholder model files: the service reads the manifest only."""
    from edge_agent.formats.bundle import write_bundle
    from protos.nnoc.v1 import bundle_pb2

    dest.mkdir(parents=True, exist_ok=True)
    models = {}
    for role in ("primary", "monitor"):
        models[role] = dest / f"{role}.bin"
        models[role].write_bytes(os.urandom(1024))
    spec = bundle_pb2.InputSpec(shape=[1, 28, 28], dtype="float32", min_value=0.0, max_value=1.0, scale=1 / 255)
    write_bundle(dest / "bundle", models, bundle_pb2.Manifest(fleet=FLEET, version=version, input_spec=spec))
    return dest


def _serve(root: str, threads: int, ports: Any, stop: Any) -> None:
    import logging

    from trainer.service.model_service import ModelServer, ModelServicer, ServiceConfig
    from trainer.service.registry import Registry
    from trainer.service.store import ModelStore

    logging.basicConfig(level=logging.WARNING)
    extra = {"max_workers": threads} if threads else {}
    cfg = ServiceConfig(listen="127.0.0.1:0", watch_interval=0.05, **extra)  # type: ignore[arg-type]
    store = ModelStore(Path(root) / "exports")
    server = ModelServer(ModelServicer(store, Registry(Path(root) / "registry.sqlite"), Path(root) / "q", cfg), cfg)
    server.start()
    ports.put(server.port)
    stop.wait()
    server.stop(grace=1.0)


def _clients(target: str, first: int, n: int, channels: int, ready: Any, results: Any) -> None:
    asyncio.run(_subscribe_all(target, first, n, channels, ready, results))


async def _subscribe_all(target: str, first: int, n: int, channels: int, ready: Any, results: Any) -> None:
    import grpc

    from protos.nnoc.v1 import model_service_pb2 as ms
    from protos.nnoc.v1 import model_service_pb2_grpc as ms_grpc

    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    stubs = [ms_grpc.ModelServiceStub(c) for c in chans]
    got: list[float] = []
    subscribed = 0

    async def one(i: int) -> None:
        nonlocal subscribed
        request = ms.SubscribeRequest(fleet=FLEET, device_id=f"cam-{first + i}", current_version=1)
        async for notice in stubs[i % channels].Subscribe(request):
            if notice.version == 1:
                subscribed += 1
                if subscribed == n:
                    ready.put(n)
            elif notice.version == 2:
                got.append(time.time())
                return

    await asyncio.gather(*(one(i) for i in range(n)))
    results.put(got)
    for c in chans:
        await c.close()


def measure(subscribers: int, procs: int, channels: int, threads: int) -> dict[str, Any]:
    from trainer.service.store import ModelStore

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        store = ModelStore(root / "exports")
        store.create(FLEET)
        store.publish(FLEET, store.add(FLEET, _placeholder_bundle(root / "v1", 1)))
        store.add(FLEET, _placeholder_bundle(root / "v2", 2))
        ports, stop = ctx.Queue(), ctx.Event()
        service = ctx.Process(target=_serve, args=(str(root), threads, ports, stop))
        service.start()
        port = ports.get(timeout=120)
        time.sleep(1.0)
        rss_idle = _rss_mb(service.pid or 0)
        ready, results = ctx.Queue(), ctx.Queue()
        share = [subscribers // procs + (i < subscribers % procs) for i in range(procs)]
        firsts = [sum(share[:i]) for i in range(procs)]
        t0 = time.time()
        clients = [
            ctx.Process(target=_clients, args=(f"127.0.0.1:{port}", f, n, channels, ready, results))
            for f, n in zip(firsts, share, strict=True)
        ]
        for c in clients:
            c.start()
        for _ in clients:
            ready.get(timeout=600)
        subscribed_s = time.time() - t0
        time.sleep(1.0)
        rss_open = _rss_mb(service.pid or 0)
        published = time.time()
        store.publish(FLEET, 2)
        got = [t for _ in clients for t in results.get(timeout=600)]
        for c in clients:
            c.join(60)
        stop.set()
        service.join(60)
    out = {
        "subscribers": subscribers,
        "client_procs": procs,
        "channels_per_proc": channels,
        "received": len(got),
        "subscribe_all_s": subscribed_s,
        "publish_to_first_s": min(got) - published,
        "publish_to_last_s": max(got) - published,
        "rss_idle_mb": rss_idle,
        "rss_open_mb": rss_open,
        "kb_per_subscription": (rss_open - rss_idle) * 1024 / subscribers,
        "watch_interval_s": 0.05,
    }
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subscribers", type=int, default=2000)
    ap.add_argument("--procs", type=int, default=4, help="client processes")
    ap.add_argument("--channels", type=int, default=8, help="channels per client process")
    ap.add_argument("--threads", type=int, default=0, help="the thread-per-stream server's worker threads (before)")
    ap.add_argument("--label", default="after", help="before | after: where the row goes in the report")
    args = ap.parse_args()
    row = measure(args.subscribers, args.procs, args.channels, args.threads)
    path = RESULTS / "fleet.json"
    data = json.loads(path.read_text()).get("rows", {}) if path.is_file() else {}
    data[args.label] = row
    save("fleet", {"rows": data})


if __name__ == "__main__":
    main()
