"""The trainer service's own state: what each agent last reported, and the repair jobs (SQLite, WAL).

Written by the collector (agents' stats messages), the model service (subscriptions) and the job runner;
read by ``nnoc-trainer fleet status`` and the service's FleetStatus RPC. One file, shared by threads of one
process and readable by other processes while the service runs.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protos.nnoc.v1 import quarantine_pb2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    fleet TEXT NOT NULL,
    bundle_version INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    rejects INTEGER NOT NULL DEFAULT 0,
    window_reject_rate REAL NOT NULL DEFAULT 0,
    window_size INTEGER NOT NULL DEFAULT 0,
    spool_depth INTEGER NOT NULL DEFAULT 0,
    spool_dropped INTEGER NOT NULL DEFAULT 0,
    provider TEXT NOT NULL DEFAULT '',
    last_seen REAL NOT NULL,
    subscribed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    fleet TEXT NOT NULL,
    from_version INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    version INTEGER NOT NULL DEFAULT 0,
    out_dir TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    quarantine INTEGER NOT NULL DEFAULT 0,
    cancel INTEGER NOT NULL DEFAULT 0
);
-- What each device's traffic did under each version: requests, rejects and errors added up over its stretches
-- of serving that version (an agent restarts its counters when it starts serving a version again); `seen_*` are
-- the last counters it reported, to add the next report's growth.
CREATE TABLE IF NOT EXISTS device_versions (
    device_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    rejects INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    seen_requests INTEGER NOT NULL DEFAULT 0,
    seen_rejects INTEGER NOT NULL DEFAULT 0,
    seen_errors INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (device_id, version)
);
"""

JOB_STATES = ("queued", "running", "published", "gate-rejected", "failed")
ACTIVE_STATES = ("queued", "running")


@dataclass(frozen=True)
class Job:
    """One repair job as stored."""

    id: str
    fleet: str
    from_version: int
    state: str
    reason: str
    detail: str
    version: int
    out_dir: str
    created_at: float
    updated_at: float
    quarantine: int  # quarantine size of the version when the job started
    cancel: int = 0  # an operator asked to cancel it (the runner stops it at its next pass)


