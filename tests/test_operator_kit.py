"""The operator's kit against the real processes: ``nnoc-trainer serve`` and ``nnoc-edge run`` (model service,
collector, a camera-like source) are started, both ``/metrics`` are scraped, and

- every metric follows Prometheus' naming conventions (a counter's samples end in ``_total``, nothing else does);
- the metrics reference (docs/reference/metrics.md) lists exactly what the two processes export, with its type;
- every metric name in the Grafana dashboard's queries and in the alert rules is one they really export;
- the values say what happened (the agent's inputs, its uplink, the fleet's version, the device last seen).

The rules themselves are checked by promtool (``make lint``: check rules, check config, test rules).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, free_port, wait_for

N_FRAMES = 120
NAME = re.compile(r"\bnnoc_[a-z0-9_]+")


def scrape(port: int) -> dict[str, Any]:
    """Families by name: {"type", "samples": {sample name: [(labels, value)]}}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("nnoc_"):
            continue
        entry = out.setdefault(family.name, {"type": family.type, "samples": {}})
        for s in family.samples:
            entry["samples"].setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(families: dict[str, Any], sample: str, **labels: str) -> float | None:
    for family in families.values():
        for labs, v in family["samples"].get(sample, []):
            if all(labs.get(k) == want for k, want in labels.items()):
                return float(v)
    return None


def documented() -> dict[str, str]:
    """The metrics reference's table: metric family -> type."""
    rows = re.findall(r"^\| `(nnoc_[a-z0-9_]+)` \| (counter|gauge|histogram|info|stateset) \|",
                      (ROOT / "docs" / "reference" / "metrics.md").read_text(), flags=re.M)  # fmt: skip
    return dict(rows)


def queried() -> dict[str, set[str]]:
    """Every nnoc_ metric name the dashboard's queries and the alert rules use, by where."""
    board = json.loads((ROOT / "ops" / "grafana" / "dashboards" / "nnoculation-edge.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets") or []]
    exprs += [v["query"] for v in board["templating"]["list"] if isinstance(v.get("query"), str)]
    rules = yaml.safe_load((ROOT / "ops" / "prometheus" / "alerts.yml").read_text())
    alerts = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {
        "dashboard": {n for e in exprs for n in NAME.findall(e)},
        "alerts": {n for e in alerts for n in NAME.findall(e)},
    }


@pytest.fixture()
def running(predeployed: tuple[Path, dict[str, Any]], tmp_path: Path) -> Any:
    """serve (store with fleet "default" at v1) and one agent playing a stream of frames; yields both ports."""
    from trainer.service.store import ModelStore
    from trainer.stages.replay import write_frames

    store = ModelStore(tmp_path / "exports")
    store.create("default")
    store.publish("default", store.add("default", predeployed[0]))
    serve_port, edge_port = free_port(), free_port()
    config = tmp_path / "serve.toml"
    config.write_text(
        f'store = "{store.root}"\nstate-dir = "{tmp_path / "state"}"\ncollector = "tcp://127.0.0.1:0"\n'
        f'listen = "127.0.0.1:0"\nno-jobs = true\ninsecure = true\nmetrics-port = {serve_port}\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "trainer", "serve", "--config", str(config), "--quiet"],
                              cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)]  # fmt: skip
    try:
        info_file = tmp_path / "state" / "serve.json"
        assert wait_for(lambda: info_file.is_file() or procs[0].poll() is not None, 120)
        assert procs[0].poll() is None, procs[0].communicate(timeout=30)[1][-2000:]
        info = json.loads(info_file.read_text())
        frames, _ = write_frames(f"fashion-mnist?split=test&n={N_FRAMES}&poison=0.5&trigger=checker4&seed=3",
                                 tmp_path / "f.npy")  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--insecure", "--device-id", "cam-1", "--fleet", "default",
             "--model-service", info["model_service"], "--collector", info["collector"], "--infer-port", "0",
             "--metrics-port", str(edge_port), "--source", f"npy:{frames}", "--state-dir", str(tmp_path / "edge"),
             "--stats-interval", "0.3", "--quiet"],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
        yield serve_port, edge_port, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_metrics_follow_conventions_and_match_docs_dashboard_and_alerts(running: Any) -> None:
    serve_port, edge_port, procs = running

    def agent_done() -> bool:
        assert procs[1].poll() is None, procs[1].communicate(timeout=30)[1][-2000:]
        try:
            return value(scrape(edge_port), "nnoc_inputs_total") == N_FRAMES
        except OSError:  # not listening yet: it fetches its bundle from the model service first
            return False

    assert wait_for(agent_done, 120)
    rejects = value(scrape(edge_port), "nnoc_rejects_total")
    assert rejects is not None and 0 < rejects < N_FRAMES
    # every reject reaches the collector and is ACKed
    assert wait_for(lambda: value(scrape(edge_port), "nnoc_uplink_acked_total") == rejects, 60)
    assert wait_for(lambda: value(scrape(serve_port), "nnoc_device_last_seen_timestamp_seconds", device="cam-1"), 30)
    agent, service = scrape(edge_port), scrape(serve_port)

    # what happened, as the metrics say it
    assert value(agent, "nnoc_spool_depth") == 0
    assert value(agent, "nnoc_uplink_connected") == 1 and value(agent, "nnoc_uplink_reconnects_total") == 0
    assert value(agent, "nnoc_source_frames_read_total") == N_FRAMES
    assert value(agent, "nnoc_updates_applied_total") is not None and value(agent, "nnoc_bundle_version") == 1
    assert value(service, "nnoc_fleet_version", fleet="default") == 1
    assert value(service, "nnoc_collector_stored_total") == rejects

    # Prometheus' conventions: counters end in _total (and only counters), a histogram has its buckets
    exported = agent | service
    for name, family in exported.items():
        samples = set(family["samples"])
        if family["type"] == "counter":
            assert samples <= {f"{name}_total", f"{name}_created"}, (name, samples)
        else:
            assert not any(s.endswith("_total") for s in samples), (name, family["type"], samples)
    assert exported["nnoc_request_seconds"]["type"] == "histogram"

    # the reference lists exactly what is exported, each with its type
    assert documented() == {name: family["type"] for name, family in exported.items()}

    # every metric a query or an alert names is exported (a histogram's or counter's sample names count; a
    # labelled family with no series yet, e.g. refusals per reason, still has its names)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    sample_names = {name + sfx for name, family in exported.items() for sfx in suffixes.get(family["type"], ("",))}
    for where, names in queried().items():
        assert names, where
        assert names <= sample_names, (where, sorted(names - sample_names))


