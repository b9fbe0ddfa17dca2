"""The local quarantine spool: every rejected input is written here, durably.

One SQLite file in WAL mode: a row that :meth:`Spool.put` returned survives kill -9, and power loss under
``synchronous=FULL``. Rows leave only when the collector acknowledged them (:meth:`Spool.ack`). The spool is
bounded in rows and bytes; at the bound the policy is explicit (``drop-oldest`` keeps the newest evidence,
``reject-new`` keeps the oldest), and every dropped row is counted (persisted) and logged.

:class:`SpoolWriter` is the request path's door to it: group commit (one writer thread stores what every caller
handed it since its last transaction in one transaction, one fsync), and with durability ``deferred`` the reply
does not wait for the disk at all (the writer commits at least every ``flush_interval`` seconds).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_agent.options import flag, positive, positive_float

log = logging.getLogger(__name__)

POLICIES = ("drop-oldest", "reject-new")
# What a rejected input survives once its reply has gone out, and the SQLite setting behind it:
# "power": the reply waits for the fsync (synchronous=FULL): survives power loss;
# "process": the reply waits for the commit (synchronous=NORMAL in WAL mode): survives the process being killed,
#   -9 included, and restarts; the last transactions may be lost if the machine itself loses power;
# "deferred": the reply does not wait; the writer commits (synchronous=FULL) within flush_interval seconds, so a
#   crash or power loss loses at most the rejects of that last interval.
DURABILITY = {"power": "FULL", "process": "NORMAL", "deferred": "FULL"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    header BLOB NOT NULL,
    tensor BLOB NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SpoolConfig:
    """Where the spool lives and how big it may grow. The agent's spec holds it as its ``[spool]`` part (flags
    ``--spool-FIELD``); its path is the agent's state folder's."""

    path: Path | None = None
    max_items: int = flag(100_000, "quarantined inputs the spool keeps at most", type=positive)
    max_bytes: int = flag(512 << 20, "spool bound in bytes", type=positive)
    policy: str = flag("drop-oldest", "at the spool bound", choices=POLICIES)
    durability: str = flag(
        "deferred",
        "what a reject survives once answered: deferred (default: committed within --spool-flush-interval, "
        "the reply does not wait), process (the reply waits for the commit: survives kill -9), power (the reply "
        "waits for the fsync: survives power loss)",
        choices=tuple(DURABILITY),
    )  # fmt: skip
    flush_interval: float = flag(
        0.05, "durability deferred: seconds a reject waits at most before its commit", type=positive_float
    )

    def __post_init__(self) -> None:
        if self.durability not in DURABILITY:
            raise ValueError(f"unknown spool durability {self.durability!r}; choose one of: {', '.join(DURABILITY)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown spool policy {self.policy!r}; choose one of: {', '.join(POLICIES)}")
        if self.max_items < 1 or self.max_bytes < 1:
            raise ValueError("spool bounds must be positive")
        if not self.flush_interval > 0:
            raise ValueError(f"the spool's flush interval must be positive (got {self.flush_interval})")


@dataclass(frozen=True)
class SpooledItem:
    """One spooled input: its sequence number (the uplink's message id), header bytes and tensor bytes."""

    seq: int
    header: bytes
    tensor: bytes


class SpoolFull(RuntimeError):
    """The spool is at its bound and the policy is ``reject-new``."""


def _chunks(seqs: list[int], size: int = 500) -> Iterator[list[int]]:
    """``seqs`` in parts small enough for one statement's parameters."""
    for start in range(0, len(seqs), size):
        yield seqs[start : start + size]


class Spool:
    """Thread-safe durable FIFO of quarantined inputs."""

    def __init__(self, cfg: SpoolConfig) -> None:
        if cfg.path is None:
            raise ValueError("the spool needs a path (SpoolConfig.path)")
        self.cfg = cfg
        cfg.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.disk_full = 0  # inputs not spooled because the disk was full (in memory: the disk cannot take it)
        self._db = sqlite3.connect(cfg.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={DURABILITY[cfg.durability]}")
        self._db.executescript(_SCHEMA)
        # Sequence numbers identify messages at the collector as (device_id, seq). A new spool file starts
        # them at the current time in microseconds, so a lost or reset spool never reuses an old number.
        if self._db.execute("SELECT COUNT(*) FROM sqlite_sequence WHERE name = 'spool'").fetchone()[0] == 0:
            self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('spool', ?)", (time.time_ns() // 1000,))
        # Rows and bytes held, counted once here and then kept in step with every insert and delete: a
        # COUNT(*) per request would scan the whole table and make each put slower the fuller the spool.
        n, used = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool").fetchone()
        self._n, self._bytes = int(n), int(used)

    def close(self) -> None:
        """Close the database (rows stay on disk)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bump(self, name: str, by: int) -> None:
        self._db.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def counter(self, name: str) -> int:
        """A persisted counter: ``dropped``, ``rejected_full``, ``spooled``, ``acked``."""
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def put(self, header: bytes, tensor: bytes) -> int:
        """Store one input durably; returns its sequence number."""
        return self.put_many([(header, tensor)])[0]

    def put_many(self, items: list[tuple[bytes, bytes]]) -> list[int]:
        """Store inputs durably in one transaction (one fsync); returns their sequence numbers.

        The bound policy applies per input: ``drop-oldest`` makes room, ``reject-new`` raises
        :class:`SpoolFull` before anything of this batch is stored.
        """
        sizes = [len(h) + len(t) for h, t in items]
        if any(size > self.cfg.max_bytes for size in sizes):
            raise SpoolFull(f"an input of {max(sizes)} bytes exceeds the spool's {self.cfg.max_bytes}-byte bound")
        seqs: list[int] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n, used = self._n, self._bytes
                if self.cfg.policy == "reject-new" and (
                    n + len(items) > self.cfg.max_items or used + sum(sizes) > self.cfg.max_bytes
                ):
                    self._bump("rejected_full", len(items))
                    self._db.execute("COMMIT")
                    log.warning(
                        "spool full (%d rows, %d bytes): %d input(s) not spooled (policy reject-new)",
                        n,
                        used,
                        len(items),
                    )
                    raise SpoolFull(f"spool full ({n} rows, {used} bytes) and policy is reject-new")
                now = time.time()
                for (header, tensor), size in zip(items, sizes, strict=True):
                    if n + 1 > self.cfg.max_items or used + size > self.cfg.max_bytes:
                        n, used, dropped = self._drop_oldest(n, used, size)
                        log.warning("spool full: dropped the %d oldest input(s) (policy drop-oldest)", dropped)
                    cur = self._db.execute(
                        "INSERT INTO spool (header, tensor, size, created) VALUES (?, ?, ?, ?)",
                        (header, tensor, size, now),
                    )
                    assert cur.lastrowid is not None
                    seqs.append(int(cur.lastrowid))
                    n, used = n + 1, used + size
                self._bump("spooled", len(items))
                self._db.execute("COMMIT")
                self._n, self._bytes = n, used
            except SpoolFull:
                raise
            except sqlite3.OperationalError as e:
                self._rollback()
                if "full" not in str(e) and "I/O" not in str(e):
                    raise
                self.disk_full += len(items)
                log.error(
                    "spool disk full (%s): %d input(s) not spooled; free space or lower --spool-max-bytes",
                    e,
                    len(items),
                )
                raise SpoolFull(f"disk full: {e}") from e
            except BaseException:
                self._rollback()
                raise
        return seqs

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.OperationalError):  # the failed statement may have ended it already
            self._db.execute("ROLLBACK")

    def _drop_oldest(self, n: int, used: int, size: int) -> tuple[int, int, int]:
        dropped = 0
        while n > 0 and (n + 1 > self.cfg.max_items or used + size > self.cfg.max_bytes):
            for seq, row_size in self._db.execute("SELECT seq, size FROM spool ORDER BY seq LIMIT 32").fetchall():
                if n + 1 <= self.cfg.max_items and used + size <= self.cfg.max_bytes:
                    break
                self._db.execute("DELETE FROM spool WHERE seq = ?", (seq,))
                n, used, dropped = n - 1, used - row_size, dropped + 1
        self._bump("dropped", dropped)
        return n, used, dropped

    @contextlib.contextmanager
    def _bookkeeping(self) -> Iterator[None]:
        """The uplink's deletions after an ACK need no fsync: if power loss undoes them, the rows are sent again and
        the collector, which keys on (device, seq), stores them once. Only puts pay for durability."""
        self._db.execute("PRAGMA synchronous=OFF")
        try:
            yield
        finally:
            self._db.execute(f"PRAGMA synchronous={DURABILITY[self.cfg.durability]}")

    def after(self, seq: int, limit: int) -> list[SpooledItem]:
        """Up to ``limit`` rows with a sequence number above ``seq``, oldest first (reads only: what was sent and
        when is the uplink's to remember, so that sending costs the spool no writes)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, header, tensor FROM spool WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
            ).fetchall()
        return [SpooledItem(int(r[0]), bytes(r[1]), bytes(r[2])) for r in rows]

    def get(self, seqs: list[int]) -> list[SpooledItem]:
        """The rows of ``seqs`` still held, oldest first (acknowledged and dropped ones are gone)."""
        rows = []
        with self._lock:
            for part in _chunks(seqs):
                rows += self._db.execute(
                    f"SELECT seq, header, tensor FROM spool WHERE seq IN ({','.join('?' * len(part))})", part
                ).fetchall()
        return sorted((SpooledItem(int(r[0]), bytes(r[1]), bytes(r[2])) for r in rows), key=lambda item: item.seq)

    def ack(self, seqs: list[int]) -> int:
        """Delete acknowledged rows; returns how many were still present."""
        if not seqs:
            return 0
        with self._lock, self._bookkeeping():
            self._db.execute("BEGIN IMMEDIATE")
            freed = []
            for part in _chunks(seqs):
                freed += self._db.execute(
                    f"DELETE FROM spool WHERE seq IN ({','.join('?' * len(part))}) RETURNING size", part
                ).fetchall()
            self._bump("acked", len(freed))
            self._db.execute("COMMIT")
            self._n -= len(freed)
            self._bytes -= sum(int(r[0]) for r in freed)
        return len(freed)

    def depth(self) -> int:
        """Rows waiting for an acknowledgement."""
        with self._lock:
            return self._n

    def bytes_used(self) -> int:
        """Bytes of header and tensor data waiting."""
        with self._lock:
            return self._bytes


Items = list[tuple[bytes, bytes]]


class _Job:
    __slots__ = ("build", "done")

    def __init__(self, build: Callable[[], Items], wait: bool) -> None:
        self.build, self.done = build, threading.Event() if wait else None


class SpoolWriter:
    """Group commit in front of a :class:`Spool`: one thread stores the inputs of every caller in one transaction.

    ``submit`` hands over a function that builds the spool rows (header and image bytes), so the serialisation
    runs on the writer's thread too. Under durability ``power`` and ``process`` it returns once the rows are
    committed: callers that arrive while a commit runs (the batcher, endpoint requests) share the next
    transaction and its fsync. Under ``deferred`` it returns at once; the writer commits what gathered at least
    every ``flush_interval`` seconds. ``stored`` is called after each commit (the uplink's wake-up). A full spool
    or disk refuses the quarantine copy only: counted in :attr:`unspooled`, logged, serving goes on.
    """

    def __init__(self, spool: Spool, stored: Callable[[], None] | None = None, max_pending: int = 4096) -> None:
        self.spool, self._stored = spool, stored
        self.wait = spool.cfg.durability != "deferred"
        self.unspooled = 0  # rejected inputs not quarantined (the spool's reject-new bound, a full disk, an error)
        self.commits = 0
        self._closing = threading.Event()  # cuts a deferred writer's gathering wait short
        self._q: queue.Queue[_Job | None] = queue.Queue(max_pending)  # full: submit blocks (the disk is behind)
        self._thread = threading.Thread(target=self._loop, name="spool-writer", daemon=True)
        self._thread.start()

    def submit(self, build: Callable[[], Items]) -> None:
        """Store the rows ``build`` returns; waits for their commit unless durability is ``deferred``."""
        job = _Job(build, self.wait)
        self._q.put(job)
        if job.done is not None:
            job.done.wait()

    def flush(self) -> None:
        """Return once everything submitted so far is committed (or counted as not spooled)."""
        job = _Job(list, wait=True)
        self._q.put(job)
        assert job.done is not None
        job.done.wait()

    def close(self) -> None:
        """Commit what is pending and stop the thread."""
        if self._thread.is_alive():
            self._closing.set()
            self._q.put(None)
            self._thread.join()

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            jobs = [self._q.get()]
            if not self.wait:  # gather: one transaction per interval at most
                self._closing.wait(self.spool.cfg.flush_interval)
            while True:
                try:
                    jobs.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stopping = None in jobs
            self._commit([j for j in jobs if j is not None])

    def _commit(self, jobs: list[_Job]) -> None:
        items: Items = []
        for job in jobs:
            try:
                items += job.build()
            except Exception:  # a bug in building rows must not stop the writer: count, log, go on
                self.unspooled += 1
                log.exception("a quarantined input could not be serialised; it is not spooled")
        try:
            if items:
                self.spool.put_many(items)
                self.commits += 1
        except SpoolFull as e:
            # The inputs were still refused (label -1); only their quarantine copy is lost, counted by the spool
            # (rejected_full, disk_full) and here, and logged. Serving goes on.
            self.unspooled += len(items)
            log.warning("%d rejected input(s) not quarantined: %s", len(items), e)
        except Exception:
            self.unspooled += len(items)
            log.exception("%d rejected input(s) not quarantined: the spool failed", len(items))
        finally:
            for job in jobs:
                if job.done is not None:
                    job.done.set()
        if items and self._stored is not None:
            self._stored()
