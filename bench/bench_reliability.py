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

from bench.common import ROOT, free_port, save, wait

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


def _store(tmp: Path) -> Path:
    from trainer.service.store import ModelStore

    store = ModelStore(tmp / "exports")
    store.create("default")
    store.publish("default", store.add("default", BUNDLE))
    return tmp / "exports"


def fault_collector_kill(tmp: Path, n: int = 10000) -> dict[str, Any]:
    from edge_agent.spool import Spool, SpoolConfig
    from edge_agent.uplink import Uplink, UplinkConfig
    from protos.nnoc.v1 import quarantine_pb2
    from trainer.service.collector import quarantine_size

    store, state, port = _store(tmp / "a"), tmp / "a" / "state", free_port()
    header = quarantine_pb2.QuarantineHeader(fleet="default", bundle_version=1, shape=[1, 28, 28], dtype="float32")
    tensor = np.full((1, 28, 28), 0.25, np.float32).tobytes()
    spool = Spool(SpoolConfig(tmp / "a" / "spool.sqlite"))
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
        "--bundle", str(BUNDLE / "bundle"), "--collector", f"tcp://127.0.0.1:{port}", "--infer-port", "0",
        "--state-dir", str(agent_state), "--source", source, "--source-batch", "8", "--quiet",
    ]  # fmt: skip
    agent = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from edge_agent.spool import Spool, SpoolConfig

    def depth() -> int:
        p = agent_state / "spool.sqlite"
        if not p.is_file():
            return 0
        with Spool(SpoolConfig(p)) as s:
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
    bundle = verify_bundle(BUNDLE / "bundle")
    agent = Agent(Ensemble(bundle), Spool(SpoolConfig(tmp / "t-spool.sqlite")), RejectMonitor(), "t")
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=10000)
    ap.add_argument("--skip-fuzz", action="store_true")
    args = ap.parse_args()
    mp.set_start_method("spawn", force=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        faults = [fault_collector_kill(tmp), fault_agent_kill(tmp)]
        for f in faults:
            print(f, flush=True)
        infer = transport_infer(tmp)
        print("inference:", infer, flush=True)
        curve = transport_curve(tmp)
        print("collector:", curve, flush=True)
        decoders = None if args.skip_fuzz else fuzz(args.examples, tmp)
        print("fuzz:", decoders, flush=True)
    save("reliability", {"faults": faults, "inference_rates": infer, "collector_rates": curve, "fuzz": decoders})


if __name__ == "__main__":
    main()
