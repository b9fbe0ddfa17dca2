"""Shared fixtures: small real Fashion-MNIST slices and one small BadNet per test session."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from protos.nnoc.v1 import quarantine_pb2

ROOT = Path(__file__).resolve().parent.parent
# Small slices of the real data keep the suite fast on 2 cores.
SMALL_SPLIT = ["--dataset", "fashion-mnist", "--valid-size", "1000", "--stream-size", "500"]
SMALL_SPLIT += ["--train-size", "8000", "--test-size", "2000"]


# Fixtures that train through the CLI (about a minute for the first test that asks for one). Every test that uses
# one carries the ``slow`` marker, so ``make test-fast`` runs the tests that train nothing.
TRAINED_FIXTURES = frozenset({"badnet", "predeployed"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests that need a trained model as ``slow``."""
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def run_cli(module: str, *args: str, check: bool = True) -> tuple[int, dict[str, Any] | None, str]:
    """Run ``python -m MODULE ARGS --json`` in a subprocess; returns (exit code, last-line JSON, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, "--json"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    payload = json.loads(lines[-1]) if lines else None
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.returncode, payload, proc.stderr


@pytest.fixture(scope="session")
def splits():  # type: ignore[no-untyped-def]
    """The paper's splits of the real Fashion-MNIST, cut to the small sizes above."""
    from trainer.science.data import DataConfig, SplitConfig, load_splits

    return load_splits(DataConfig(), SplitConfig(valid=1000, stream=500, train=8000, test=2000))


@pytest.fixture(scope="session")
def badnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A checker4 BadNet trained through the CLI on 8,000 real images (3-step recipe)."""
    out = tmp_path_factory.mktemp("badnet")
    _, report, _ = run_cli(
        "trainer",
        "attack",
        *SMALL_SPLIT,
        "--trigger",
        "checker4",
        "--target",
        "0",
        "--epochs",
        "2",
        "--clean-epochs",
        "1",
        "--seed",
        "0",
        "--out",
        str(out),
        "--quiet",
    )
    assert report is not None
    return out, report


@pytest.fixture(scope="session")
def predeployed(
    badnet: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """Algorithm 1 on the small BadNet with a small grid: bundle v1 and its report."""
    out = tmp_path_factory.mktemp("predeploy")
    _, report, _ = run_cli(
        "trainer",
        "predeploy",
        *SMALL_SPLIT,
        "--model",
        str(badnet[0] / "model.pt"),
        "--out",
        str(out),
        "--gammas",
        "0.3",
        "0.6",
        "--epochs",
        "1",
        "--max-rounds",
        "2",
        "--eval-trigger",
        "checker4",
        "--target",
        "0",
        "--quiet",
    )
    assert report is not None
    return out, report


def wait_for(cond, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``cond`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


class Collector:
    """A minimal in-test collector: ROUTER, durable write into the trainer's quarantine store, then ACK."""

    def __init__(self, store_dir: Path, port: int | None = None, ack: bool = True) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1") if port is None else port
        if port is not None:
            self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.store_dir, self.ack, self.received = store_dir, ack, 0
        self.stats: list[quarantine_pb2.AgentStats] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        from trainer.service.quarantine import QuarantineStore

        with QuarantineStore(self.store_dir) as store:
            while not self.stop.is_set():
                if not self.sock.poll(20):
                    continue
                frames = self.sock.recv_multipart()
                if len(frames) == 2:  # [identity, AgentStats]
                    self.stats.append(quarantine_pb2.AgentStats.FromString(frames[1]))
                    continue
                ident, head, tensor = frames
                self.received += 1
                h = quarantine_pb2.QuarantineHeader.FromString(head)
                store.add_many([(h, tensor)])
                if self.ack:
                    reply = quarantine_pb2.QuarantineReply(
                        device_id=h.device_id, seq=h.seq, status=quarantine_pb2.QuarantineReply.ACK
                    )
                    self.sock.send_multipart([ident, reply.SerializeToString()])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        self.ctx.term()


