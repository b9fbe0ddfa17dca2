"""``nnoc-trainer serve``: the collector, the model service and the job runner in one process.

State lives under ``state_dir``: ``registry.sqlite`` (devices, jobs), ``quarantine/<fleet>/<version>/``
(the collector's stores), ``jobs/<id>/`` (each repair's output and log) and ``serve.json`` (pid and ports,
while it runs). Bundles live in the model store (``exports/`` by default). SIGTERM or SIGINT: health goes
NOT_SERVING, the job runner stops (a running repair is terminated and marked failed), the collector and the
gRPC server stop, ``serve.json`` is removed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import zmq

from edge_agent.signing import load_private_key
from protos.nnoc.v1 import bundle_pb2
from trainer.collector import Collector, CollectorConfig
from trainer.jobs import JobPolicy, JobRunner
from trainer.registry import Registry
from trainer.service import ModelServer, ModelServicer, ServiceConfig
from trainer.store import ModelStore

log = logging.getLogger(__name__)

SERVE_FILE = "serve.json"


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``serve`` needs."""

    store: Path = Path("exports")
    state_dir: Path = Path("nnoc-trainer-state")
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    policy: JobPolicy = field(default_factory=JobPolicy)
    signing_key: Path | None = None  # Ed25519 private key (PEM): every version the store takes in is signed

    @property
    def quarantine_root(self) -> Path:
        """Where the collector stores."""
        return self.state_dir / "quarantine"


def load_toml(path: Path, known: set[str]) -> dict[str, Any]:
    """A flat TOML table whose keys are flag names (``min-quarantine`` or ``min_quarantine``)."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot read config {path}: {e}") from e
    flat = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; keys are the flags of 'nnoc-trainer serve --help'")
    return flat


def spec_source(store: ModelStore) -> Any:
    """The fleet's input spec, read from its current bundle (None when the fleet has none)."""

    def spec_for(fleet: str) -> bundle_pb2.InputSpec | None:
        if fleet not in store.fleets() or store.state(fleet).current is None:
            return None
        return store.bundle(fleet).manifest.input_spec

    return spec_for


def serve(cfg: ServeConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Run until ``stop`` is set (SIGTERM/SIGINT set it in the main thread); returns final counters."""
    stop = stop or threading.Event()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    if cfg.signing_key is None:
        log.warning("no --signing-key: new versions are published unsigned (agents with trusted keys refuse them)")
    store = ModelStore(cfg.store, load_private_key(cfg.signing_key) if cfg.signing_key else None)
    registry = Registry(cfg.state_dir / "registry.sqlite")
    context = zmq.Context()
    collector = Collector(
        CollectorConfig(**{**cfg.collector.__dict__, "root": cfg.quarantine_root}),
        spec_source(store),
        registry,
        context,
    ).start()
    servicer = ModelServicer(store, registry, cfg.quarantine_root, cfg.service)
    server = ModelServer(servicer, cfg.service).start()
    runner = JobRunner(store, registry, cfg.quarantine_root, cfg.state_dir / "jobs", cfg.policy).start()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    info = {
        "pid": os.getpid(),
        "collector": f"tcp://{cfg.collector.endpoint.split('://', 1)[1].rsplit(':', 1)[0]}:{collector.port}",
        "model_service": f"{cfg.service.listen.rsplit(':', 1)[0]}:{server.port}",
        "store": str(cfg.store),
        "started": time.time(),
    }
    (cfg.state_dir / SERVE_FILE).write_text(json.dumps(info))
    log.info("serving: collector %s, model service %s, store %s", info["collector"], info["model_service"], cfg.store)
    try:
        stop.wait()
    finally:
        log.info("shutting down")
        server.health.enter_graceful_shutdown()
        runner.stop()
        collector.stop()
        server.stop()
        context.term()
        registry.close()
        (cfg.state_dir / SERVE_FILE).unlink(missing_ok=True)
    c = collector.counters
    return {
        "received": c.received,
        "stored": c.stored,
        "duplicates": c.duplicates,
        "rejected": c.rejected,
        "throttled": c.throttled,
        "stats": c.stats,
    }
