"""Prometheus metrics of a running agent, served over HTTP by prometheus-client."""

from __future__ import annotations

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from edge_agent.agent import Agent
from edge_agent.ports import PortError
from edge_agent.sources import STATES, SourceStats
from edge_agent.updates import Updater
from edge_agent.uplink import Uplink

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class AgentMetrics:
    """Counters and gauges; most gauges read the agent's own state when scraped."""

    def __init__(self, agent: Agent, uplink: Uplink | None = None, updater: Updater | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._source_gauges: dict[str, Gauge] | None = None
        self._source_state: Gauge
        # origin: "endpoint" (Open Inference Protocol calls) or "source" (inputs the agent plays itself)
        self.latency = Histogram(
            "nnoc_request_seconds",
            "Time to classify one request batch",
            ["origin"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.handled = Counter("nnoc_requests_handled", "Request batches answered", ["origin"], registry=r)
        self.invalid = Counter("nnoc_invalid_requests", "Requests refused for a bad input", ["origin"], registry=r)
        self.oversized = Counter(
            "nnoc_oversized_requests", "Endpoint requests over --max-batch (RESOURCE_EXHAUSTED)", registry=r
        )
        Gauge("nnoc_requests", "Inputs classified since start", registry=r).set_function(
            lambda: agent.monitor.snapshot().requests
        )
        Gauge("nnoc_rejects", "Inputs rejected (models disagreed) since start", registry=r).set_function(
            lambda: agent.monitor.snapshot().rejects
        )
        Gauge(
            "nnoc_nonfinite_rejects",
            "Inputs rejected because a model's logits or the score were NaN or infinite",
            registry=r,
        ).set_function(lambda: agent.nonfinite)
        Gauge("nnoc_window_reject_rate", "Reject rate over the last window of requests", registry=r).set_function(
            lambda: agent.monitor.snapshot().window_reject_rate
        )
        Gauge(
            "nnoc_reject_alarm", "1 while the windowed reject rate exceeds --reject-threshold", registry=r
        ).set_function(lambda: float(agent.monitor.snapshot().alarm))
        Gauge("nnoc_spool_depth", "Quarantined inputs waiting for the collector's ACK", registry=r).set_function(
            agent.spool.depth
        )
        Gauge("nnoc_spool_dropped", "Quarantined inputs dropped at the spool bound", registry=r).set_function(
            lambda: agent.spool.counter("dropped")
        )
        Gauge(
            "nnoc_spool_unspooled", "Rejected inputs not quarantined (reject-new bound, disk full)", registry=r
        ).set_function(lambda: agent.unspooled)
        Gauge("nnoc_bundle_version", "Version of the bundle serving now", registry=r).set_function(
            lambda: agent.ensemble.bundle.version
        )
        provider = Gauge(
            "nnoc_provider_info",
            "Execution provider and ensemble path running the models",
            ["provider", "path"],
            registry=r,
        )
        provider.labels(agent.ensemble.provider, agent.ensemble.path).set(1)
        if uplink is not None:
            Gauge("nnoc_uplink_sent", "Quarantine messages sent (resends included)", registry=r).set_function(
                lambda: uplink.counters.sent
            )
            Gauge("nnoc_uplink_acked", "Quarantine messages acknowledged", registry=r).set_function(
                lambda: uplink.counters.acked
            )
        if updater is not None:
            Gauge("nnoc_updates_applied", "Bundles applied since start", registry=r).set_function(
                lambda: updater.counters.applied
            )
            Gauge("nnoc_updates_refused", "Bundles refused since start", registry=r).set_function(
                lambda: updater.counters.refused
            )

    def add_source(self, source_id: str, stats: SourceStats) -> None:
        """Per-source series, labelled ``source``: frames read, classified, rejected, dropped, decode errors,
        reconnects, current fps and state (``nnoc_source_state{state=...}`` is 1 for the current one)."""
        if self._source_gauges is None:
            r = self.registry
            self._source_gauges = {
                name: Gauge(f"nnoc_source_{name}", text, ["source"], registry=r)
                for name, text in (
                    ("frames_read", "Frames read from the source"),
                    ("frames_classified", "Frames classified"),
                    ("frames_rejected", "Frames rejected (the two models disagreed)"),
                    ("frames_dropped", "Frames dropped (a newer one replaced it, or over the fps cap)"),
                    ("decode_errors", "Frames or reads that failed to decode"),
                    ("reconnects", "Times the source was opened again after a stall or failure"),
                    ("fps", "Frames read per second over the last 5 seconds"),
                )
            }
            self._source_state = Gauge("nnoc_source_state", "1 for the source's current state", ["source", "state"],
                                       registry=r)  # fmt: skip
        fields = ("read", "classified", "rejected", "dropped", "decode_errors", "reconnects", "fps")
        for gauge, name in zip(self._source_gauges.values(), fields, strict=True):
            gauge.labels(source_id).set_function(functools.partial(_stat, stats, name))
        for state in STATES:
            self._source_state.labels(source_id, state).set_function(functools.partial(_in_state, stats, state))

    def observe(self, origin: str, seconds: float, ok: bool) -> None:
        """One request batch answered (``ok``) or refused for a bad input."""
        if ok:
            self.handled.labels(origin).inc()
            self.latency.labels(origin).observe(seconds)
        else:
            self.invalid.labels(origin).inc()

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Expose ``/metrics`` on ``address:port`` (a daemon thread); PortError when it cannot listen."""
        try:
            start_http_server(port, addr=address, registry=self.registry)
        except OSError as e:
            raise PortError(f"--metrics-port {port}: cannot listen on {address}: {e.strerror or e}") from None


def _stat(stats: SourceStats, name: str) -> float:
    return float(getattr(stats, name))


def _in_state(stats: SourceStats, state: str) -> float:
    return float(stats.state == state)