class Registry:
    """Devices and jobs in ``path`` (SQLite)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "cancel" not in columns:  # a registry from before cancellable jobs
            self._db.execute("ALTER TABLE jobs ADD COLUMN cancel INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    # -- devices -------------------------------------------------------------------------------------------

    def record_stats(self, stats: quarantine_pb2.AgentStats) -> None:
        """Store an agent's stats message (the newest one wins) and add its version's traffic to the tally."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._record_stats(stats, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _record_stats(self, stats: quarantine_pb2.AgentStats, now: float) -> None:
        if stats.bundle_version:
            seen = (stats.version_requests, stats.version_rejects, stats.version_errors)
            row = self._db.execute(
                "SELECT seen_requests, seen_rejects, seen_errors FROM device_versions WHERE device_id=? AND version=?",
                (stats.device_id, stats.bundle_version),
            ).fetchone()
            # growth since the last report; counters that went down started a new stretch (a restart, a swap back)
            grew = seen if row is None or seen[0] < row[0] else tuple(a - b for a, b in zip(seen, row, strict=True))
            self._db.execute(
                "INSERT INTO device_versions (device_id, version, requests, rejects, errors, seen_requests, "
                "seen_rejects, seen_errors, first_seen, last_seen) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(device_id, version) DO UPDATE SET requests=requests+?, rejects=rejects+?, "
                "errors=errors+?, seen_requests=excluded.seen_requests, seen_rejects=excluded.seen_rejects, "
                "seen_errors=excluded.seen_errors, last_seen=excluded.last_seen",
                (stats.device_id, stats.bundle_version, *grew, *seen, now, now, *grew),
            )
        self._db.execute(
            "INSERT INTO devices (device_id, fleet, bundle_version, requests, rejects, window_reject_rate, "
            "window_size, spool_depth, spool_dropped, provider, last_seen) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(device_id) DO UPDATE SET fleet=excluded.fleet, bundle_version=excluded.bundle_version, "
            "requests=excluded.requests, rejects=excluded.rejects, window_reject_rate=excluded.window_reject_rate,"
            " window_size=excluded.window_size, spool_depth=excluded.spool_depth, "
            "spool_dropped=excluded.spool_dropped, provider=excluded.provider, last_seen=excluded.last_seen",
            (
                stats.device_id,
                stats.fleet,
                stats.bundle_version,
                stats.requests,
                stats.rejects,
                stats.window_reject_rate,
                stats.window_size,
                stats.spool_depth,
                stats.spool_dropped,
                stats.provider,
                now,
            ),
        )

    def expire(self, max_age: float) -> int:
        """Remove the devices that are not subscribed and sent nothing for ``max_age`` seconds (with their traffic
        tallies); returns how many."""
        cutoff = time.time() - max_age
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "DELETE FROM device_versions WHERE device_id IN "
                    "(SELECT device_id FROM devices WHERE subscribed = 0 AND last_seen < ?)",
                    (cutoff,),
                )
                gone = self._db.execute("DELETE FROM devices WHERE subscribed = 0 AND last_seen < ?", (cutoff,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(gone.rowcount)

    def record_subscription(self, device_id: str, fleet: str, version: int, subscribed: bool) -> None:
        """An agent opened (or closed) its Subscribe stream, serving ``version``."""
        with self._lock:
            self._db.execute(
                "INSERT INTO devices (device_id, fleet, bundle_version, last_seen, subscribed) VALUES (?,?,?,?,?) "
                "ON CONFLICT(device_id) DO UPDATE SET fleet=excluded.fleet, last_seen=excluded.last_seen, "
                "subscribed=excluded.subscribed, bundle_version="
                "CASE excluded.bundle_version WHEN 0 THEN bundle_version ELSE excluded.bundle_version END",
                (device_id, fleet, version, time.time(), int(subscribed)),
            )

    def devices(self, fleet: str | None = None) -> list[dict[str, Any]]:
        """Every known device (of one fleet), as dicts of the columns."""
        with self._lock:
            cur = self._db.execute(
                "SELECT * FROM devices" + (" WHERE fleet = ?" if fleet else "") + " ORDER BY device_id",
                (fleet,) if fleet else (),
            )
            names = [c[0] for c in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def traffic(self, device_ids: list[str], versions: tuple[int, ...]) -> dict[tuple[str, int], tuple[int, int, int]]:
        """(device, version) -> (requests, rejects, errors) each device's agent reported under each version."""
        if not device_ids or not versions:
            return {}
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, version, requests, rejects, errors FROM device_versions WHERE version IN ("
                + ",".join("?" * len(versions))
                + ")",
                versions,
            ).fetchall()
        wanted = set(device_ids)
        return {(d, v): (r, j, e) for d, v, r, j, e in rows if d in wanted}

    # -- jobs ----------------------------------------------------------------------------------------------

    def add_job(self, fleet: str, from_version: int, reason: str, quarantine: int = 0) -> Job:
        """A new queued job."""
        now = time.time()
        job_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + uuid.uuid4().hex[:6]
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, fleet, from_version, state, reason, created_at, updated_at, quarantine) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (job_id, fleet, from_version, "queued", reason, now, now, quarantine),
            )
        return self.job(job_id)

    def update_job(self, job_id: str, state: str, detail: str = "", version: int = 0, out_dir: str = "") -> Job:
        """Move a job to ``state`` (one of :data:`JOB_STATES`)."""
        if state not in JOB_STATES:
            raise ValueError(f"unknown job state {state!r}")
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state=?, detail=?, version=?, out_dir=COALESCE(NULLIF(?, ''), out_dir), "
                "updated_at=? WHERE id=?",
                (state, detail, version, out_dir, time.time(), job_id),
            )
        return self.job(job_id)

    def job(self, job_id: str) -> Job:
        """One job by id."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return Job(*row)

    def jobs(self, fleet: str | None = None) -> list[Job]:
        """Jobs (of one fleet), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs" + (" WHERE fleet = ?" if fleet else "") + " ORDER BY created_at",
                (fleet,) if fleet else (),
            ).fetchall()
        return [Job(*r) for r in rows]

    def request_cancel(self, job_id: str) -> Job:
        """Ask the runner to cancel a queued or running job; KeyError for an unknown job, ValueError for one that
        has ended."""
        job = self.job(job_id)
        if job.state not in ACTIVE_STATES:
            raise ValueError(f"job {job_id} is {job.state} already; only queued or running jobs can be cancelled")
        with self._lock:
            self._db.execute("UPDATE jobs SET cancel=1, updated_at=? WHERE id=?", (time.time(), job_id))
        return self.job(job_id)

    def fail_interrupted(self) -> int:
        """At start-up: jobs left queued/running by a previous process are marked failed; returns how many."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET state='failed', detail='interrupted: the service stopped while it ran', "
                "updated_at=? WHERE state IN ('queued', 'running')",
                (time.time(),),
            )
            return int(cur.rowcount)
