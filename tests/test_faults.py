"""Fault injection on loopback, bounded in time: a collector killed mid-stream, a trainer that is down when the
agent starts, a spool on a full disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from conftest import ROOT, free_port, make_version, wait_for
from trainer.service.collector import quarantine_size
from trainer.service.store import ModelStore

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _serve(store: Path, state: Path, port: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "trainer", "serve", "--store", str(store), "--state-dir", str(state),
        "--collector", f"tcp://127.0.0.1:{port}", "--listen", "127.0.0.1:0", "--no-jobs", "--insecure", "--quiet",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert wait_for(lambda: (state / "serve.json").is_file() or proc.poll() is not None, 60)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    return proc


def test_kill_9_collector_mid_stream_stores_every_message_once(
    predeployed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    from edge_agent.spool import Spool, SpoolConfig
    from edge_agent.uplink import Uplink, UplinkConfig
    from protos.nnoc.v1 import quarantine_pb2

    store = ModelStore(tmp_path / "exports")
    store.create("default")
    store.publish("default", store.add("default", predeployed[0]))
    port, state = free_port(), tmp_path / "state"
    header = quarantine_pb2.QuarantineHeader(fleet="default", bundle_version=1, shape=[1, 28, 28], dtype="float32")
    tensor = np.full((1, 28, 28), 0.25, np.float32).tobytes()
    spool = Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power"))
    for _ in range(10):
        spool.put_many([(header.SerializeToString(), tensor)] * 1000)
    serve = _serve(tmp_path / "exports", state, port)
    up = Uplink(spool, UplinkConfig(f"tcp://127.0.0.1:{port}", "cam-1", resend_after=1.0)).start()
    try:
        qroot = state / "quarantine"
        assert wait_for(lambda: quarantine_size(qroot, "default", 1) >= 2000, 120)
        serve.send_signal(signal.SIGKILL)  # mid-stream: some rows stored but not yet acknowledged
        serve.wait(10)
        killed_at = quarantine_size(qroot, "default", 1)
        assert 0 < killed_at < 10000 and spool.depth() > 0
        (state / "serve.json").unlink(missing_ok=True)
        serve = _serve(tmp_path / "exports", state, port)
        assert wait_for(lambda: spool.depth() == 0, 180)
    finally:
        up.stop()
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
    assert quarantine_size(state / "quarantine", "default", 1) == 10000  # each message stored exactly once
    assert up.counters.acked == 10000 and spool.counter("acked") == 10000
    spool.close()


def test_agent_starts_while_the_trainer_is_down_then_catches_up_without_failed_requests(
    predeployed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    import shutil

    from edge_agent.agent import Agent
    from edge_agent.ensemble import Ensemble
    from edge_agent.monitor import RejectMonitor
    from edge_agent.spool import Spool, SpoolConfig
    from edge_agent.updates import BundleCache, UpdateConfig, Updater

    store = ModelStore(tmp_path / "exports")
    store.create("default")
    store.publish("default", store.add("default", predeployed[0]))
    store.publish("default", store.add("default", make_version(predeployed[0], tmp_path / "v2", 2)))
    cache = BundleCache(tmp_path / "cache")
    shutil.copytree(store.version_dir("default", 1) / "bundle", tmp_path / "stage")
    cache.install(tmp_path / "stage", 1)
    cache.set_current(1)
    bundle = cache.load()
    assert bundle is not None
    spool = Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power"))
    agent = Agent(Ensemble(bundle), spool, RejectMonitor(), "cam-1")
    port = free_port()
    updater = Updater(agent, cache, UpdateConfig(f"127.0.0.1:{port}", "default", "cam-1", backoff_max=0.5)).start()
    results: dict[str, int] = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def load() -> None:
        x = np.zeros((4, 1, 28, 28), np.float32)
        while not stop.is_set():
            try:
                labels, version = agent.classify(x)
                results["ok" if version in (1, 2) and len(labels.labels) == 4 else "failed"] += 1
            except Exception:
                results["failed"] += 1

    worker = threading.Thread(target=load)
    worker.start()
    server = None
    try:
        time.sleep(1.5)  # serving v1 from the cache; the model service is not there yet
        assert agent.ensemble.bundle.version == 1 and results["ok"] > 0  # the subscription waits for the service
        server = start_service_on(store, tmp_path, port)
        assert wait_for(lambda: agent.ensemble.bundle.version == 2, 60)
        time.sleep(0.5)
    finally:
        stop.set()
        worker.join()
        updater.stop()
        if server is not None:
            server.stop()
        spool.close()
    assert results["failed"] == 0 and results["ok"] > 10


def start_service_on(store: ModelStore, tmp_path: Path, port: int) -> Any:
    """The real model service on a given port (the agent was told this address before it existed)."""
    from trainer.service.model_service import ModelServer, ModelServicer, ServiceConfig
    from trainer.service.registry import Registry

    cfg = ServiceConfig(listen=f"127.0.0.1:{port}", watch_interval=0.05)
    return ModelServer(ModelServicer(store, Registry(tmp_path / "registry.sqlite"), tmp_path / "q", cfg), cfg).start()


DISK_FULL = r"""
import resource, signal, sys
from pathlib import Path
import numpy as np
from edge_agent.agent import Agent
from edge_agent.formats.bundle import verify_bundle
from edge_agent.ensemble import Ensemble
from edge_agent.monitor import RejectMonitor
from edge_agent.spool import Spool, SpoolConfig

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
ens = Ensemble(verify_bundle(Path(sys.argv[1])))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # a 1 MiB "disk" for every file from now on
agent = Agent(ens, Spool(SpoolConfig(Path(sys.argv[2]), durability="power")), RejectMonitor(), "cam-full")
x = np.load(sys.argv[3])
answered = 0
for i in range(0, len(x), 16):
    d, _ = agent.classify(x[i : i + 16])
    answered += len(d.labels)
print(answered, agent.unspooled, agent.spool.disk_full, agent.spool.depth())
"""


def test_spool_on_a_full_disk_keeps_serving_and_counts(
    predeployed: tuple[Path, dict[str, Any]], splits: Any, tmp_path: Path
) -> None:
    from edge_agent.ensemble import to_model_input
    from edge_agent.formats.bundle import verify_bundle
    from trainer.science.triggers import parse_trigger

    bundle = predeployed[0] / "bundle"
    raw = parse_trigger("checker4").apply(np.repeat(splits.test.images[:200], 4, axis=0), np.random.default_rng(0))
    np.save(tmp_path / "x.npy", to_model_input(raw, verify_bundle(bundle).manifest.input_spec))
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(bundle), str(tmp_path / "spool.sqlite"), str(tmp_path / "x.npy")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answered, unspooled, disk_full, depth = map(int, proc.stdout.split())
    assert answered == 800  # every request answered
    assert unspooled > 0 and disk_full == unspooled  # what the full disk refused is counted
    assert depth > 0  # what fitted stays spooled
    assert "not spooled" in proc.stderr