def dealer(ctx: zmq.Context, port: int, identity: bytes) -> zmq.Socket:
    """A DEALER with ``identity`` connected to a collector on loopback ``port``."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, identity)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for servers a test starts later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_version(src: Path, dest: Path, version: int) -> Path:
    """A copy of a predeploy output whose manifest says ``version`` (files unchanged, so it still verifies)."""
    from edge_agent.formats.bundle import manifest_json, verify_bundle

    shutil.copytree(src, dest)
    bundle = verify_bundle(dest / "bundle")
    manifest = bundle.manifest
    manifest.version = version
    (dest / "bundle" / "manifest.pb").write_bytes(manifest.SerializeToString(deterministic=True))
    (dest / "bundle" / "manifest.json").write_text(manifest_json(manifest))
    return dest


def start_service(store: Any, tmp_path: Path, chunk: int = 1 << 20) -> Any:
    """The real model service on a free loopback port, over ``store``."""
    from trainer.service.model_service import ModelServer, ModelServicer, ServiceConfig
    from trainer.service.registry import Registry

    cfg = ServiceConfig(listen="127.0.0.1:0", chunk_size=chunk, watch_interval=0.05, insecure_operators=True)
    servicer = ModelServicer(store, Registry(tmp_path / "registry.sqlite"), tmp_path / "q", cfg)
    return ModelServer(servicer, cfg).start()


TINY_SPEC = dict(shape=[1, 28, 28], dtype="float32", min_value=0.0, max_value=1.0, scale=1 / 255, input_name="x")


def tiny_bundle(dest: Path, fleet: str, version: int) -> Path:
    """A bundle folder with placeholder model files: enough for the store and the collector (no ONNX runs)."""
    from edge_agent.formats.bundle import write_bundle
    from protos.nnoc.v1 import bundle_pb2

    models = {}
    for role in ("primary", "monitor"):
        models[role] = dest.parent / f"{dest.name}-{role}.bin"
        models[role].write_bytes(f"{role} {fleet} {version}".encode())
    manifest = bundle_pb2.Manifest(fleet=fleet, version=version, input_spec=bundle_pb2.InputSpec(**TINY_SPEC))
    write_bundle(dest / "bundle", models, manifest)
    return dest


def tiny_store(root: Path, fleet: str = "default", versions: tuple[int, ...] = (1,)) -> Any:
    """A real model store with placeholder bundles for ``fleet``; the first version is current."""
    from trainer.service.store import ModelStore

    store = ModelStore(root)
    store.create(fleet)
    for v in versions:
        store.add(fleet, tiny_bundle(root.parent / f"tiny-{fleet}-{v}", fleet, v))
    store.publish(fleet, versions[0])
    return store


def rgb_bundle(out: Path, block: Any, fleet: str = "cams", rule: Any = None) -> Path:
    """A bundle whose models take ``block``'s RGB 32x32 images (two differently seeded untrained nets, so some
    inputs disagree and are quarantined); seconds to make, no training."""
    import torch

    from edge_agent.formats.bundle import write_bundle
    from edge_agent.formats.spec import InputSpec
    from protos.nnoc.v1 import bundle_pb2
    from trainer.science.export import export_onnx
    from trainer.science.models import build_model

    out.mkdir(parents=True, exist_ok=True)
    spec = InputSpec.for_image((3, 32, 32), block)
    files = {}
    for seed, role in enumerate(("primary", "monitor")):
        torch.manual_seed(seed)
        files[role] = out / f"{role}.onnx"
        export_onnx(build_model("cnn3", (3, 32, 32), 10), spec, tuple("0123456789"), files[role])
    manifest = bundle_pb2.Manifest(fleet=fleet, version=1, input_spec=spec.message(), class_names=list("0123456789"))
    if rule is not None:  # a RejectRule (default: the paper's)
        manifest.reject_rule.CopyFrom(rule.message())
    write_bundle(out / "bundle", files, manifest)
    return out / "bundle"


def wait_while_running(cond: Any, timeout: float, procs: list[subprocess.Popen[Any]], logs: Path) -> Any:
    """``cond()``'s first true value within ``timeout`` seconds; fails at once, with the tails of ``logs/*.log``, when
    one of ``procs`` (services the test started) exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args} exited {p.returncode}: {log_tails(logs)}")
        time.sleep(0.5)
    raise AssertionError(f"timed out; logs: {log_tails(logs)}")


def log_tails(logs: Path) -> dict[str, str]:
    """The last 1,500 characters of each ``*.log`` in ``logs``."""
    return {f.name: f.read_text(errors="replace")[-1500:] for f in logs.glob("*.log")}


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None while it is missing or half written."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def stop_all(procs: list[subprocess.Popen[Any]], timeout: float = 30.0) -> None:
    """SIGTERM every process the test started, then wait for each (killed after ``timeout`` seconds)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
