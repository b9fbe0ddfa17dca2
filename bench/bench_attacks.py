"""Under attack (issue 10): the same hostile clients against this tree and, side by side, an older revision.

Scenarios, each against real processes on loopback (`nnoc-trainer serve`, `nnoc-edge run`):
  flood     an attacker's DEALER sends a malformed quarantine message every 5 ms (a bundle_version SQLite cannot
            hold, a shape whose size product wraps) while a victim sends 300 valid ones, one every 10 ms:
            how many of the victim's messages are ACKed.
  versions  10,000 valid messages, each naming another bundle_version: files `serve` holds open afterwards,
            quarantine folders made, and whether a new sender's valid message is still stored.
  operator  Publish with an agent's client certificate under mutual TLS: the gRPC status.
  memory    one 20,000-input ModelInfer request to an agent: its status and the agent's resident memory after.

`--before REV` runs every scenario against REV too (a git worktree of it), so both columns come from one run on
one machine. Results: bench/results/attacks.json (rendered into BENCHMARKS.md by bench.report).

Usage: python -m bench.bench_attacks [--before 540fa5f]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.common import ROOT, free_port, machine, save, wait
from protos.nnoc.v1 import quarantine_pb2

Reply = quarantine_pb2.QuarantineReply
TENSOR = np.full((1, 28, 28), 0.5, np.float32).tobytes()


def _header(seq: int, device: str, version: int = 1, shape: tuple[int, ...] = (1, 28, 28)) -> bytes:
    h = quarantine_pb2.QuarantineHeader(
        device_id=device, fleet="default", bundle_version=version, seq=seq, shape=list(shape), dtype="float32",
        primary_label=0, monitor_label=3,
    )  # fmt: skip
    return h.SerializeToString()


def _dealer(ctx: zmq.Context, port: int, identity: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, identity.encode())
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 100_000)
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Tree:
    """A source tree to run (this one, or a worktree of an older revision)."""

    def __init__(self, root: Path, label: str) -> None:
        self.root, self.label = root, label
        self.env = {**os.environ, "PYTHONPATH": str(root)}

    def popen(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as f:
            return subprocess.Popen([sys.executable, "-m", *args], cwd=self.root, env=self.env, stdout=f, stderr=f)

    def serve(self, tmp: Path, name: str, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        state = tmp / f"{self.label}-{name}"
        proc = self.popen(
            "trainer", "serve", "--store", str(tmp / "exports"), "--state-dir", str(state), "--collector",
            f"tcp://127.0.0.1:{free_port()}", "--listen", f"127.0.0.1:{free_port()}", "--no-jobs", *extra,
            log=tmp / f"{self.label}-{name}.log",
        )  # fmt: skip
        if not wait(lambda: (state / "serve.json").is_file(), 90):
            proc.kill()
            raise RuntimeError(f"serve ({self.label}) did not start; see {tmp / f'{self.label}-{name}.log'}")
        return proc, json.loads((state / "serve.json").read_text()) | {"state": state}


@contextlib.contextmanager
def _running(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def flood(tree: Tree, tmp: Path) -> dict[str, Any]:
    proc, info = tree.serve(tmp, "flood", "--insecure")
    port = int(info["collector"].rsplit(":", 1)[1])
    ctx = zmq.Context()
    stop, sent = threading.Event(), [0]

    def attack() -> None:
        s = _dealer(ctx, port, "mallory")
        poison = [
            [_header(1, "mallory", version=2**64 - 1), TENSOR],
            [_header(2, "mallory", shape=(2**62 + 196, 4)), b"\0" * 3136],
        ]
        while not stop.is_set():
            s.send_multipart(poison[sent[0] % 2])
            sent[0] += 1
            time.sleep(0.005)
        s.close()

    with _running(proc):
        attacker = threading.Thread(target=attack)
        attacker.start()
        victim = _dealer(ctx, port, "cam-1")
        acked: set[int] = set()
        t0 = time.monotonic()
        for seq in range(300):
            victim.send_multipart([_header(seq, "cam-1"), TENSOR])
            time.sleep(0.01)
            while victim.poll(0):
                r = Reply.FromString(victim.recv())
                if r.status == Reply.ACK:
                    acked.add(r.seq)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(acked) < 300:
            if victim.poll(100):
                r = Reply.FromString(victim.recv())
                if r.status == Reply.ACK:
                    acked.add(r.seq)
        seconds = time.monotonic() - t0
        stop.set()
        attacker.join()
        victim.close()
        ctx.term()
    log = (tmp / f"{tree.label}-flood.log").read_text(errors="replace")
    return {
        "victim_sent": 300,
        "victim_acked": len(acked),
        "attacker_sent": sent[0],
        "seconds": round(seconds, 1),
        "tracebacks_logged": log.count("Traceback"),
        "log_bytes": len(log),
    }


def versions(tree: Tree, tmp: Path, n: int = 10_000) -> dict[str, Any]:
    proc, info = tree.serve(tmp, "versions", "--insecure")
    port = int(info["collector"].rsplit(":", 1)[1])
    ctx = zmq.Context()
    with _running(proc):
        fds_before = len(os.listdir(f"/proc/{proc.pid}/fd"))
        s = _dealer(ctx, port, "cam-1")
        replies: dict[int, int] = {}
        for seq in range(n):
            s.send_multipart([_header(seq, "cam-1", version=2 + seq), TENSOR])
            if seq % 200 == 199:  # keep a window, as an agent does
                while s.poll(2000 if len(replies) < seq - 400 else 0):
                    r = Reply.FromString(s.recv())
                    replies[r.status] = replies.get(r.status, 0) + 1
        while s.poll(3000) and sum(replies.values()) < n:
            r = Reply.FromString(s.recv())
            replies[r.status] = replies.get(r.status, 0) + 1
        fds_after = len(os.listdir(f"/proc/{proc.pid}/fd")) if proc.poll() is None else -1
        q = info["state"] / "quarantine" / "default"
        folders = sum(1 for _ in q.iterdir()) if q.is_dir() else 0
        newcomer = _dealer(ctx, port, "cam-2")
        newcomer.send_multipart([_header(0, "cam-2", version=1), TENSOR])
        stored = newcomer.poll(10_000) and Reply.FromString(newcomer.recv()).status == Reply.ACK
        s.close()
        newcomer.close()
        ctx.term()
    names = {v: k for k, v in Reply.Status.items()}
    return {
        "messages": n,
        "replies": {names.get(k, str(k)): v for k, v in replies.items()},
        "files_open_before": fds_before,
        "files_open_after": fds_after,
        "quarantine_folders": folders,
        "new_sender_stored": bool(stored),
    }


def operator(tree: Tree, tmp: Path, pki: dict[str, Path]) -> dict[str, Any]:
    import grpc

    from edge_agent.formats.tls import channel, channel_credentials
    from protos.nnoc.v1 import model_service_pb2 as ms
    from protos.nnoc.v1 import model_service_pb2_grpc as ms_grpc

    tls = ["--tls-cert", str(pki["server"]), "--tls-key", str(pki["server"].with_suffix(".key")),
           "--tls-client-ca", str(pki["ca"])]  # fmt: skip
    extra = [*tls, "--operators", "operator"] if tree.label == "after" else tls
    proc, info = tree.serve(tmp, "operator", *extra)
    out: dict[str, Any] = {}
    with _running(proc):
        for who in ("cam-0", "operator"):
            creds = channel_credentials(pki["ca"], pki[who], pki[who].with_suffix(".key"))
            with channel(info["model_service"], creds) as ch:
                try:
                    ms_grpc.ModelServiceStub(ch).Publish(ms.PublishRequest(fleet="default", version=1), timeout=10)
                    out[who] = "OK"
                except grpc.RpcError as e:
                    out[who] = e.code().name
    fleet = json.loads((tmp / "exports" / "default" / "fleet.json").read_text())
    out["history_by"] = [h.get("by") for h in fleet["history"] if h["action"] == "publish"][-2:]
    return out


def memory(tree: Tree, tmp: Path, bundle: Path, n: int = 20_000) -> dict[str, Any]:
    import grpc

    from protos.inference import grpc_predict_v2_pb2 as pb
    from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    state = tmp / f"{tree.label}-agent"
    proc = tree.popen(
        "edge_agent", "run", "--device-id", "cam-1", "--fleet", "default", "--bundle", str(bundle), "--insecure",
        "--infer-port", "0", "--state-dir", str(state), "--threads", "1", log=tmp / f"{tree.label}-agent.log",
    )  # fmt: skip
    with _running(proc):
        if not wait(lambda: (state / "agent.json").is_file(), 90):
            raise RuntimeError(f"agent ({tree.label}) did not start")
        port = json.loads((state / "agent.json").read_text())["infer_port"]
        opts = [("grpc.max_send_message_length", 128 << 20), ("grpc.max_receive_message_length", 128 << 20)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)

            def infer(k: int) -> str:
                req = pb.ModelInferRequest(model_name="default")
                req.inputs.add(name="input", datatype="FP32", shape=[k, 1, 28, 28])
                req.raw_input_contents.append(np.full((k, 1, 28, 28), 0.5, np.float32).tobytes())
                try:
                    stub.ModelInfer(req, timeout=300)
                    return "OK"
                except grpc.RpcError as e:
                    return e.code().name

            first = infer(8)
            rss_before = _rss_mb(proc.pid)
            t0 = time.monotonic()
            status = infer(n)
            seconds = time.monotonic() - t0
            time.sleep(1.0)
            rss_after = _rss_mb(proc.pid)
            still = infer(8)
    return {
        "batch": n,
        "status": status,
        "seconds": round(seconds, 2),
        "rss_mb_before": round(rss_before),
        "rss_mb_after": round(rss_after),
        "small_batch_before_and_after": [first, still],
    }


def _bundle(tmp: Path) -> Path:
    """A real (untrained) cnn3 as both models: enough for the agent's memory and the store."""
    import torch

    from edge_agent.formats.bundle import write_bundle
    from edge_agent.formats.spec import InputSpec
    from protos.nnoc.v1 import bundle_pb2
    from trainer.science.export import export_onnx
    from trainer.science.models import build_model

    torch.manual_seed(0)
    spec = InputSpec(shape=(1, 28, 28))
    export_onnx(build_model("cnn3", spec.shape, 10), spec, tuple("0123456789"), tmp / "m.onnx")
    manifest = bundle_pb2.Manifest(fleet="default", version=1, input_spec=spec.message())
    manifest.class_names.extend("0123456789")
    write_bundle(tmp / "run" / "bundle", {"primary": tmp / "m.onnx", "monitor": tmp / "m.onnx"}, manifest)
    return tmp / "run"


