from __future__ import annotations

import shutil
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from conftest import free_port, wait_for
from edge_agent.agent import Agent
from edge_agent.ensemble import Ensemble
from edge_agent.formats.bundle import BundleError, read_manifest, verify_bundle, write_bundle
from edge_agent.monitor import RejectMonitor
from edge_agent.spool import Spool, SpoolConfig
from edge_agent.updates import BundleCache, UpdateConfig, Updater
from protos.nnoc.v1 import bundle_pb2, model_service_pb2, model_service_pb2_grpc


class FakeModelService(model_service_pb2_grpc.ModelServiceServicer):
    """An in-test model service speaking the real proto over a real gRPC server on loopback."""

    def __init__(self, bundles: dict[int, Path], fleet: str) -> None:
        self.bundles, self.fleet = bundles, fleet
        self.current: tuple[int, bool] | None = None
        self.cond = threading.Condition()
        self.break_once: set[str] = set()  # artifact names whose next download stops after one chunk
        self.corrupt: set[int] = set()  # versions whose downloads carry a flipped byte
        self.downloads = 0

    def publish(self, version: int, rollback: bool = False) -> None:
        with self.cond:
            self.current = (version, rollback)
            self.cond.notify_all()

    def Subscribe(self, request: Any, context: Any) -> Any:
        sent = None
        while context.is_active():
            with self.cond:
                self.cond.wait_for(lambda last=sent: self.current != last, timeout=0.2)
                cur = self.current
            if cur is not None and cur != sent:
                sent = cur
                manifest = read_manifest(self.bundles[cur[0]])
                yield model_service_pb2.VersionNotice(
                    fleet=self.fleet, version=cur[0], manifest=manifest, rollback=cur[1]
                )

    def Download(self, request: Any, context: Any) -> Any:
        self.downloads += 1
        data = (self.bundles[request.version] / request.name).read_bytes()
        if request.version in self.corrupt:
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        step = 1 << 16
        for off in range(request.offset, len(data), step):
            yield model_service_pb2.Chunk(offset=off, data=data[off : off + step], total_size=len(data))
            if request.name in self.break_once:
                self.break_once.discard(request.name)
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection dropped (test)")


def make_version(src: Path, dest: Path, version: int) -> Path:
    m = read_manifest(src)
    new = bundle_pb2.Manifest()
    new.CopyFrom(m)
    new.version, new.parent_version = version, m.version
    new.ClearField("created_at")
    write_bundle(dest, {"primary": src / "primary.onnx", "monitor": src / "monitor.onnx"}, new)
    return dest


@pytest.fixture()
def fleet(predeployed: tuple[Path, dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    v1 = predeployed[0] / "bundle"
    bundles = {1: v1, 2: make_version(v1, tmp_path / "b2", 2), 3: make_version(v1, tmp_path / "b3", 3)}
    cache = BundleCache(tmp_path / "cache")
    shutil.copytree(v1, tmp_path / "stage1")
    cache.install(tmp_path / "stage1", 1)
    cache.set_current(1)
    bundle = cache.load()
    assert bundle is not None and bundle.version == 1
    spool = Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power"))
    agent = Agent(Ensemble(bundle), spool, RejectMonitor(), "cam-1")
    yield {"bundles": bundles, "cache": cache, "agent": agent}
    spool.close()


def test_subscribe_download_verify_swap_and_refusals(fleet: dict[str, Any]) -> None:
    service = FakeModelService(fleet["bundles"], "default")
    port = free_port()
    agent, cache = fleet["agent"], fleet["cache"]
    # The trainer is down when the agent starts: it serves its cached bundle and keeps trying.
    updater = Updater(agent, cache, UpdateConfig(f"127.0.0.1:{port}", "default", "cam-1", backoff_max=0.5)).start()
    x = np.zeros((3, 1, 28, 28), np.float32)
    assert agent.classify(x)[1] == 1
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(service, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    # Requests keep coming the whole time: no broken download, corrupt chunk or refusal may fail one.
    served = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                decision, version = agent.classify(x)
                served["ok" if version in (1, 2) and decision.labels.shape == (3,) else "failed"] += 1
            except Exception:
                served["failed"] += 1

    worker = threading.Thread(target=load)
    worker.start()
    try:
        service.break_once.add("primary.onnx")  # the first download breaks after one chunk: resumed
        service.publish(2)
        assert wait_for(lambda: agent.ensemble.bundle.version == 2)
        assert wait_for(lambda: updater.counters.applied == 1)  # counted just after the swap
        assert agent.classify(x)[1] == 2
        assert verify_bundle(cache.path(2)).version == 2
        # A corrupted download is refused; v2 keeps serving.
        service.corrupt.add(3)
        service.publish(3)
        assert wait_for(lambda: updater.counters.refused == 1)
        assert agent.ensemble.bundle.version == 2 and "sha256" in updater.counters.last_error
        # An older version is refused unless it is an explicit rollback.
        service.publish(1)
        assert wait_for(lambda: updater.counters.refused == 2)
        assert agent.ensemble.bundle.version == 2
        service.publish(1, rollback=True)
        assert wait_for(lambda: updater.counters.applied == 2)
        assert agent.ensemble.bundle.version == 1
        current, previous = cache.load(), cache.load("previous")
        assert current is not None and current.version == 1 and previous is not None and previous.version == 2
    finally:
        stop.set()
        worker.join()
        updater.stop()
        server.stop(0)
    assert served["failed"] == 0 and served["ok"] > 10


def test_cache_rollback(fleet: dict[str, Any], tmp_path: Path) -> None:
    cache = fleet["cache"]
    with pytest.raises(BundleError, match="no previous"):
        cache.rollback()
    shutil.copytree(fleet["bundles"][2], tmp_path / "s2")
    cache.install(tmp_path / "s2", 2)
    cache.set_current(2)
    assert cache.rollback() == 1
    loaded = cache.load()
    assert loaded is not None and loaded.version == 1