def test_the_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on both units, their ExecStart pointed at this checkout's commands."""
    venv_bin = Path(sys.executable).parent
    for unit in sorted((ROOT / "ops" / "systemd").glob("*.service")):
        text = unit.read_text().replace("/opt/nnoculation-edge/.venv/bin", str(venv_bin))
        (tmp_path / unit.name).write_text(text)
        proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / unit.name)],
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0 and not proc.stderr.strip(), (unit.name, proc.stderr)


def test_the_operator_guides_spec_files_are_valid_specs(tmp_path: Path) -> None:
    """The guide's serve.toml and agent.toml, read as the commands read them: every key known, every value converted
    by its flag's own type, the pairs complete (TLS cert and key, CURVE secret and allow-list)."""
    import argparse

    from edge_agent.app import RunConfig
    from edge_agent.cli import build_parser as edge_parser
    from edge_agent.options import config_values, flag_defaults, from_args
    from trainer.cli import _subparser, config_defaults
    from trainer.cli import build_parser as trainer_parser
    from trainer.service.serve import ServeConfig, check_serve

    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    blocks = {m.group(1): m.group(0) for m in re.finditer(r"# /etc/nnoculation/(\w+)\.toml.*?(?=```)", guide, re.S)}
    assert set(blocks) == {"serve", "agent"}
    for name in blocks:
        (tmp_path / f"{name}.toml").write_text(blocks[name])
    serve = _subparser(trainer_parser(only="serve"), "serve")
    serve.set_defaults(**config_defaults(serve, tmp_path / "serve.toml", ServeConfig))
    cfg = from_args(ServeConfig, serve.parse_args([]))
    check_serve(cfg)
    assert cfg.metrics_port == 9108 and cfg.service.operators == ("operator",) and cfg.policy.min_quarantine == 200
    run = _subparser(edge_parser(), "run")
    assert isinstance(run, argparse.ArgumentParser)
    run.set_defaults(**flag_defaults(run, config_values(tmp_path / "agent.toml", RunConfig), "agent.toml"))
    agent = from_args(RunConfig, run.parse_args([]))
    assert agent.device_id == "cam-1" and agent.fleet == "cams" and agent.metrics_port == 9109


def test_the_dashboard_is_what_grafanas_schema_models_read_back() -> None:
    """The committed dashboard, read by the schema-generated models of grafana-foundation-sdk and written again,
    is unchanged: no field Grafana's dashboard schema does not know, none missing. A field the schema lacks does not
    survive the round trip (the check can fail)."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    board = json.loads((ROOT / "ops" / "grafana" / "dashboards" / "nnoculation-edge.json").read_text())

    def again(data: dict[str, Any]) -> Any:
        return json.loads(json.dumps(Dashboard.from_json(data), cls=JSONEncoder))

    assert again(board) == board
    assert board["uid"] == "nnoculation-edge" and len(board["panels"]) >= 15
    assert again({**board, "colour": "red"}) != {**board, "colour": "red"}
