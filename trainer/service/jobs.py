"""Repair policy and jobs: when a fleet's quarantine is large enough, or an agent's windowed reject rate
exceeds a threshold (paper §4.3, §7), repair in a worker process and publish what passes the gate.

The job runs ``nnoc-trainer repair`` as a separate OS process (the collector and model service keep
answering while it trains), on the bundle that is current and the quarantine collected while it served. A
repaired bundle is added to the store as the next version and published; the model service's subscriptions
then push it to the fleet. Job states: queued, running, published, gate-rejected, failed (with the reason).
A version whose job did not publish gets another try once its quarantine has doubled.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.options import flag, fraction, load_toml, merge_tables, nonnegative_float, positive, positive_float
from trainer.card import ModelCard
from trainer.errors import EXIT_GATE
from trainer.service.backends import BACKENDS, JobBackend, LocalBackend, RayBackend
from trainer.service.collector import quarantine_dir, quarantine_size
from trainer.service.registry import ACTIVE_STATES, Job, Registry
from trainer.service.rollout import RolloutError, release
from trainer.service.store import ModelStore, StoreError
from trainer.stages.profiles import REPAIR_PROFILES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobPolicy:
    """When a repair starts, and how it runs."""

    min_quarantine: int = flag(200, "quarantine size that starts a repair", type=positive)
    reject_threshold: float = flag(0.05, "agent reject rate that starts a repair", type=fraction)
    # A rate-started repair reads agents' reports (unauthenticated without CURVE): it still needs this much real
    # quarantine, so that a few junk messages and one forged rate cannot start a repair.
    min_for_rate: int = flag(100, "quarantine needed for a rate-started repair", type=positive)
    max_rounds: int | None = flag(5, "repairs published per fleet at most; raise it on purpose", type=positive)
    enabled: bool = flag(True, "collect and serve, never start a repair", name="--no-jobs")
    repair_profile: str = flag("quick", "repair profile of the jobs", choices=sorted(REPAIR_PROFILES))
    repair_spec: Path | None = flag(
        None, "a repair spec (TOML, as 'nnoc-trainer repair --spec' reads) that every repair job starts from; the "
        "fleet's card and the job's own values (bundle, quarantine, version) go over it", type=Path,
    )  # fmt: skip
    # The data the jobs of fleets without a model card read (serve's --data or --dataset), as a repair spec's
    # tables ([data], [split], [harness]); written into each job's job.toml.
    repair_config: dict[str, Any] = field(default_factory=dict)
    poll_interval: float = 1.0
    jobs_backend: str = flag("local", "where repair jobs run: a child process (local) or a Ray task", choices=BACKENDS)
    ray_address: str = flag(
        "auto", "--jobs-backend ray: the cluster (auto: the local 'ray start' one; ray://HOST:PORT; local: start one)"
    )
    job_cpus: float = flag(1.0, "--jobs-backend ray: CPUs each repair job asks for", type=positive_float)
    job_gpus: float = flag(0.0, "--jobs-backend ray: GPUs each repair job asks for", type=nonnegative_float)
    job_start_timeout: float = flag(
        600.0, "seconds a repair job may wait for its resources before it fails (Ray)", type=positive_float
    )


@dataclass
class _Running:
    job: Job
    handle: Any  # the backend's
    out_dir: Path
    log_path: Path
    state: str = "queued"
    cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)
    timed_out: bool = False


def make_backend(policy: JobPolicy) -> JobBackend:
    """The backend ``policy`` names (ValueError, one line, when Ray is missing or unreachable)."""
    if policy.jobs_backend == "ray":
        return RayBackend(policy.ray_address, policy.job_cpus, policy.job_gpus)
    return LocalBackend()


class JobRunner:
    """Watches quarantine sizes and agents' reject rates; runs one repair at a time in a child process."""

    def __init__(
        self,
        store: ModelStore,
        registry: Registry,
        quarantine_root: Path,
        jobs_root: Path,
        policy: JobPolicy,
        backend: JobBackend | None = None,
    ) -> None:
        self.store, self.registry, self.policy = store, registry, policy
        self.quarantine_root, self.jobs_root = quarantine_root, jobs_root
        self._running: _Running | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-runner", daemon=True)
        self.backend: JobBackend = backend or LocalBackend()
        self._connected = backend is not None

    def start(self) -> JobRunner:
        """Connect the backend unless given one (ValueError when it cannot be), mark jobs a previous process left
        behind as failed, then start watching."""
        if self.policy.enabled and not self._connected:
            self.backend = make_backend(self.policy)
        interrupted = self.registry.fail_interrupted()
        if interrupted:
            log.warning("%d repair jobs were interrupted by the last shutdown: marked failed", interrupted)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching; a running repair is terminated and its job marked failed."""
        self._stop.set()
        self._thread.join(timeout)
        run = self._running
        if run is not None:
            self.backend.cancel(run.handle)
            self.registry.update_job(run.job.id, "failed", "stopped: the service shut down while it ran")
            self._running = None
        self.backend.close()

    def _run(self) -> None:
        while not self._stop.wait(self.policy.poll_interval):
            try:
                if self._running is not None:
                    self._reap()
                if self._running is None and self.policy.enabled:
                    for fleet in self.store.fleets():
                        reason = self.due(fleet)
                        if reason:
                            self._launch(fleet, reason)
                            break
            except Exception:  # one bad fleet or store read must not stop the runner
                log.exception("job runner pass failed")

    def fleet_policy(self, fleet: str) -> tuple[int, float, str, dict[str, Any]]:
        """The fleet's own repair settings: quarantine size and reject rate that start a repair, the profile and the
        data its repair reads, from the fleet's model card where it says, else serve's."""
        card = ModelCard.from_dict(self.store.state(fleet).card or {}, f"fleet {fleet}'s card")
        min_quarantine = int(card.get("repair", "min_quarantine", self.policy.min_quarantine))
        threshold = float(card.get("repair", "reject_threshold", self.policy.reject_threshold))
        profile = str(card.get("repair", "profile", self.policy.repair_profile))
        data = card.repair_config()
        return min_quarantine, threshold, profile, data or self.policy.repair_config

    def due(self, fleet: str) -> str:
        """Why a repair of ``fleet`` should start now ("" when it should not)."""
        state = self.store.state(fleet)
        if state.current is None:
            return ""
        jobs = self.registry.jobs(fleet)
        if any(j.state in ACTIVE_STATES for j in jobs):
            return ""
        if self.policy.max_rounds is not None and sum(j.state == "published" for j in jobs) >= self.policy.max_rounds:
            return ""
        size = quarantine_size(self.quarantine_root, fleet, state.current)
        tried = [j for j in jobs if j.from_version == state.current]
        if tried and size < 2 * max(tried[-1].quarantine, 1):  # tried, not published: wait for twice as much
            return ""
        min_quarantine, threshold, _, _ = self.fleet_policy(fleet)
        if size >= min_quarantine:
            return f"quarantine {size} >= {min_quarantine}"
        if size >= self.policy.min_for_rate:
            rates = [
                d["window_reject_rate"]
                for d in self.registry.devices(fleet)
                if d["bundle_version"] == state.current and d["window_size"] > 0
            ]
            if rates and max(rates) > threshold:
                return f"reject rate {max(rates):.3f} > {threshold} with {size} quarantined"
        return ""

    def repair_spec(self, fleet: str, version: int, out_dir: Path) -> dict[str, Any]:
        """The spec of a repair of ``fleet`` v``version`` into ``out_dir`` (a ``RepairSpec``'s TOML form): serve's
        ``--repair-spec`` file, under the fleet's data (its card's photos, else serve's data flags), under the job's
        own (the bundle, quarantine and version, the profile). ValueError when none of them names any data."""
        _, _, profile, data = self.fleet_policy(fleet)
        base = load_toml(self.policy.repair_spec) if self.policy.repair_spec is not None else {}
        if not data and not any(key in base for key in ("data", "harness")):
            raise ValueError(
                f"fleet {fleet!r} has no model card and serve was given no data: its repair would have no clean "
                f"photos; give it one ('nnoc-trainer fleet card {fleet} --card CARD') or start serve with --data DIR"
            )
        # the repair job that made this version: what it unlearned is unlearned again (and what it kept of earlier
        # rounds), so that this round does not undo that one
        made = [
            Path(j.out_dir) / "run"
            for j in self.registry.jobs(fleet)
            if j.state == "published" and j.version == version and j.out_dir
        ]
        earlier = [str(d) for d in made[-1:] if (d / "report.json").is_file()]
        own = {
            "bundle": str(self.store.version_dir(fleet, version) / "bundle"),
            "quarantine": str(quarantine_dir(self.quarantine_root, fleet, version)),
            "out": str(out_dir / "run"),
            "version": self.store.next_version(fleet),
            "profile": profile,
            **({"unlearn_earlier": earlier} if earlier else {}),
        }
        return merge_tables(merge_tables(base, data), own)

    def repair_command(self, fleet: str, version: int, out_dir: Path) -> list[str]:
        """The command line of a repair of ``fleet`` v``version`` into ``out_dir``: ``repair --spec`` of the job's
        spec, written to ``out_dir/job.toml`` (:meth:`repair_spec`)."""
        import tomli_w

        spec = out_dir / "job.toml"
        header = f"# repair of {fleet} v{version}, written by the service's job runner (nnoc-trainer repair --spec)\n"
        spec.write_text(header + tomli_w.dumps(self.repair_spec(fleet, version, out_dir)))
        # --quiet: no bars in a log file; INFO lines (an epoch each) show the job's progress.
        return [sys.executable, "-m", "trainer", "repair", "--spec", str(spec), "--quiet", "--log-level", "INFO",
                "--json"]  # fmt: skip

    def _launch(self, fleet: str, reason: str) -> None:
        state = self.store.state(fleet)
        assert state.current is not None
        size = quarantine_size(self.quarantine_root, fleet, state.current)
        job = self.registry.add_job(fleet, state.current, reason, size)
        out_dir = self.jobs_root / job.id
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            cmd = self.repair_command(fleet, state.current, out_dir)
        except ValueError as e:  # no data to repair with (or a card the record holds that is unusable): said, kept
            self.registry.update_job(job.id, "failed", str(e), out_dir=str(out_dir))
            log.error("repair job %s for %s v%d not started: %s", job.id, fleet, state.current, e)
            return
        log_path = out_dir / "repair.log"
        log.info("repair job %s for %s v%d started (%s)", job.id, fleet, state.current, reason)
        handle = self.backend.start(job.id, cmd, log_path)
        self.registry.update_job(job.id, "queued", f"{self.backend.name}: {' '.join(cmd[3:6])}", out_dir=str(out_dir))
        self._running = _Running(job, handle, out_dir, log_path)

    def _reap(self) -> None:
        run = self._running
        assert run is not None
        if not run.cancelled and self.registry.job(run.job.id).cancel:
            log.warning("repair job %s: cancelled by the operator", run.job.id)
            run.cancelled = True
            self.backend.cancel(run.handle)
        state = self.backend.state(run.handle)
        if isinstance(state, str):
            if state != run.state:
                run.state = state
                self.registry.update_job(run.job.id, state, f"{self.backend.name}: {state}")
            waited = time.monotonic() - run.queued_at
            if state == "queued" and not run.timed_out and waited > self.policy.job_start_timeout:
                log.error("repair job %s: not started after %.0f s; cancelling it", run.job.id, waited)
                run.timed_out = True
                self.backend.cancel(run.handle)
            return
        self._running = None
        if run.cancelled or run.timed_out:  # whatever it had written stays in its job folder; the store never saw it
            why = "cancelled by the operator" if run.cancelled else (
                f"not started within {self.policy.job_start_timeout:g} s: no node of the {self.backend.name} "
                f"cluster offered {self.policy.job_cpus:g} CPUs and {self.policy.job_gpus:g} GPUs "
                "(--job-cpus, --job-gpus, --job-start-timeout)"
            )  # fmt: skip
            self.registry.update_job(run.job.id, "failed", why)
            return
        code = state.code
        if code is None:
            self.registry.update_job(run.job.id, "failed", state.reason)
            log.error("repair job %s failed: %s", run.job.id, state.reason)
            return
        tail = run.log_path.read_text(errors="replace")[-4000:] if run.log_path.is_file() else ""
        report_path = run.out_dir / "run" / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        if code == 0:
            try:
                version = self.store.add(run.job.fleet, run.out_dir / "run", by=f"job {run.job.id}")
                # through the fleet's default rollout policy when it has one, else at once
                rollout = release(
                    self.store, self.registry, run.job.fleet, version, by=f"job {run.job.id}", note=run.job.reason
                )
            except (StoreError, RolloutError) as e:
                self.registry.update_job(run.job.id, "failed", f"could not publish: {e}")
                log.error("repair job %s: could not publish: %s", run.job.id, e)
                return
            gate = report.get("gate", {})
            if rollout is not None:
                gate = {**gate, "rollout": rollout["id"]}
            self.registry.update_job(run.job.id, "published", json.dumps(gate)[:1000], version=version)
            how = f"through rollout {rollout['id']}" if rollout is not None else "to the whole fleet"
            log.info("repair job %s published %s v%d %s", run.job.id, run.job.fleet, version, how)
        elif code == EXIT_GATE:
            detail = json.dumps(report.get("gate", {}))[:1000] or tail[-500:]
            self.registry.update_job(run.job.id, "gate-rejected", detail)
            log.warning("repair job %s: the gate refused the repaired model: %s", run.job.id, detail)
        else:
            lines = [ln for ln in tail.splitlines() if ln.strip()]
            self.registry.update_job(run.job.id, "failed", f"exit {code}: " + " / ".join(lines[-3:])[:1000])
            log.error("repair job %s failed (exit %d); log: %s", run.job.id, code, run.log_path)
