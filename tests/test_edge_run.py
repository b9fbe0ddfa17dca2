from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from conftest import ROOT, Collector, free_port, wait_for


def edge(*args: str, insecure: bool = True) -> tuple[int, dict[str, Any] | None, str]:
    if args[0] == "run" and insecure:
        args = ("run", "--insecure", *args[1:])
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", *args, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return proc.returncode, (json.loads(lines[-1]) if lines else None), proc.stderr


def test_nnoc_edge_run_serves_quarantines_reports_and_stops(
    predeployed: tuple[Path, dict[str, Any]], splits: Any, tmp_path: Path
) -> None:
    from trainer.stages.replay import write_frames

    collector = Collector(tmp_path / "q")
    state, metrics_port = tmp_path / "state", free_port()
    frames, _ = write_frames("fashion-mnist?split=test&n=200&poison=0.5&trigger=checker4&seed=3", tmp_path / "f.npy")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "run",
            "--insecure",
            "--device-id",
            "cam-7",
            "--fleet",
            "default",
            "--bundle",
            str(predeployed[0] / "bundle"),
            "--collector",
            f"tcp://127.0.0.1:{collector.port}",
            "--infer-port",
            "0",
            "--metrics-port",
            str(metrics_port),
            "--source",
            f"npy:{frames}",
            "--source-batch",
            "8",
            "--state-dir",
            str(state),
            "--quiet",
            "--json",
            "--stats-interval",
            "0.3",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: (state / "agent.json").is_file(), 60)

        def scrape() -> dict[str, float]:
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            return {ln.split()[0]: float(ln.split()[1]) for ln in body.splitlines() if ln.startswith("nnoc_")}

        assert wait_for(lambda: scrape().get("nnoc_inputs_total") == 200, 60)
        m = scrape()
        assert m["nnoc_bundle_version"] == 1 and m["nnoc_rejects_total"] > 0
        assert m["nnoc_uplink_connected"] == 1 and m["nnoc_uplink_reconnects_total"] == 0
        truth = json.loads(frames.with_suffix(".truth.json").read_text())
        assert len(truth["labels"]) == 200 and len(truth["poisoned"]) == 100  # test split: target 0 never poisoned
        assert wait_for(lambda: collector.received >= m["nnoc_rejects_total"] and scrape()["nnoc_spool_depth"] == 0, 30)
        assert wait_for(lambda: bool(collector.stats) and collector.stats[-1].requests == 200, 30)
        last = collector.stats[-1]
        assert (last.device_id, last.fleet, last.bundle_version) == ("cam-7", "default", 1)
        assert last.rejects == m["nnoc_rejects_total"] and last.provider
        code, st, _ = edge("status", "--state-dir", str(state))
        assert code == 0 and st is not None and st["current"] == 1 and st["running"]["device_id"] == "cam-7"
        assert st["spool_depth"] == 0
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-2000:]
        assert out.strip(), err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["requests"] == 200, out[-2000:]
        assert not (state / "agent.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        collector.close()
    code, _, stderr = edge("rollback", "--state-dir", str(state))
    assert code == 2 and "no previous bundle" in stderr
    code, _, stderr = edge("run", "--device-id", "x", "--fleet", "f", "--state-dir", str(tmp_path / "empty"))
    assert code == 2 and "no bundle to serve" in stderr
    code, _, stderr = edge("run", "--device-id", "x", "--fleet", "f", "--state-dir", str(state), insecure=False)
    assert code == 2 and "configure TLS or pass --insecure" in stderr
    bundle = str(predeployed[0] / "bundle")
    code, _, stderr = edge("run", "--device-id", "x", "--fleet", "f", "--bundle", bundle, "--state-dir", str(state))
    assert code == 2 and "for fleet 'default'" in stderr
    code, _, stderr = edge("run", "--device-id", "x", "--fleet", "f", "--state-dir", str(state))
    assert code == 2 and "belongs to fleet 'default'" in stderr
    for bad, why in (("replay:fashion-mnist", "unknown source"), ("npy:/missing.npy", "no such file")):
        code, _, stderr = edge(
            "run", "--device-id", "x", "--fleet", "default", "--source", bad, "--state-dir", str(state)
        )
        assert code == 2 and why in stderr, stderr[-500:]


def test_kill_9_loses_no_quarantined_input(
    predeployed: tuple[Path, dict[str, Any]], splits: Any, tmp_path: Path
) -> None:
    """kill -9 while the collector is unreachable; on restart the spool drains: every reject stored once."""
    from trainer.science.triggers import parse_trigger
    from trainer.service.quarantine import QuarantineStore

    images = splits.test.images[:100]
    np.save(tmp_path / "s.npy", parse_trigger("checker4").apply(images, np.random.default_rng(1)))
    port, state = free_port(), tmp_path / "state"
    common = [
        "-m",
        "edge_agent",
        "run",
        "--insecure",
        "--device-id",
        "cam-k",
        "--fleet",
        "default",
        "--infer-port",
        "0",
        "--collector",
        f"tcp://127.0.0.1:{port}",
        "--state-dir",
        str(state),
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, *common, "--bundle", str(predeployed[0] / "bundle"), "--source", f"npy:{tmp_path / 's.npy'}"],
        cwd=ROOT,
        env=env,
    )
    try:
        assert wait_for(lambda: (state / "agent.json").is_file(), 60)
        code, st, _ = edge("status", "--state-dir", str(state))
        assert wait_for(lambda: (edge("status", "--state-dir", str(state))[1] or {}).get("spool_depth", 0) > 0, 60)
        first.kill()  # SIGKILL: no clean shutdown
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    code, st, _ = edge("status", "--state-dir", str(state))
    assert code == 0 and st is not None
    spooled = st["spool_depth"]
    assert spooled > 0
    (state / "agent.json").unlink(missing_ok=True)  # left behind by the killed process
    collector = Collector(tmp_path / "q", port=port)
    second = subprocess.Popen([sys.executable, *common], cwd=ROOT, env=env)  # serves the cached bundle
    try:
        assert wait_for(lambda: collector.received >= spooled, 60)
        assert wait_for(lambda: (edge("status", "--state-dir", str(state))[1] or {}).get("spool_depth") == 0, 30)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
        collector.close()
    with QuarantineStore(tmp_path / "q", create=False) as store:
        assert store.count() == spooled


