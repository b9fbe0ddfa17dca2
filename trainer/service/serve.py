"""``nnoc-trainer serve``: the collector, the model service and the job runner in one process.

State lives under ``state_dir``: ``registry.sqlite`` (devices, jobs), ``quarantine/<fleet>/<version>/``
(the collector's stores), ``jobs/<id>/`` (each repair's output and log) and ``serve.json`` (pid and ports,
while it runs). Staged rollouts are judged here (every ``rollout_interval``); their records live in the store, so a
restarted ``serve`` resumes them. Bundles live in the model store (``exports/`` by default). SIGTERM or SIGINT:
health goes NOT_SERVING, the job runner stops (a running repair is terminated and marked failed), the collector and the
gRPC server stop, ``serve.json`` is removed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, StateSetMetricFamily

from edge_agent.formats.signing import load_private_key
from edge_agent.options import flag, part, positive, positive_float
from edge_agent.ports import StateLock, check_address
from trainer.service.collector import Collector, CollectorConfig
from trainer.service.collector_process import CollectorProcess
from trainer.service.jobs import JobPolicy, JobRunner, make_backend
from trainer.service.model_service import ModelServer, ModelServicer, ServiceConfig
from trainer.service.registry import JOB_STATES, Registry
from trainer.service.rollout import STATES as ROLLOUT_STATES
from trainer.service.rollout import RolloutController
from trainer.service.store import ModelStore, StoreError

log = logging.getLogger(__name__)

SERVE_FILE = "serve.json"


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``serve`` needs: its spec, nested by part ([collector], [service], [policy] in a --spec file)."""

    store: Path = flag(Path("exports"), "model store (default ./exports)", type=Path)
    state_dir: Path = flag(
        Path("nnoc-trainer-state"), "registry, quarantine, jobs, serve.json (default ./nnoc-trainer-state)", type=Path
    )
    collector: CollectorConfig = part(CollectorConfig, "quarantine collector (ZeroMQ)")
    service: ServiceConfig = part(ServiceConfig, "model service (gRPC)")
    policy: JobPolicy = part(JobPolicy, "repair jobs")
    # Ed25519 private key (PEM): every version the store takes in is signed
    signing_key: Path | None = flag(None, "Ed25519 private key (PEM) signing new versions", type=Path)
    # Prometheus /metrics (collector and service counters); None: off
    metrics_port: int | None = flag(None, "Prometheus /metrics port (default: off)", type=int)
    insecure: bool = flag(False, "allow a plaintext model service (a warning is logged)")
    rollout_interval: float = flag(1.0, "seconds between judgings of the fleets' staged rollouts", type=positive_float)
    # The collector runs in a process of its own under these caps (trainer/service/collector_process.py): a sender's
    # flood kills and restarts it, and never takes the model service's memory or descriptors.
    collector_memory_mb: int = flag(2048, "the collector process's memory cap beyond its imports, MiB", type=positive)
    collector_files: int = flag(8192, "the collector process's descriptor cap (connections included)", type=positive)
    metrics_host: str = "127.0.0.1"

    @property
    def quarantine_root(self) -> Path:
        """Where the collector stores."""
        return self.state_dir / "quarantine"


