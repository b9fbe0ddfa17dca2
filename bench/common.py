"""Helpers shared by the benchmarks: machine description, result files, running our CLI."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
        "commit": _commit(),
    }


def _commit() -> str:
    """The checkout's commit (a result cites the code that made it); '' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return ""
    return out.stdout.strip()


PRODUCT_COMMANDS = ("predeploy", "repair", "calibrate")  # they take the defender's --data or a named harness


def run_cli(*args: str) -> dict[str, Any]:
    """Run ``python -m trainer ARGS --json --quiet`` and return its JSON object (also on exit 3). The benches are
    the evaluation harness: a product command given no data is given Fashion-MNIST's paper splits by name."""
    named = any(a in ("--data", "--dataset", "--config") for a in args)
    harness = ["--dataset", "fashion-mnist"] if args and args[0] in PRODUCT_COMMANDS and not named else []
    cmd = [sys.executable, "-m", "trainer", *args, *harness, "--json", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} printed nothing (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["exit_code"] = proc.returncode
    return out


def save(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/NAME.json`` with the machine it ran on."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def wait(cond: Any, timeout: float, every: float = 0.05) -> bool:
    """Poll ``cond`` every ``every`` seconds until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return False


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _collector(root: str, fleet: str, spec: bytes, ports: Any, stop: Any) -> None:
    from protos.nnoc.v1 import bundle_pb2
    from trainer.service.collector import Collector, CollectorConfig, fixed_spec

    input_spec = bundle_pb2.InputSpec.FromString(spec)
    c = Collector(CollectorConfig("tcp://127.0.0.1:0", Path(root)), fixed_spec(fleet, input_spec)).start()
    ports.put(c.port)
    stop.wait()
    c.stop()


def start_collector(root: Path, fleet: str, spec: Any) -> tuple[Any, int, Any]:
    """The quarantine collector for ``fleet`` (a bundle's input spec) in its own process, as on the trainer (it
    must not share the measured process's GIL): (process, port, stop event; set it, then join the process)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ports: Any = ctx.Queue()
    stop = ctx.Event()
    proc = ctx.Process(target=_collector, args=(str(root), fleet, spec.SerializeToString(), ports, stop))
    proc.start()
    return proc, int(ports.get(timeout=60)), stop


def drain_agents(agents: Any, timeout: float = 60.0) -> int:
    """Close bench agents (their deferred spool commits), wait until the uplinks emptied the spools, stop them;
    returns how many inputs the collector acknowledged."""
    acked = 0
    for agent in agents:
        agent.close()
        deadline = time.monotonic() + timeout
        while agent.spool.depth() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agent.uplink is not None
        agent.uplink.stop()
        acked += agent.uplink.counters.acked
        agent.spool.close()
    return acked
