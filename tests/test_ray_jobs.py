"""Repair jobs on Ray (trainer/service/backends.py): a local Ray cluster started here (Ray Core, 2 CPUs, no
dashboard) runs real commands and a real repair; outcomes, failures with their reason, and cancels (queued or
running) reach the registry, and a cancelled job leaves nothing in the store."""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray  # the ray extra: make install puts it in

from conftest import run_cli, wait_for


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ray_backend_runs_fails_and_cancels(cluster: None, tmp_path: Path) -> None:
    from trainer.service.backends import Outcome, RayBackend

    backend = RayBackend(cpus=1)

    def finish(handle: Any, timeout: float = 60) -> Outcome:
        deadline = time.monotonic() + timeout
        while isinstance(state := backend.state(handle), str):
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        return state

    ok = backend.start("ok", [sys.executable, "-c", "print('repaired')"], tmp_path / "ok.log")
    assert finish(ok) == Outcome(0) and "repaired" in (tmp_path / "ok.log").read_text()
    bad = backend.start("bad", [sys.executable, "-c", "import sys; sys.exit('no quarantine')"], tmp_path / "bad.log")
    assert finish(bad) == Outcome(1) and "no quarantine" in (tmp_path / "bad.log").read_text()

    marker = tmp_path / "pid"
    code = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    sleeper = [sys.executable, "-c", code]
    running = backend.start("long", sleeper, tmp_path / "long.log")
    assert wait_for(lambda: marker.is_file() and marker.read_text() != "", 60)
    assert backend.state(running) == "running"
    pid = int(marker.read_text())
    backend.cancel(running)
    assert finish(running, 30) == Outcome(None, "cancelled")
    assert wait_for(lambda: not _alive(pid), 15)  # the command's process group was terminated with the task

    greedy = RayBackend(cpus=1, gpus=1)  # no node has a GPU: Ray holds the task back
    queued = greedy.start("gpu", [sys.executable, "-c", "pass"], tmp_path / "gpu.log")
    time.sleep(2.0)
    assert greedy.state(queued) == "queued" and not (tmp_path / "gpu.log").exists()
    greedy.cancel(queued)
    assert finish(queued, 30).code is None


def test_repair_jobs_on_ray_publish_fail_with_their_reason_and_cancel_cleanly(
    cluster: None, predeployed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    import tomli_w

    from conftest import SMALL_SPLIT
    from edge_agent.options import merge_tables
    from trainer.service.jobs import JobPolicy, JobRunner
    from trainer.service.registry import Registry
    from trainer.service.store import ModelStore

    store = ModelStore(tmp_path / "store")
    store.create("default")
    store.publish("default", store.add("default", predeployed[0]))
    qroot = tmp_path / "q"
    bundle = str(predeployed[0] / "bundle")
    run_cli("trainer", "stream", *SMALL_SPLIT, "--bundle", bundle, "--trigger", "checker4", "--target", "0",
            "--cpd", "0.2", "--n", "300", "--out", str(qroot / "default" / "1"), "--quiet")  # fmt: skip
    # the jobs' shared repair spec: the small split and tiny sizes
    tiny = {
        "harness": {"name": "fashion-mnist"},
        "split": {"valid": 1000, "stream": 500, "train": 8000, "test": 2000},
        "repair": {"clean_domain": 100, "epochs": 1, "max_ca_drop": 0.3, "min_quarantine": 5,
                   "gan": {"epochs": 2, "epochs_decay": 1, "width": 8, "blocks": 2}},
    }  # fmt: skip
    registry: Registry
    scenarios = itertools.count()

    def runner(gan: dict[str, int] | None = None, **settings: Any) -> JobRunner:
        """A runner with a registry of its own (a version whose job did not publish waits for twice the quarantine
        before it is tried again: each scenario starts afresh)."""
        nonlocal registry
        n = next(scenarios)
        registry = Registry(tmp_path / f"registry-{n}.sqlite")
        spec = tmp_path / f"repair-{n}.toml"
        spec.write_text(tomli_w.dumps(merge_tables(tiny, {"repair": {"gan": gan or {}}})))
        policy = JobPolicy(
            min_quarantine=5,
            jobs_backend="ray",
            repair_spec=spec,
            poll_interval=0.2,
            **settings,
        )
        return JobRunner(store, registry, qroot, tmp_path / "jobs", policy).start()

    def last_job(states: tuple[str, ...], timeout: float) -> Any:
        def done() -> bool:
            jobs = registry.jobs("default")
            return bool(jobs) and jobs[-1].state in states

        assert wait_for(done, timeout)
        return registry.jobs("default")[-1]

    # a job whose repair cannot run: failed, with the repair's own one-line reason
    r = runner({"width": 0})
    job = last_job(("failed",), 120)
    r.stop()
    assert job.detail.startswith("exit 2") and "gan-width" in job.detail and store.state("default").versions == [1]

    # a job no node can take (a GPU on a CPU-only cluster): queued, then failed after its start timeout
    r = runner(job_gpus=1.0, job_start_timeout=3.0)
    assert last_job(("queued",), 60)
    job = last_job(("failed",), 60)
    r.stop()
    assert "not started within 3 s" in job.detail and "1 GPUs" in job.detail

    # a cancelled job: stopped while it runs, no version added
    r = runner({"epochs": 200})
    running = last_job(("running",), 120)
    registry.request_cancel(running.id)
    job = last_job(("failed",), 60)
    r.stop()
    assert job.detail == "cancelled by the operator" and store.state("default").versions == [1]

    # a job that runs to the end: repaired, gated, added as v2 and published
    r = runner()
    job = last_job(("published", "gate-rejected", "failed"), 600)
    r.stop()
    assert job.state == "published", job.detail
    assert job.version == 2 and store.state("default").current == 2
    assert (tmp_path / "jobs" / job.id / "repair.log").is_file()
    registry.close()
