"""Trainer service benchmarks (issue 5), side by side in one run.

collector: quarantine messages from 4 agent processes on loopback, as agents send them (the model's 28x28 uint8
image; --layout tensor: the 28x28 float32 model input older agents sent). Bare pyzmq
PUSH/PULL moving the same frames (no parsing, no storage, no replies) against the real collector (parse, check
against the fleet's input spec, one SQLite WAL transaction per batch with synchronous=FULL, then the ACKs: one
reply per sender and write, as agents ask for them with ``batched_acks``; ``--ack-each`` is the per-message reply
older agents get; senders keep a window of unacknowledged messages). Counted afterwards: stored rows, lost, duplicated.

push: a bundle of about 50 MB published to 10 subscribed agent processes against one agent alone: time from publish
until the last agent has downloaded it in 1 MiB chunks (the service's side), then, apart, until every agent has
verified its sha256 (the clients' hashing, held back until all downloads are in so it does not share the two
cores with the sending).

Usage: python -m bench.bench_service [--messages 20000] [--bundle-mb 50]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.common import save

AGENTS = 4


LAYOUT = {"image": "uint8", "tensor": "float32"}


def _header(device: str, seq: int, dtype: str, batched_acks: bool = True) -> bytes:
    from protos.nnoc.v1 import quarantine_pb2

    return quarantine_pb2.QuarantineHeader(
        device_id=device, fleet="bench", bundle_version=1, seq=seq, shape=[1, 28, 28], dtype=dtype,
        primary_label=0, monitor_label=3, batched_acks=batched_acks,
    ).SerializeToString()  # fmt: skip


def _payload(dtype: str) -> bytes:
    """One quarantined input: an image (uint8) or a model-input tensor (float32 in [0, 1])."""
    rng = np.random.default_rng(0)
    if dtype == "uint8":
        return rng.integers(0, 256, (1, 28, 28), dtype=np.uint8).tobytes()
    return rng.random((1, 28, 28), dtype=np.float32).tobytes()


def _push(port: int, device: str, n: int, dtype: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    tensor = _payload(dtype)
    headers = [_header(device, seq, dtype) for seq in range(n)]
    send, more = s.send, int(zmq.SNDMORE)
    for seq in range(n):
        send(headers[seq], more)  # both senders send frame by frame (send_multipart's enum arithmetic is slower)
        send(tensor)
    s.close(linger=-1)
    ctx.term()


def _dealer(
    port: int,
    device: str,
    n: int,
    window: int,
    out: Any,
    curve_secret: str | None = None,
    server_public: str = "",
    go: Any = None,
    dtype: str = "float32",
    batched_acks: bool = True,
) -> None:
    """One agent's worth of quarantine messages with a window of unacknowledged ones (CURVE when keys given;
    ``batched_acks`` as agents ask for it, or one reply per message as older agents get)."""
    from edge_agent.formats.curve import configure_client
    from protos.nnoc.v1 import quarantine_pb2

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, device.encode())
    if curve_secret is not None:
        configure_client(s, Path(curve_secret), Path(server_public))
    s.connect(f"tcp://127.0.0.1:{port}")
    tensor = _payload(dtype)
    headers = [_header(device, seq, dtype, batched_acks) for seq in range(n)]  # built before the clock starts
    if go is not None:
        out.put(("ready", device))
        go.wait()
    sent = acked = 0
    more = int(zmq.SNDMORE)
    statuses: dict[int, int] = {}
    idle_since = time.monotonic()
    while acked < n and time.monotonic() - idle_since < 15:  # no reply for 15 s: give up, report the count
        while sent < n and sent - acked < window:
            s.send(headers[sent], more)
            s.send(tensor)
            sent += 1
        if s.poll(1000):
            while True:
                try:
                    frame = s.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                r = quarantine_pb2.QuarantineReply.FromString(frame)
                answered = 1 + len(r.acked)  # an ACK names every message of this sender its write stored
                statuses[r.status] = statuses.get(r.status, 0) + answered
                acked += answered
                idle_since = time.monotonic()
    statuses[-1] = n - acked  # never answered
    out.put((device, statuses))
    s.close(linger=0)
    ctx.term()


def bench_pushpull(n: int, dtype: str) -> float:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    procs = [mp.Process(target=_push, args=(port, f"cam-{i}", n, dtype)) for i in range(AGENTS)]
    for p in procs:
        p.start()
    got = 0
    pull.recv_multipart()
    t0 = time.perf_counter()
    got = 1
    while got < AGENTS * n:
        pull.recv_multipart()
        got += 1
    dt = time.perf_counter() - t0
    for p in procs:
        p.join()
    pull.close()
    ctx.term()
    return got / dt


def bench_collector(n: int, tmp: Path, dtype: str, batched_acks: bool = True) -> dict[str, Any]:
    from protos.nnoc.v1 import bundle_pb2
    from trainer.service.collector import Collector, CollectorConfig, fixed_spec, quarantine_size

    spec = bundle_pb2.InputSpec(shape=[1, 28, 28], dtype="float32", min_value=0.0, max_value=1.0, scale=1 / 255)
    cfg = CollectorConfig("tcp://127.0.0.1:0", tmp / "q", rate=1e9, burst=1e9)
    collector = Collector(cfg, fixed_spec("bench", spec)).start()
    out: Any = mp.Queue()
    go = mp.Event()
    procs = [
        mp.Process(target=_dealer, args=(collector.port, f"cam-{i}", n, 1000, out, None, "", go, dtype, batched_acks))
        for i in range(AGENTS)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        out.get()  # connected, messages built
    t0 = time.perf_counter()
    go.set()
    results = [out.get() for _ in procs]
    dt = time.perf_counter() - t0
    for p in procs:
        p.join()
    collector.stop()
    stored = quarantine_size(tmp / "q", "bench", 1)
    shutil.rmtree(tmp / "q")  # the next run starts from an empty store
    acks = sum(r[1].get(1, 0) for r in results)
    return {
        "rate": AGENTS * n / dt,
        "sent": AGENTS * n,
        "acked": acks,
        "stored": stored,
        "lost": AGENTS * n - stored,
        "duplicates_stored": collector.counters.duplicates,
        "seconds": dt,
    }


def _subscriber(target: str, device: str, staging: str, ready: Any, done: Any, verify: Any) -> None:
    """Subscribe; on v2, download it, say so, wait until every agent has (so that no hashing shares the cores with
    the service's sending), then verify its sha256 and say so."""
    import grpc

    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.updates import download_bundle
    from protos.nnoc.v1 import model_service_pb2 as ms
    from protos.nnoc.v1 import model_service_pb2_grpc as ms_grpc

    with grpc.insecure_channel(target) as ch:
        stub = ms_grpc.ModelServiceStub(ch)
        for notice in stub.Subscribe(ms.SubscribeRequest(fleet="bench", device_id=device, current_version=1)):
            if notice.version == 1:
                ready.put(device)
                continue
            dest = Path(staging) / device
            cpu = _cpu()
            download_bundle(stub, notice, dest)
            done.put(("downloaded", time.time(), _cpu() - cpu))
            verify.wait()
            verify_bundle(dest)
            done.put(("verified", time.time(), 0.0))
            return


def _cpu() -> float:
    """CPU seconds (user + system) this process has used."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_push(agents: int, big: Path, tmp: Path) -> dict[str, float]:
    """Seconds from publish until the last agent has downloaded the bundle (the service's side: notices, reads,
    1 MiB chunks, and the clients writing them), and then until the last one has verified it (sha256)."""
    from trainer.service.model_service import ModelServer, ModelServicer, ServiceConfig
    from trainer.service.registry import Registry
    from trainer.service.store import ModelStore

    root = tmp / f"push-{agents}"
    store = ModelStore(root / "exports")
    store.create("bench")
    store.publish("bench", store.add("bench", big / "v1"))
    store.add("bench", big / "v2")
    cfg = ServiceConfig(listen="127.0.0.1:0", watch_interval=0.05)
    server = ModelServer(ModelServicer(store, Registry(root / "registry.sqlite"), root / "q", cfg), cfg).start()
    ready: Any = mp.Queue()
    done: Any = mp.Queue()
    verify: Any = mp.Event()
    target = f"127.0.0.1:{server.port}"
    procs = [
        mp.Process(target=_subscriber, args=(target, f"cam-{i}", str(root / "agents"), ready, done, verify))
        for i in range(agents)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    t0, cpu = time.time(), _cpu()
    store.publish("bench", 2)
    got = [done.get(timeout=600) for _ in procs]
    t1, service_cpu = time.time(), _cpu() - cpu  # this process runs the model service (and little else meanwhile)
    downloaded = [g[1] for g in got]
    verify.set()
    verified = [done.get(timeout=600)[1] for _ in procs]
    for p in procs:
        p.join()
    server.stop()
    shutil.rmtree(root, ignore_errors=True)
    return {
        "delivered_s": max(downloaded) - t0,
        "verified_s": max(verified) - t1,
        "service_cpu_s": service_cpu,
        "clients_cpu_s": sum(g[2] for g in got),
    }


def _big_bundles(tmp: Path, mb: int) -> Path:
    """Two versions of a bundle whose two model files hold ``mb`` MB of random bytes together (never loaded: the
    bench moves and verifies bytes)."""
    from edge_agent.formats.bundle import write_bundle
    from protos.nnoc.v1 import bundle_pb2

    spec = bundle_pb2.InputSpec(shape=[1, 28, 28], dtype="float32", min_value=0.0, max_value=1.0, scale=1 / 255)
    rng = np.random.default_rng(0)
    out = tmp / "big"
    for v in (1, 2):
        files = {}
        for role in ("primary", "monitor"):
            f = tmp / f"{role}-{v}.bin"
            f.write_bytes(rng.bytes(mb * (1 << 20) // 2))
            files[role] = f
        manifest = bundle_pb2.Manifest(fleet="bench", version=v, input_spec=spec)
        write_bundle(out / f"v{v}" / "bundle", files, manifest)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000, help="per agent")
    ap.add_argument("--bundle-mb", type=int, default=50)
    ap.add_argument("--layout", choices=tuple(LAYOUT), default="image", help="what the quarantine messages carry")
    args = ap.parse_args()
    mp.set_start_method("spawn", force=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        dtype = LAYOUT[args.layout]
        pushpull = bench_pushpull(args.messages, dtype)
        print(f"PUSH/PULL: {pushpull:.0f} msg/s", flush=True)
        collector = bench_collector(args.messages, tmp, dtype)
        print(f"collector: {collector}", flush=True)
        each = bench_collector(args.messages, tmp, dtype, batched_acks=False)
        print(f"collector, a reply per message: {each}", flush=True)
        big = _big_bundles(tmp, args.bundle_mb)
        one = bench_push(1, big, tmp)
        print(f"push to 1 agent: {one}", flush=True)
        ten = bench_push(10, big, tmp)
        print(f"push to 10 agents: {ten}", flush=True)
    save(
        "service",
        {
            "agents": AGENTS,
            "messages_per_agent": args.messages,
            "layout": args.layout,
            "pushpull_rate": pushpull,
            "collector": collector,
            "collector_ratio": collector["rate"] / pushpull,
            "collector_ack_each": each,
            "collector_ack_each_ratio": each["rate"] / pushpull,
            "bundle_mb": args.bundle_mb,
            "push_one_s": one["delivered_s"],
            "push_ten_s": ten["delivered_s"],
            "push_ratio": ten["delivered_s"] / one["delivered_s"],
            "push_aggregate_mb_s": 10 * args.bundle_mb / ten["delivered_s"],
            "push_one_mb_s": args.bundle_mb / one["delivered_s"],
            "verify_one_s": one["verified_s"],
            "verify_ten_s": ten["verified_s"],
            "push_one": one,
            "push_ten": ten,
        },
    )


if __name__ == "__main__":
    main()
