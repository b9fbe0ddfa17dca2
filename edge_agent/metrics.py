"""Prometheus metrics of a running agent, served over HTTP by prometheus-client."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from edge_agent.agent import Agent
from edge_agent.ports import PortError
from edge_agent.sources import STATES, SourceStats
from edge_agent.updates import Updater
from edge_agent.uplink import Uplink

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class AgentMetrics:
    """An agent's Prometheus metrics, named by Prometheus' conventions: what only grows is a counter (``_total``),
    what goes up and down a gauge. The request histogram and counters are updated as requests are answered;
    everything else is read from the agent's own state when scraped (:class:`_AgentState`)."""

    def __init__(self, agent: Agent, uplink: Uplink | None = None, updater: Updater | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
        self.state = _AgentState(agent, uplink, updater)
        r.register(self.state)

    def add_source(self, source_id: str, stats: SourceStats) -> None:
        """Per-source series, labelled ``source``: frames read, classified, rejected, dropped, decode errors and
        reconnects (counters), current fps and state (``nnoc_source_state{state=...}`` is 1 for the current one)."""
        self.state.sources[source_id] = stats

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
            disable_created_metrics()  # the *_created series: noise for Prometheus 2, off
            start_http_server(port, addr=address, registry=self.registry)
        except OSError as e:
            raise PortError(f"--metrics-port {port}: cannot listen on {address}: {e.strerror or e}") from None


# What the agent exports from its own state on each scrape: (name, help, read), counters then gauges.
AgentRead = Callable[[Agent], float]
AGENT_COUNTERS: tuple[tuple[str, str, AgentRead], ...] = (
    ("nnoc_inputs", "Inputs classified (endpoint and sources)", lambda a: a.monitor.snapshot().requests),
    ("nnoc_rejects", "Inputs rejected: the two models disagreed", lambda a: a.monitor.snapshot().rejects),
    ("nnoc_nonfinite_rejects", "Inputs rejected because a model's logits or the score were NaN or infinite",
     lambda a: a.nonfinite),
    ("nnoc_spool_dropped", "Quarantined inputs dropped at the spool bound", lambda a: a.spool.counter("dropped")),
    ("nnoc_spool_unspooled", "Rejected inputs not quarantined (reject-new bound, disk full)", lambda a: a.unspooled),
)  # fmt: skip
AGENT_GAUGES: tuple[tuple[str, str, AgentRead], ...] = (
    ("nnoc_window_reject_rate", "Reject rate over the last window of requests",
     lambda a: a.monitor.snapshot().window_reject_rate),
    ("nnoc_reject_alarm", "1 while the windowed reject rate exceeds --reject-threshold",
     lambda a: float(a.monitor.snapshot().alarm)),
    ("nnoc_spool_depth", "Quarantined inputs waiting for the collector's ACK (the uplink's backlog)",
     lambda a: a.spool.depth()),
    ("nnoc_bundle_version", "Version of the bundle serving now", lambda a: a.ensemble.bundle.version),
)  # fmt: skip
UPLINK_COUNTERS = (
    ("sent", "Quarantine messages sent (resends included)"),
    ("acked", "Quarantine messages the collector acknowledged"),
    ("refused", "Quarantine messages the collector refused for good (dropped, logged)"),
    ("deferred", "Collector answers asking the agent to wait (quota, budget, unavailable store)"),
    ("reconnects", "Times the uplink's connection to the collector was made again"),
)
UPDATE_COUNTERS = (
    ("applied", "Bundles applied"),
    ("refused", "Bundles refused (signature, hashes, canary, fleet)"),
    ("reconnects", "Times the subscription to the model service was opened again"),
)
SOURCE_COUNTERS = (
    ("frames_read", "read", "Frames read from the source"),
    ("frames_classified", "classified", "Frames classified"),
    ("frames_rejected", "rejected", "Frames rejected (the two models disagreed)"),
    ("frames_dropped", "dropped", "Frames dropped (a newer one replaced it, or over the fps cap)"),
    ("decode_errors", "decode_errors", "Frames or reads that failed to decode"),
    ("reconnects", "reconnects", "Times the source was opened again after a stall or failure"),
)


class _AgentState(Collector):
    """The agent's, uplink's, updater's and sources' state as metrics, read when scraped."""

    def __init__(self, agent: Agent, uplink: Uplink | None, updater: Updater | None) -> None:
        self.agent, self.uplink, self.updater = agent, uplink, updater
        self.sources: dict[str, SourceStats] = {}

    def collect(self) -> Iterator[Metric]:
        """Called by prometheus-client on each scrape."""
        a = self.agent
        for name, doc, read in AGENT_COUNTERS:
            yield CounterMetricFamily(name, doc, value=read(a))
        for name, doc, read in AGENT_GAUGES:
            yield GaugeMetricFamily(name, doc, value=read(a))
        provider = InfoMetricFamily("nnoc_provider", "Execution provider and ensemble path running the models")
        provider.add_metric([], {"provider": a.ensemble.provider, "path": a.ensemble.path})
        yield provider
        if self.uplink is not None:
            for field, doc in UPLINK_COUNTERS:
                yield CounterMetricFamily(f"nnoc_uplink_{field}", doc, value=getattr(self.uplink.counters, field))
            yield GaugeMetricFamily("nnoc_uplink_connected", "1 while the uplink is connected to the collector",
                                    value=float(self.uplink.counters.connected))  # fmt: skip
        if self.updater is not None:
            for field, doc in UPDATE_COUNTERS:
                yield CounterMetricFamily(f"nnoc_updates_{field}", doc, value=getattr(self.updater.counters, field))
        if self.sources:
            yield from self._sources()

    def _sources(self) -> Iterator[Metric]:
        for name, attr, doc in SOURCE_COUNTERS:
            family = CounterMetricFamily(f"nnoc_source_{name}", doc, labels=["source"])
            for source_id, stats in self.sources.items():
                family.add_metric([source_id], float(getattr(stats, attr)))
            yield family
        fps = GaugeMetricFamily("nnoc_source_fps", "Frames read per second over the last 5 seconds", labels=["source"])
        state = StateSetMetricFamily("nnoc_source_state", "The source's current state", labels=["source"])
        for source_id, stats in self.sources.items():
            fps.add_metric([source_id], stats.fps)
            state.add_metric([source_id], {s: stats.state == s for s in STATES})
        yield fps
        yield state
