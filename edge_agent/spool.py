"""The local quarantine spool: every rejected input is written here, durably, before the reply goes out.

One SQLite file in WAL mode with ``synchronous=FULL``: a row that :meth:`Spool.put` returned survives kill -9
and power loss. Rows leave only when the collector acknowledged them (:meth:`Spool.ack`). The spool is
bounded in rows and bytes; at the bound the policy is explicit (``drop-oldest`` keeps the newest evidence,
``reject-new`` keeps the oldest), and every dropped row is counted (persisted) and logged.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

POLICIES = ("drop-oldest", "reject-new")
# What an acknowledged put survives: "power" (synchronous=FULL: an fsync per transaction, survives power loss)
# or "process" (synchronous=NORMAL in WAL mode: survives the process being killed, -9 included, and restarts;
# the last transactions may be lost if the machine itself loses power).
DURABILITY = {"power": "FULL", "process": "NORMAL"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    header BLOB NOT NULL,
    tensor BLOB NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_sent REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SpoolConfig:
    """Where the spool lives and how big it may grow."""

    path: Path
    max_items: int = 100_000
    max_bytes: int = 512 << 20
    policy: str = "drop-oldest"
    durability: str = "power"

    def __post_init__(self) -> None:
        if self.durability not in DURABILITY:
            raise ValueError(f"unknown spool durability {self.durability!r}; choose one of: {', '.join(DURABILITY)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown spool policy {self.policy!r}; choose one of: {', '.join(POLICIES)}")
        if self.max_items < 1 or self.max_bytes < 1:
            raise ValueError("spool bounds must be positive")


@dataclass(frozen=True)
class SpooledItem:
    """One spooled input: its sequence number (the uplink's message id), header bytes and tensor bytes."""

    seq: int
    header: bytes
    tensor: bytes
    attempts: int


class SpoolFull(RuntimeError):
    """The spool is at its bound and the policy is ``reject-new``."""


class Spool:
    """Thread-safe durable FIFO of quarantined inputs."""

    def __init__(self, cfg: SpoolConfig) -> None:
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
        """The uplink's writes (sent marks, deletions after an ACK) need no fsync: if power loss undoes them, the
        rows are sent again and the collector, which keys on (device, seq), stores them once. Only puts pay for
        durability."""
        self._db.execute("PRAGMA synchronous=OFF")
        try:
            yield
        finally:
            self._db.execute(f"PRAGMA synchronous={DURABILITY[self.cfg.durability]}")

    def due(self, limit: int, resend_after: float) -> list[SpooledItem]:
        """Up to ``limit`` rows never sent or sent more than ``resend_after`` seconds ago; marks them sent."""
        now = time.time()
        with self._lock, self._bookkeeping():
            rows = self._db.execute(
                "SELECT seq, header, tensor, attempts FROM spool WHERE last_sent <= ? ORDER BY seq LIMIT ?",
                (now - resend_after, limit),
            ).fetchall()
            if rows:
                self._db.executemany(
                    "UPDATE spool SET last_sent = ?, attempts = attempts + 1 WHERE seq = ?",
                    [(now, r[0]) for r in rows],
                )
        return [SpooledItem(int(r[0]), bytes(r[1]), bytes(r[2]), int(r[3]) + 1) for r in rows]

    def ack(self, seqs: list[int]) -> int:
        """Delete acknowledged rows; returns how many were still present."""
        if not seqs:
            return 0
        with self._lock, self._bookkeeping():
            self._db.execute("BEGIN IMMEDIATE")
            freed = []
            for seq in seqs:
                freed += self._db.execute("DELETE FROM spool WHERE seq = ? RETURNING size", (seq,)).fetchall()
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
