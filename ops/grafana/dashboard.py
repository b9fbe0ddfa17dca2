"""The Grafana dashboard of a defended fleet, built with Grafana's own schema-generated SDK
(grafana-foundation-sdk), so that what is written is a dashboard Grafana's schema admits.

``python docs/generate.py`` writes it to ``ops/grafana/dashboards/nnoculation-edge.json`` (``--check``: says when
it is out of date). Grafana loads it through ``ops/grafana/provisioning``. The scrape jobs it expects are those of
``ops/prometheus/prometheus.yml``: ``nnoc-trainer`` (``serve --metrics-port``) and ``nnoc-edge`` (``nnoc-edge run
--metrics-port``); every metric name in its queries is checked against what both really export
(tests/test_operator_kit.py).
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

UID = "nnoculation-edge"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
AGENTS = 'job="nnoc-edge", instance=~"$instance"'


def query(expr: str, legend: str = "") -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).datasource(DS)
    return q.legend_format(legend) if legend else q


def series(title: str, what: str, unit: str, *queries: prometheus.Dataquery, width: int = 12) -> Any:
    panel = timeseries.Panel().title(title).description(what).unit(unit).datasource(DS).height(8).span(width)
    for ref, q in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(q.ref_id(ref))
    return panel


def single(title: str, what: str, unit: str, expr: str, legend: str = "", width: int = 6) -> Any:
    return (
        stat.Panel()
        .title(title)
        .description(what)
        .unit(unit)
        .datasource(DS)
        .height(5)
        .span(width)
        .with_target(query(expr, legend).ref_id("A"))
    )


def dashboard() -> dict[str, Any]:
    """The dashboard as the JSON object Grafana stores."""
    d = (
        dash.Dashboard("NNoculation edge: a defended fleet")
        .uid(UID)
        .tags(["nnoculation-edge"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(dash.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            dash.QueryVariable("fleet").label("Fleet").datasource(DS).query("label_values(nnoc_fleet_version, fleet)")
            .multi(True).include_all(True)
        )
        .with_variable(
            dash.QueryVariable("instance").label("Agent").datasource(DS)
            .query('label_values(nnoc_bundle_version{job="nnoc-edge"}, instance)').multi(True).include_all(True)
        )
    )  # fmt: skip
    d = d.with_row(dash.Row("Fleet: the trainer service"))
    for panel in (
        single("Version served", "The fleet's current version", "none", 'nnoc_fleet_version{fleet=~"$fleet"}',
               "{{fleet}}"),
        single("Rollout aborted", "1 while an aborted rollout is the fleet's latest (the reached devices went back)",
               "none",
               'max(nnoc_fleet_rollout_state{fleet=~"$fleet", nnoc_fleet_rollout_state="aborted"}) or vector(0)'),
        single("Quarantine budget full", "1 while the collector refuses new quarantine for its disk budget", "none",
               "max(nnoc_collector_budget_full)"),
        single("Silent devices", "Devices that have not reported for 5 minutes", "none",
               'count((time() - nnoc_device_last_seen_timestamp_seconds{fleet=~"$fleet"}) > 300) or vector(0)'),
        series("Quarantine received", "Messages per second the collector stored, and refused by reason", "ops",
               query("rate(nnoc_collector_stored_total[5m])", "stored"),
               query("sum by (reason) (rate(nnoc_collector_refused_total[5m]))", "refused: {{reason}}"),
               query("rate(nnoc_collector_throttled_total[5m])", "throttled")),
        series("Quarantine on disk", "The collector's estimated quarantine size", "bytes",
               query("nnoc_collector_bytes", "bytes")),
        series("Repair jobs", "Repair jobs by state", "none",
               query('sum by (state) (nnoc_fleet_jobs{fleet=~"$fleet"})', "{{state}}")),
        series("Rollouts", "Rollouts by how they stand", "none",
               query('sum by (state) (nnoc_fleet_rollouts{fleet=~"$fleet"})', "{{state}}")),
    ):  # fmt: skip
        d = d.with_panel(panel)
    d = d.with_row(dash.Row("Agents: detection"))
    for panel in (
        series("Reject rate", "Share of inputs the two models disagreed on (5-minute rate); the paper's alarm signal",
               "percentunit",
               query(f"sum by (instance) (rate(nnoc_rejects_total{{{AGENTS}}}[5m])) / "
                     f"sum by (instance) (rate(nnoc_inputs_total{{{AGENTS}}}[5m]))", "{{instance}}")),
        series("Reject alarm", "1 while an agent's windowed reject rate exceeds its --reject-threshold", "none",
               query(f"nnoc_reject_alarm{{{AGENTS}}}", "{{instance}}")),
        series("Inputs classified", "Inputs per second", "ops",
               query(f"sum by (instance) (rate(nnoc_inputs_total{{{AGENTS}}}[5m]))", "{{instance}}")),
        series("Latency", "Time to classify one request batch, 99th and 50th percentile", "s",
               query(f"histogram_quantile(0.99, sum by (le, instance) (rate(nnoc_request_seconds_bucket{{{AGENTS}}}"
                     "[5m])))", "p99 {{instance}}"),
               query(f"histogram_quantile(0.5, sum by (le, instance) (rate(nnoc_request_seconds_bucket{{{AGENTS}}}"
                     "[5m])))", "p50 {{instance}}")),
    ):  # fmt: skip
        d = d.with_panel(panel)
    d = d.with_row(dash.Row("Agents: quarantine uplink and updates"))
    for panel in (
        series("Uplink backlog", "Quarantined inputs waiting for the collector's ACK", "none",
               query(f"nnoc_spool_depth{{{AGENTS}}}", "{{instance}}")),
        series("Quarantine lost", "Quarantined inputs dropped at the spool bound, or never spooled (per second)", "ops",
               query(f"rate(nnoc_spool_dropped_total{{{AGENTS}}}[5m])", "dropped {{instance}}"),
               query(f"rate(nnoc_spool_unspooled_total{{{AGENTS}}}[5m])", "unspooled {{instance}}")),
        series("Uplink connected", "1 while the agent is connected to the collector", "none",
               query(f"nnoc_uplink_connected{{{AGENTS}}}", "{{instance}}")),
        series("Bundle version", "The version each agent serves", "none",
               query(f"nnoc_bundle_version{{{AGENTS}}}", "{{instance}}")),
        series("Updates", "Bundles applied and refused (per hour)", "none",
               query(f"increase(nnoc_updates_applied_total{{{AGENTS}}}[1h])", "applied {{instance}}"),
               query(f"increase(nnoc_updates_refused_total{{{AGENTS}}}[1h])", "refused {{instance}}")),
        series("Camera sources", "Frames read per second per source, and decode errors", "none",
               query(f"nnoc_source_fps{{{AGENTS}}}", "fps {{instance}} {{source}}"),
               query(f"rate(nnoc_source_decode_errors_total{{{AGENTS}}}[5m])",
                     "decode errors {{instance}} {{source}}")),
    ):  # fmt: skip
        d = d.with_panel(panel)
    built: dict[str, Any] = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    return built


def render() -> str:
    """The dashboard file's text."""
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"