def test_a_clean_stop_commits_every_deferred_reject(
    predeployed: tuple[Path, dict[str, Any]], splits: Any, tmp_path: Path
) -> None:
    """Durability deferred (the default): the replies do not wait for the spool; SIGTERM commits what waits."""
    from trainer.science.triggers import parse_trigger

    images = splits.test.images[:100]
    np.save(tmp_path / "s.npy", parse_trigger("checker4").apply(images, np.random.default_rng(2)))
    state = tmp_path / "state"
    args = ["run", "--insecure", "--device-id", "cam-d", "--fleet", "default", "--infer-port", "0", "--quiet"]
    args += ["--bundle", str(predeployed[0] / "bundle"), "--source", f"npy:{tmp_path / 's.npy'}", "--json"]
    args += ["--collector", f"tcp://127.0.0.1:{free_port()}", "--state-dir", str(state)]  # nobody listens
    args += ["--spool-flush-interval", "600"]  # nothing is committed before the stop
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def classified() -> int:
            path = state / "sources.json"
            return json.loads(path.read_text())["sources"]["cam-1"]["classified"] if path.is_file() else 0

        assert wait_for(lambda: classified() == 100, 90)
        assert (edge("status", "--state-dir", str(state))[1] or {}).get("spool_depth") == 0  # still waiting
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["requests"] == 100 and result["rejects"] > 0
    assert result["spool_depth"] == result["rejects"]  # every reject committed on the way out
