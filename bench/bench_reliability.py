"""Reliability benchmark (issue 6): faults injected with counts, bad inputs per decoder, and the cost of TLS and
CURVE against plaintext in the same run.

faults: (1) kill -9 of the collector (`nnoc-trainer serve`) during a stream of 10,000 quarantine messages,
then a restart; (2) kill -9 of an agent (`nnoc-edge run`) with a full spool while the collector is down, then a
restart. Counted: sent, stored, lost, duplicated.
decoders: the hypothesis tests of tests/test_bad_input.py with NNOC_FUZZ_EXAMPLES examples each (default
10,000); crashes = examples that raised anything but the decoder's clear error.
transport: Open Inference Protocol calls at batch 1 over plaintext, TLS and mutual TLS; quarantine messages
through the collector over plaintext and CURVE (4 DEALER processes as in bench_service).

Usage: python -m bench.bench_reliability [--examples 10000] [--skip-fuzz]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, ROOT, free_port, machine, save, wait

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
BUNDLE = ROOT / "runs" / "bench-predeploy" / "checker4" / "block"


def _serve(store: Path, state: Path, port: int) -> subprocess.Popen[bytes]:
    (state / "serve.json").unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "trainer", "serve", "--store", str(store), "--state-dir", str(state),
        "--collector", f"tcp://127.0.0.1:{port}", "--listen", "127.0.0.1:0", "--no-jobs", "--insecure", "--quiet",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait(lambda: (state / "serve.json").is_file(), 60):
        raise RuntimeError("serve did not start")
    return proc


def _model_bundle(out: Path, fleet: str, version: int, arch: str = "cnn3") -> Path:
    """A bundle of two untrained models of different seeds (they disagree on many inputs: rejects to spool):
    ``cnn3`` on 28x28 gray (the replayed data set's pictures), or torchvision's ``resnet18`` on 32x32 RGB (90 MB:
    a download that lasts long enough to be interrupted)."""
    import torch
    import torchvision

    from edge_agent.formats.bundle import write_bundle
    from edge_agent.formats.preprocess import Preprocess
    from edge_agent.formats.spec import InputSpec
    from protos.nnoc.v1 import bundle_pb2
    from trainer.science.export import export_onnx
    from trainer.science.models import build_model

    out.mkdir(parents=True, exist_ok=True)
    if arch == "cnn3":
        shape, block = (1, 28, 28), Preprocess(color="gray", size=(28, 28))
    else:
        shape, block = (3, 32, 32), Preprocess(color="rgb", size=(32, 32), mean=(0.5,), std=(0.25,))
    spec = InputSpec.for_image(shape, block)
    files = {}
    for role, seed in (("primary", 0), ("monitor", 1)):
        torch.manual_seed(seed)
        net = build_model("cnn3", shape, 10) if arch == "cnn3" else torchvision.models.resnet18(num_classes=10)
        files[role] = out / f"{role}.onnx"
        export_onnx(net.eval(), spec, tuple("0123456789"), files[role])
    classes = list("0123456789")
    manifest = bundle_pb2.Manifest(fleet=fleet, version=version, input_spec=spec.message(), class_names=classes)
    write_bundle(out / "bundle", files, manifest)
    return out


def _store(tmp: Path) -> Path:
    from trainer.service.store import ModelStore

    store = ModelStore(tmp / "exports")
    store.create("default")
    store.publish("default", store.add("default", _bundle_dir(tmp)))
    return tmp / "exports"


def _bundle_dir(tmp: Path) -> Path:
    """The bench-predeploy block when a run left one, else an untrained cnn3 bundle made here."""
    if (BUNDLE / "bundle" / "manifest.pb").is_file():
        return BUNDLE
    made = tmp.parent / "cnn3-bundle"
    return made if (made / "bundle" / "manifest.pb").is_file() else _model_bundle(made, "default", 1)


def fault_collector_kill(tmp: Path, n: int = 10000) -> dict[str, Any]:
    from edge_agent.spool import Spool, SpoolConfig
    from edge_agent.uplink import Uplink, UplinkConfig
    from protos.nnoc.v1 import quarantine_pb2
    from trainer.service.collector import quarantine_size

    store, state, port = _store(tmp / "a"), tmp / "a" / "state", free_port()
    header = quarantine_pb2.QuarantineHeader(fleet="default", bundle_version=1, shape=[1, 28, 28], dtype="float32")
    tensor = np.full((1, 28, 28), 0.25, np.float32).tobytes()
    spool = Spool(SpoolConfig(tmp / "a" / "spool.sqlite", durability="power"))
    spool.put_many([(header.SerializeToString(), tensor)] * n)
    serve = _serve(store, state, port)
    up = Uplink(spool, UplinkConfig(f"tcp://127.0.0.1:{port}", "cam-1", resend_after=1.0)).start()
    q = state / "quarantine"
    wait(lambda: quarantine_size(q, "default", 1) >= n // 4, 120)
    serve.send_signal(signal.SIGKILL)
    serve.wait()
    at_kill = quarantine_size(q, "default", 1)
    serve = _serve(store, state, port)
    drained = wait(lambda: spool.depth() == 0, 300)
    up.stop()
    serve.send_signal(signal.SIGTERM)
    serve.wait(30)
    stored = quarantine_size(q, "default", 1)
    spool.close()
    return {
        "fault": "kill -9 collector mid-stream, restart",
        "sent": n,
        "stored_at_kill": at_kill,
        "stored": stored,
        "lost": n - stored,
        "duplicated": 0 if stored <= n else stored - n,
        "resent": up.counters.resent,
        "drained": drained,
        "failed_replies": 0,
    }


def fault_agent_kill(tmp: Path) -> dict[str, Any]:
    """An agent with a spool of rejects and no collector is killed -9; restarted with a collector, it drains."""
    from trainer.service.collector import quarantine_size

    store, state, port = _store(tmp / "b"), tmp / "b" / "state", free_port()
    agent_state = tmp / "b" / "agent"
    source = "replay:fashion-mnist?split=test&n=600&poison=0.5&trigger=checker4&seed=5"
    cmd = [
        sys.executable, "-m", "edge_agent", "run", "--insecure", "--device-id", "cam-k", "--fleet", "default",
        "--bundle", str(_bundle_dir(tmp / "b") / "bundle"), "--collector", f"tcp://127.0.0.1:{port}",
        "--infer-port", "0", "--state-dir", str(agent_state), "--source", source, "--source-batch", "8", "--quiet",
    ]  # fmt: skip
    agent = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from edge_agent.spool import Spool, SpoolConfig

    def depth() -> int:
        p = agent_state / "spool.sqlite"
        if not p.is_file():
            return 0
        with Spool(SpoolConfig(p, durability="power")) as s:
            return s.depth()

    wait(lambda: depth() > 200, 120)
    time.sleep(2.0)  # the replay is done by now; the spool holds every reject
    spooled = depth()
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    serve = _serve(store, state, port)
    cmd = [c for c in cmd if not c.startswith("replay:")]
    cmd.remove("--source")
    agent = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    drained = wait(lambda: depth() == 0, 120)
    agent.send_signal(signal.SIGTERM)
    agent.wait(30)
    serve.send_signal(signal.SIGTERM)
    serve.wait(30)
    stored = quarantine_size(state / "quarantine", "default", 1)
    return {
        "fault": "kill -9 agent with a full spool (collector down), restart",
        "sent": spooled,
        "stored": stored,
        "lost": spooled - stored,
        "duplicated": max(0, stored - spooled),
        "drained": drained,
        "failed_replies": 0,
    }


def _as_version(src: Path, dest: Path, version: int) -> Path:
    """A copy of bundle folder ``src`` whose manifest says ``version`` (the model files unchanged)."""
    import shutil

    from edge_agent.formats.bundle import manifest_json, verify_bundle

    shutil.copytree(src, dest)
    manifest = verify_bundle(dest / "bundle").manifest
    manifest.version = version
    (dest / "bundle" / "manifest.pb").write_bytes(manifest.SerializeToString(deterministic=True))
    (dest / "bundle" / "manifest.json").write_text(manifest_json(manifest))
    return dest


def fault_rollouts(tmp: Path, agents: int = 4) -> dict[str, Any]:
    """A staged rollout of a 90 MB version (canary, 50%, 100%) to ``agents`` ``nnoc-edge run`` processes, with two
    faults: the canary agent is killed -9 in the middle of its download (and started again a second later), and the
    trainer (``nnoc-trainer serve``) is killed -9 once the 50% stage has started (and started again). Watched every
    0.1 s from the registry and the rollout record: whether any device ever served the new version outside the
    stages reached, and whether the rollout completes by itself."""
    from trainer.service.fleet import status
    from trainer.service.rollout import reached_stage
    from trainer.service.store import ModelStore

    root = tmp / "r"
    v1 = _model_bundle(root / "v1", "cams", 1, "resnet18")
    _as_version(v1, root / "v2", 2)
    size = sum(f.stat().st_size for f in (v1 / "bundle").iterdir() if f.suffix == ".onnx")
    store_dir, state = root / "exports", root / "state"
    store = ModelStore(store_dir)
    store.create("cams")
    store.publish("cams", store.add("cams", v1))
    service, collector = free_port(), free_port()
    frames = root / "frames.npy"
    np.save(frames, np.random.default_rng(0).integers(0, 256, (24, 3, 40, 40), dtype=np.uint8))
    logs = root / "logs"
    logs.mkdir()

    def start_serve() -> subprocess.Popen[bytes]:
        (state / "serve.json").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "trainer", "serve", "--insecure", "--store", str(store_dir), "--state-dir",
               str(state), "--listen", f"127.0.0.1:{service}", "--collector", f"tcp://127.0.0.1:{collector}",
               "--no-jobs", "--rollout-interval", "0.2", "--quiet"]  # fmt: skip
        with (logs / "serve.log").open("ab") as f:
            return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=f)

    def start_agent(name: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "edge_agent", "run", "--insecure", "--device-id", name, "--fleet", "cams",
               "--bundle", str(v1 / "bundle"), "--model-service", f"127.0.0.1:{service}", "--collector",
               f"tcp://127.0.0.1:{collector}", "--infer-port", "0", "--stats-interval", "0.3", "--threads", "1",
               "--source", f"npy:{frames}?loop=1&fps=20", "--state-dir", str(root / name)]  # fmt: skip
        with (logs / f"{name}.log").open("ab") as f:
            return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=f)

    names = [f"cam-{chr(97 + i)}" for i in range(agents)]
    serve = start_serve()
    procs = {n: start_agent(n) for n in names}
    out: dict[str, Any] = {"agents": agents, "bundle_mb": round(size / 1e6, 1)}
    outside: set[str] = set()

    def look() -> dict[str, Any]:
        st = status(store, state, "cams")
        record = st["rollout"] if st["rollout"] and st["rollout"].get("target") == 2 else None
        for d in st["devices"]:
            if d["bundle_version"] == 2 and (record is None or reached_stage(record, d["device_id"]) is None):
                outside.add(d["device_id"])
        return {"versions": {d["device_id"]: d["bundle_version"] for d in st["devices"]}, "rollout": record or {}}

    try:
        if not wait(lambda: (state / "serve.json").is_file(), 60):
            raise RuntimeError("serve did not start")
        if not wait(lambda: look()["versions"] == dict.fromkeys(names, 1), 180):
            raise RuntimeError(f"agents did not all report v1: {look()['versions']}")
        policy = "canary=cam-a,steps=50,100,bake=3s,min-requests=20,apply-timeout=60s,heartbeat=30s"
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "trainer", "fleet", "publish", "cams", "--from", str(root / "v2"),
                        "--rollout", policy, "--store", str(store_dir), "--state-dir", str(state), "--quiet"],
                       cwd=ROOT, env=ENV, check=True, capture_output=True)  # fmt: skip
        staging = root / "cam-a" / "bundles" / "staging" / "2"

        def partial() -> int:
            return sum(f.stat().st_size for f in staging.glob("*.onnx")) if staging.is_dir() else 0

        wait(lambda: 0 < partial() < size, 60, 0.002)
        got = partial()
        procs["cam-a"].send_signal(signal.SIGKILL)
        procs["cam-a"].wait()
        out["agent_killed_at_bytes"] = got
        out["agent_killed_mid_download"] = 0 < got < size
        time.sleep(1.0)
        procs["cam-a"] = start_agent("cam-a")
        if not wait(lambda: look()["rollout"].get("stage", 0) >= 1 or look()["rollout"].get("state") == "aborted", 120):
            raise RuntimeError(f"the rollout did not pass its canary: {look()['rollout']}")
        serve.send_signal(signal.SIGKILL)
        serve.wait()
        out["trainer_killed_in_stage"] = look()["rollout"].get("stage")
        time.sleep(1.0)
        serve = start_serve()
        done = wait(lambda: look()["rollout"].get("state") in ("completed", "aborted"), 180)
        final = look()
        settled = wait(lambda: set(look()["versions"].values()) == {2}, 60)
        final = look()
        resumed = [ln for ln in (logs / "cam-a.log").read_text(errors="replace").splitlines() if "resuming" in ln]
        out.update(
            rollout_state=final["rollout"].get("state") if done else "timed out",
            reason=final["rollout"].get("reason", ""),
            stages_started=len(final["rollout"].get("stage_started", [])),
            seconds=time.monotonic() - t0,
            versions=final["versions"],
            all_on_target=settled,
            served_outside_stage=sorted(outside),
            resumed=resumed[-1].split("INFO ", 1)[-1][:200] if resumed else "",
        )
    finally:
        for proc in (*procs.values(), serve):
            proc.send_signal(signal.SIGTERM)
        for proc in (*procs.values(), serve):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return out


def fuzz(examples: int, tmp: Path) -> dict[str, Any]:
    report = tmp / "fuzz.json"
    env = {**ENV, "NNOC_FUZZ_EXAMPLES": str(examples), "NNOC_FUZZ_REPORT": str(report)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_bad_input.py", "--timeout", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    out = json.loads(report.read_text()) if report.is_file() else {"examples": {}, "crashes": {}}
    out["pytest_exit"] = proc.returncode
    out["pytest_tail"] = proc.stdout[-500:]
    return out


def transport_infer(tmp: Path, seconds: float = 4.0) -> dict[str, float]:

    from edge_agent.agent import Agent
    from edge_agent.ensemble import Ensemble
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.formats.tls import channel, channel_credentials, make_local_ca, server_credentials
    from edge_agent.inference import serve
    from edge_agent.monitor import RejectMonitor
    from edge_agent.spool import Spool, SpoolConfig
    from protos.inference import grpc_predict_v2_pb2 as pb
    from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    tls = make_local_ca(tmp / "tls", ["agent", "client"])
    bundle = verify_bundle(_bundle_dir(tmp / "t") / "bundle")
    agent = Agent(
        Ensemble(bundle), Spool(SpoolConfig(tmp / "t-spool.sqlite", durability="power")), RejectMonitor(), "t"
    )
    x = np.zeros((1, 1, 28, 28), np.float32)
    req = pb.ModelInferRequest(model_name=bundle.manifest.fleet)
    req.inputs.add(name=bundle.manifest.input_spec.input_name, datatype="FP32", shape=[1, 1, 28, 28])
    req.raw_input_contents.append(x.tobytes())
    modes = {
        "plaintext": (None, None),
        "tls": (server_credentials(tls["agent"], tls["agent"].with_suffix(".key")), channel_credentials(tls["ca"])),
        "mtls": (
            server_credentials(tls["agent"], tls["agent"].with_suffix(".key"), tls["ca"]),
            channel_credentials(tls["ca"], tls["client"], tls["client"].with_suffix(".key")),
        ),
    }
    rates: dict[str, float] = {}
    for _ in range(2):
        for name, (server_creds, client_creds) in modes.items():
            server, port = serve(agent, bundle.manifest.fleet, "127.0.0.1:0", credentials=server_creds)
            with channel(f"127.0.0.1:{port}", client_creds) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                for _ in range(20):
                    stub.ModelInfer(req)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds / 2:
                    stub.ModelInfer(req)
                    n += 1
                rates[name] = max(rates.get(name, 0.0), n / (time.perf_counter() - t0))
            server.stop(0).wait()
    return rates


def transport_curve(tmp: Path, n: int = 5000) -> dict[str, float]:
    from bench.bench_service import _dealer
    from edge_agent.formats.curve import generate
    from protos.nnoc.v1 import bundle_pb2
    from trainer.service.collector import Collector, CollectorConfig, fixed_spec

    spec = bundle_pb2.InputSpec(shape=[1, 28, 28], dtype="float32", min_value=0.0, max_value=1.0)
    keys = tmp / "curve"
    server_pub, server_sec = generate(keys, "collector")
    allow = tmp / "allow"
    allow.mkdir()
    clients = []
    for i in range(4):
        pub, sec = generate(keys, f"cam-{i}")
        (allow / pub.name).write_bytes(pub.read_bytes())
        clients.append(sec)
    rates: dict[str, float] = {}
    for mode in ("plaintext", "curve", "plaintext", "curve"):
        root = tmp / f"q-{mode}-{len(rates)}-{time.monotonic_ns()}"
        curve = {"curve_secret": server_sec, "curve_allow": allow} if mode == "curve" else {}
        cfg = CollectorConfig("tcp://127.0.0.1:0", root, rate=1e9, burst=1e9, **curve)  # type: ignore[arg-type]
        collector = Collector(cfg, fixed_spec("bench", spec)).start()
        out: Any = mp.Queue()
        go = mp.Event()
        args = [
            (collector.port, f"cam-{i}", n, 1000, out, str(clients[i]) if curve else None, str(server_pub), go)
            for i in range(4)
        ]
        procs = [mp.Process(target=_dealer, args=a) for a in args]
        for p in procs:
            p.start()
        for _ in procs:
            out.get()  # connected, messages built
        t0 = time.perf_counter()
        go.set()
        for _ in procs:
            out.get()
        rate = 4 * n / (time.perf_counter() - t0)
        for p in procs:
            p.join()
        collector.stop()
        rates[mode] = max(rates.get(mode, 0.0), rate)
    return rates


# -- floods aimed at the service and the edge (issue 36) -----------------------------------------------------


def _proc_usage(pids: list[int]) -> tuple[float, int]:
    """(RSS in MiB, open descriptors) of processes ``pids`` together (0 for one that is gone)."""
    rss, fds = 0.0, 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss += int(status.split("VmRSS:")[1].split()[0]) / 1024
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, IndexError, ValueError):
            pass
    return rss, fds


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(entry))
    return out


class _Watch:
    """Samples serve's and its collector's RSS and descriptors, and calls the model service's health check and an
    honest quarantine sender, every ``every`` seconds on a thread of its own, until stopped."""

    def __init__(self, serve_pid: int, service: str, collector_port: int, every: float = 0.25) -> None:
        import threading

        self.serve_pid, self.service, self.port, self.every = serve_pid, service, collector_port, every
        self.peak = {"serve_rss_mib": 0.0, "serve_fds": 0, "collector_rss_mib": 0.0, "collector_fds": 0}
        self.health = [0, 0]  # answered, asked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.service) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not self._stop.wait(self.every):
                rss, fds = _proc_usage([self.serve_pid])
                crss, cfds = _proc_usage(_children(self.serve_pid))
                for key, value in (("serve_rss_mib", rss), ("serve_fds", fds), ("collector_rss_mib", crss),
                                   ("collector_fds", cfds)):  # fmt: skip
                    self.peak[key] = max(self.peak[key], value)
                self.health[1] += 1
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    self.health[0] += 1
                except grpc.RpcError:
                    pass

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _honest(port: int, seq: int, shape: tuple[int, ...], timeout_ms: int = 5000) -> bool:
    """One valid quarantine message (the model's image, ``shape``) from a fresh DEALER: ACKed in time?"""
    import math

    import zmq

    from protos.nnoc.v1 import quarantine_pb2

    h = quarantine_pb2.QuarantineHeader(device_id="cam-ok", fleet="default", bundle_version=1, seq=seq,
                                        dtype="uint8", primary_label=0, monitor_label=1)  # fmt: skip
    h.shape.extend(shape)
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as d:
        d.setsockopt(zmq.IDENTITY, b"cam-ok")
        d.setsockopt(zmq.LINGER, 0)
        d.connect(f"tcp://127.0.0.1:{port}")
        d.send_multipart([h.SerializeToString(), bytes(math.prod(shape))])
        if not d.poll(timeout_ms):
            return False
        reply = quarantine_pb2.QuarantineReply.FromString(d.recv_multipart()[-1])
        return reply.status == quarantine_pb2.QuarantineReply.ACK


def hostile_serve(tmp: Path, connections: int = 10_000) -> dict[str, Any]:
    """``nnoc-trainer serve`` under the two floods of issue 36: 30 raw ZMTP senders streaming unfinished frames of
    the largest size the collector takes and holding them (2.5 GB offered, above the collector's 2 GiB cap), then
    ``connections`` TCP connections held from one other address (127.0.0.2)."""
    import resource
    import socket

    sys.path.insert(0, str(ROOT / "tests"))
    from test_hostile_vendor import flood_unfinished  # a hostile sender's raw ZMTP, shared with the tests

    from edge_agent.formats.spec import image_shape_of
    from trainer.service.store import ModelStore

    store, state, port = _store(tmp / "h"), tmp / "h" / "state", free_port()
    shape = tuple(image_shape_of(ModelStore(store).manifest("default", 1).input_spec))
    serve = _serve(store, state, port)
    info = json.loads((state / "serve.json").read_text())
    out: dict[str, Any] = {"baseline": dict(zip(("serve_rss_mib", "serve_fds"), _proc_usage([serve.pid]), strict=True))}
    try:
        with _Watch(serve.pid, info["model_service"], port) as watch:
            t0, senders = time.monotonic(), list[Any]()
            dropped = flood_unfinished(port, 30, 40, senders)
            honest_during = _honest(port, 1, shape, 3000)
            for s in senders:
                s.close()
            honest = wait(lambda: _honest(port, 2, shape), 60)
        out["unfinished_frames"] = {**watch.peak, "health_answered": watch.health[0], "health_asked": watch.health[1],
                                    "senders_dropped": dropped, "honest_acked_during": honest_during,
                                    "honest_acked_after": honest,
                                    "seconds": time.monotonic() - t0}  # fmt: skip
        print("unfinished frames:", out["unfinished_frames"], flush=True)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        held: list[socket.socket] = []
        with _Watch(serve.pid, info["model_service"], port) as watch:
            for _ in range(connections):
                try:
                    # from another address of the loopback range: a host that is not the agents'
                    held.append(
                        socket.create_connection(("127.0.0.1", port), timeout=2, source_address=("127.0.0.2", 0))
                    )
                except OSError:
                    break
            time.sleep(2)
            honest_during = _honest(port, 3, shape, 3000)
            time.sleep(6)  # past the collector's 5 s handshake limit: silent connections are closed by now
            honest_later = _honest(port, 5, shape, 3000)
            still = _proc_usage(_children(serve.pid))[1]
        for s in held:
            s.close()
        out["held_connections"] = {**watch.peak, "opened": len(held), "health_answered": watch.health[0],
                                   "health_asked": watch.health[1], "honest_acked_during": honest_during,
                                   "honest_acked_8s": honest_later, "collector_fds_8s": still,
                                   "honest_acked_after": wait(lambda: _honest(port, 4, shape), 60)}  # fmt: skip
        print("held connections:", out["held_connections"], flush=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
    return out


def _bomb_request(files: list[bytes]) -> Any:
    from edge_agent.inference import ENCODED_IMAGE
    from protos.inference import grpc_predict_v2_pb2 as pb

    req = pb.ModelInferRequest(model_name="default")
    req.inputs.add(name=ENCODED_IMAGE, datatype="BYTES", shape=[len(files)]).contents.bytes_contents.extend(files)
    return req


def hostile_edge(tmp: Path) -> dict[str, Any]:
    """``nnoc-edge run`` under 4 concurrent requests of 128 highly compressible 4096x4096 PNGs (6 MB each on the
    wire) while a probe sends one small picture every 0.25 s: probes answered, the agent's RSS."""
    import io
    import threading

    import grpc
    from PIL import Image

    from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    state, infer = tmp / "e" / "agent", free_port()
    cmd = [
        sys.executable, "-m", "edge_agent", "run", "--insecure", "--device-id", "cam-b", "--fleet", "default",
        "--bundle", str(_bundle_dir(tmp / "e") / "bundle"), "--infer-port", str(infer), "--state-dir", str(state),
        "--quiet",
    ]  # fmt: skip
    agent = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    big, small = io.BytesIO(), io.BytesIO()
    Image.new("L", (4096, 4096)).save(big, "PNG")
    Image.new("L", (28, 28), 128).save(small, "PNG")
    codes: list[str] = []
    probes = [0, 0]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{infer}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            if not wait(lambda: (state / "agent.json").is_file(), 60):
                raise RuntimeError("agent did not start")
            base = _proc_usage([agent.pid])[0]
            peak = [base]

            def bomb() -> None:
                try:
                    stub.ModelInfer(_bomb_request([big.getvalue()] * 128), timeout=300)
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)

            bombs = [threading.Thread(target=bomb) for _ in range(4)]
            t0 = time.monotonic()
            for t in bombs:
                t.start()
            while any(t.is_alive() for t in bombs) or time.monotonic() - t0 < 3:
                probes[1] += 1
                try:
                    stub.ModelInfer(_bomb_request([small.getvalue()]), timeout=2)
                    probes[0] += 1
                except grpc.RpcError:
                    pass
                peak.append(_proc_usage([agent.pid])[0])
                time.sleep(0.25)
            seconds = time.monotonic() - t0
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
    return {"bombs": codes, "probes_answered": probes[0], "probes_sent": probes[1], "agent_rss_mib": base,
            "agent_rss_peak_mib": max(peak), "seconds": seconds}  # fmt: skip


def hostile_uplink(tmp: Path, n: int = 1000) -> dict[str, Any]:
    """An uplink whose spool fails (disk full) on its first ACK deletes and reads: sent, stored, lost."""
    from edge_agent.spool import Spool, SpoolConfig
    from edge_agent.uplink import Uplink, UplinkConfig
    from protos.nnoc.v1 import bundle_pb2, quarantine_pb2
    from trainer.service.collector import Collector, CollectorConfig, fixed_spec, quarantine_size

    spec = bundle_pb2.InputSpec(shape=[1, 28, 28], dtype="float32", min_value=0.0, max_value=1.0, scale=1 / 255)
    collector = Collector(CollectorConfig("tcp://127.0.0.1:0", tmp / "u" / "q"), fixed_spec("default", spec)).start()
    spool = Spool(SpoolConfig(tmp / "u" / "spool.sqlite", durability="power"))
    h = quarantine_pb2.QuarantineHeader(device_id="cam-u", fleet="default", bundle_version=1, dtype="uint8",
                                        primary_label=0, monitor_label=1)  # fmt: skip
    h.shape.extend([1, 28, 28])
    for _ in range(n):
        spool.put(h.SerializeToString(), bytes(28 * 28))
    sys.path.insert(0, str(ROOT / "tests"))
    from test_hostile_vendor import disk_full_for  # the same fault as the test's

    disk_full_for(spool, {"ack": 5, "after": 3})
    up = Uplink(spool, UplinkConfig(f"tcp://127.0.0.1:{collector.port}", "cam-u", resend_after=1.0)).start()
    drained = wait(lambda: spool.depth() == 0, 120)
    up.stop()
    collector.stop()
    stored = quarantine_size(tmp / "u" / "q", "default", 1)
    return {"spooled": n, "stored": stored, "lost": n - stored, "drained": drained,
            "spool_errors": up.counters.spool_errors}  # fmt: skip


def _keep(part: str, result: dict[str, Any]) -> None:
    """Write one part into reliability.json with the machine it ran on; the other parts keep theirs."""
    path = RESULTS / "reliability.json"
    previous = json.loads(path.read_text())
    path.write_text(json.dumps({**previous, part: {**result, "machine": machine()}}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=10000)
    ap.add_argument("--skip-fuzz", action="store_true")
    ap.add_argument("--only-rollouts", action="store_true", help="run the rollout faults alone (kept with the rest)")
    ap.add_argument("--only-hostile", action="store_true", help="run the floods of issue 36 alone (kept with the rest)")
    args = ap.parse_args()
    mp.set_start_method("spawn", force=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.only_rollouts:
            hostile = {"serve": hostile_serve(tmp), "edge": hostile_edge(tmp), "uplink": hostile_uplink(tmp)}
            print("hostile:", hostile, flush=True)
            if args.only_hostile:
                return _keep("hostile", hostile)
        rollouts = fault_rollouts(tmp)
        print("rollouts:", rollouts, flush=True)
        if args.only_rollouts:
            return _keep("rollouts", rollouts)
        faults = [fault_collector_kill(tmp), fault_agent_kill(tmp)]
        for f in faults:
            print(f, flush=True)
        infer = transport_infer(tmp)
        print("inference:", infer, flush=True)
        curve = transport_curve(tmp)
        print("collector:", curve, flush=True)
        decoders = None if args.skip_fuzz else fuzz(args.examples, tmp)
        print("fuzz:", decoders, flush=True)
    save(
        "reliability",
        {
            "faults": faults,
            "rollouts": rollouts,
            "inference_rates": infer,
            "collector_rates": curve,
            "fuzz": decoders,
            "hostile": {**hostile, "machine": machine()},
        },
    )


if __name__ == "__main__":
    main()