def run(tree: Tree, tmp: Path, bundle: Path, pki: dict[str, Path]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fn in (
        ("flood", lambda: flood(tree, tmp)),
        ("versions", lambda: versions(tree, tmp)),
        ("operator", lambda: operator(tree, tmp, pki)),
        ("memory", lambda: memory(tree, tmp, bundle / "bundle")),
    ):
        print(f"[{tree.label}] {name} ...", flush=True)
        try:
            out[name] = fn()
        except Exception as e:  # a revision that breaks under a scenario is a result too
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(f"[{tree.label}] {name}: {out[name]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="also run against this git revision (side by side)")
    args = parser.parse_args()
    from edge_agent.formats.tls import make_local_ca
    from trainer.service.store import ModelStore

    results: dict[str, Any] = {"machine": machine(), "before_rev": args.before}
    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as d:
        tmp = Path(d)
        bundle = _bundle(tmp)
        pki = make_local_ca(tmp / "pki", ["server", "operator", "cam-0"])
        trees = [Tree(ROOT, "after")]
        if args.before:
            subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "before"), args.before], cwd=ROOT,
                           check=True, capture_output=True)  # fmt: skip
            trees.insert(0, Tree(tmp / "before", "before"))
        try:
            for tree in trees:
                shutil.rmtree(tmp / "exports", ignore_errors=True)
                store = ModelStore(tmp / "exports")
                store.create("default")
                store.publish("default", store.add("default", bundle))
                results[tree.label] = run(tree, tmp, bundle, pki)
        finally:
            if args.before:
                subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "before")], cwd=ROOT)
    save("attacks", results)


if __name__ == "__main__":
    main()