def check_serve(cfg: ServeConfig) -> None:
    """Pairs of settings complete, transport and authorization consistent, addresses well formed: each wrong one
    is one line before anything starts. Warns about what ``--insecure`` and ``--insecure-operators`` allow."""
    svc, col = cfg.service, cfg.collector
    if (col.curve_secret is None) != (col.curve_allow is None):
        raise ValueError("--curve-secret and --curve-allow go together")
    if (svc.tls_cert is None) != (svc.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if svc.tls_cert is None and not cfg.insecure:
        raise ValueError(
            "the model service needs --tls-cert/--tls-key (nnoc-trainer keys tls makes a local CA), "
            "or --insecure for plaintext"
        )
    if (svc.operators or svc.agent_fleets) and svc.tls_client_ca is None:
        raise ValueError(
            "--operators and --agent-fleet name client certificates: they need mutual TLS (--tls-client-ca)"
        )
    if svc.insecure_operators and svc.tls_client_ca is not None:
        raise ValueError("--insecure-operators is for a service without client certificates; use --operators NAME")
    check_address(svc.listen, "--listen")
    check_address(col.endpoint.rsplit("//", 1)[-1], "--collector")
    if cfg.metrics_port is not None:
        check_address(f"127.0.0.1:{cfg.metrics_port}", "--metrics-port", allow_any=False)
    if svc.tls_cert is None:
        log.warning("--insecure: the model service runs in plaintext; anyone on the network can read and call it")
    if col.curve_secret is None:
        log.warning(
            "the quarantine collector runs without CURVE (--curve-secret, --curve-allow): senders are not "
            "authenticated, any sender may claim any device id, and staged rollouts judge unauthenticated stats"
        )
    if svc.insecure_operators:
        log.warning("--insecure-operators: any caller may publish and roll back fleets over gRPC")
    elif svc.tls_client_ca is not None and not svc.operators:
        log.info("no --operators: operator RPCs are refused for every caller ('nnoc-trainer fleet' works on the store)")


class ServeMetrics:
    """Prometheus metrics of ``serve``, read when scraped: the collector's and the model service's counters, and
    per fleet its version, its rollouts, its repair jobs and when each of its devices last reported."""

    def __init__(
        self,
        collector: Collector | CollectorProcess,
        servicer: ModelServicer,
        store: ModelStore | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.collector, self.servicer, self.store, self.registry = collector, servicer, store, registry

    def collect(self) -> Iterator[Metric]:
        """Called by prometheus-client on each scrape."""
        if isinstance(self.collector, CollectorProcess):
            self.collector.refresh()  # the collector's own process: its counters as of this scrape
        c = self.collector.counters
        for name, doc, value in (
            ("received", "Quarantine messages received", c.received),
            ("stored", "Quarantine messages stored", c.stored),
            ("duplicates", "Quarantine messages already stored (ACKed again)", c.duplicates),
            ("throttled", "Quarantine messages over a device's rate limit", c.throttled),
            ("over_quota", "Quarantine messages refused for a quota or the budget (kept by the agent)", c.over_quota),
            ("unavailable", "Quarantine messages the collector could not store (kept by the agent)", c.unavailable),
            ("stats", "Agent stats messages recorded", c.stats),
            ("auth_denied", "CURVE handshakes refused (key not on the allow-list)", c.auth_denied),
            ("internal_errors", "Messages the collector failed to check (a bug; the agent resends)", c.internal_errors),
        ):
            yield CounterMetricFamily(f"nnoc_collector_{name}", doc, value=value)
        refused = CounterMetricFamily("nnoc_collector_refused", "Messages refused, per reason", labels=["reason"])
        for reason, n in sorted(c.by_reason.items()):
            refused.add_metric([reason], n)
        yield refused
        yield GaugeMetricFamily("nnoc_collector_bytes", "Quarantine size on disk (estimated)", value=c.bytes_used)
        yield GaugeMetricFamily(
            "nnoc_collector_budget_full", "1 while new quarantine is refused for the budget", value=int(c.budget_full)
        )
        yield GaugeMetricFamily("nnoc_collector_open_stores", "Quarantine files open", value=self.collector.open_stores)
        denied = CounterMetricFamily("nnoc_service_denied", "Model service calls refused, per RPC", labels=["rpc"])
        for rpc, n in sorted(self.servicer.denied.items()):
            denied.add_metric([rpc], n)
        yield denied
        if self.store is not None and self.registry is not None:
            yield from fleet_metrics(self.store, self.registry)


def fleet_metrics(store: ModelStore, registry: Registry) -> Iterator[Metric]:
    """Per fleet: current version, rollouts by state (the one in force as a state set), repair jobs by state; per
    device: when it last reported (stats or a subscription), for the "agent silent" alert."""
    version = GaugeMetricFamily("nnoc_fleet_version", "The fleet's current version (0: none)", labels=["fleet"])
    rollouts = GaugeMetricFamily("nnoc_fleet_rollouts", "Rollouts started, by how they stand now",
                                 labels=["fleet", "state"])  # fmt: skip
    in_force = StateSetMetricFamily("nnoc_fleet_rollout_state", "The state of the rollout in force", labels=["fleet"])
    jobs = GaugeMetricFamily("nnoc_fleet_jobs", "Repair jobs, by state", labels=["fleet", "state"])
    seen = GaugeMetricFamily("nnoc_device_last_seen_timestamp_seconds", "When the device last reported (Unix time)",
                             labels=["fleet", "device"])  # fmt: skip
    for fleet in store.fleets():
        try:
            state = store.state(fleet)
            records = store.rollouts(fleet)
        except (StoreError, OSError, ValueError) as e:  # a fleet being written or damaged: the rest still reports
            log.warning("metrics: fleet %s unreadable: %s", fleet, e)
            continue
        version.add_metric([fleet], float(state.current or 0))
        for name in ROLLOUT_STATES:
            rollouts.add_metric([fleet, name], float(sum(r.get("state") == name for r in records)))
        current = next((r for r in records if r.get("id") == state.rollout), None)
        if current is not None:
            in_force.add_metric([fleet], {name: current.get("state") == name for name in ROLLOUT_STATES})
        by_state = Counter(j.state for j in registry.jobs(fleet))
        for name in JOB_STATES:
            jobs.add_metric([fleet, name], float(by_state[name]))
    for device in registry.devices():
        seen.add_metric([device["fleet"], device["device_id"]], float(device["last_seen"]))
    yield from (version, rollouts, in_force, jobs, seen)


def serve(cfg: ServeConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Run until ``stop`` is set (SIGTERM/SIGINT set it in the main thread); returns final counters.

    Raises OSError (one line for the CLI) when the state folder is in use or a port cannot be bound; whatever
    had started by then is stopped again.
    """
    stop = stop or threading.Event()
    lock = StateLock(cfg.state_dir, "serve.lock", "another 'nnoc-trainer serve'")
    if cfg.signing_key is None:
        log.warning("no --signing-key: new versions are published unsigned (agents with trusted keys refuse them)")
    with ExitStack() as started:
        started.callback(lock.release)
        # Ray first, while this process has one thread: ray.init forks its raylet with a preexec_fn (Python code
        # between fork and exec), which can deadlock in the child when gRPC and ZeroMQ threads hold locks; seen
        # once in CI as "The current node timed out during startup" with no raylet ever started.
        backend = make_backend(cfg.policy) if cfg.policy.enabled else None
        if backend is not None:
            started.callback(backend.close)
        store = ModelStore(cfg.store, load_private_key(cfg.signing_key) if cfg.signing_key else None)
        registry = Registry(cfg.state_dir / "registry.sqlite")
        started.callback(registry.close)
        collector = CollectorProcess(
            CollectorConfig(**{**cfg.collector.__dict__, "root": cfg.quarantine_root}),
            cfg.store,
            cfg.state_dir / "registry.sqlite",
            memory_bytes=cfg.collector_memory_mb << 20,
            files=cfg.collector_files,
        ).start()
        started.callback(collector.stop)
        servicer = ModelServicer(store, registry, cfg.quarantine_root, cfg.service)
        server = ModelServer(servicer, cfg.service).start()
        started.callback(server.stop)
        if cfg.metrics_port is not None:
            metrics = CollectorRegistry()
            metrics.register(ServeMetrics(collector, servicer, store, registry))
            try:
                disable_created_metrics()  # the *_created series: noise for Prometheus 2, off
                http, _ = start_http_server(cfg.metrics_port, addr=cfg.metrics_host, registry=metrics)
            except OSError as e:
                raise OSError(f"--metrics-port {cfg.metrics_port}: cannot listen: {e.strerror or e}") from None
            started.callback(http.shutdown)
        runner = JobRunner(store, registry, cfg.quarantine_root, cfg.state_dir / "jobs", cfg.policy, backend).start()
        started.callback(runner.stop)
        rollouts = RolloutController(store, registry, cfg.rollout_interval).start()
        started.callback(rollouts.stop)
        started.callback(server.enter_graceful_shutdown)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            signal.signal(signal.SIGINT, lambda *_: stop.set())
        info = {
            "pid": os.getpid(),
            "collector": f"tcp://{cfg.collector.endpoint.split('://', 1)[1].rsplit(':', 1)[0]}:{collector.port}",
            "model_service": f"{cfg.service.listen.rsplit(':', 1)[0]}:{server.port}",
            "metrics_port": cfg.metrics_port,
            "store": str(cfg.store),
            "started": time.time(),
        }
        (cfg.state_dir / SERVE_FILE).write_text(json.dumps(info))
        started.callback((cfg.state_dir / SERVE_FILE).unlink, missing_ok=True)
        log.info(
            "serving: collector %s, model service %s, store %s", info["collector"], info["model_service"], cfg.store
        )
        stop.wait()
        log.info("shutting down")
    c = collector.counters
    return {
        "received": c.received,
        "stored": c.stored,
        "duplicates": c.duplicates,
        "rejected": c.rejected,
        "throttled": c.throttled,
        "over_quota": c.over_quota,
        "stats": c.stats,
    }
