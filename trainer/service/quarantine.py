"""The on-disk quarantine: one SQLite file (WAL mode) per fleet and bundle version.

Written by ``nnoc-trainer stream`` (the offline twin of the edge loop) and by the trainer's ZeroMQ collector;
read by ``nnoc-trainer repair --quarantine``. Each row is one rejected input: its
:class:`~protos.nnoc.v1.quarantine_pb2.QuarantineHeader` and the raw tensor bytes. ``(device_id, seq)`` is the
primary key, so a resent message is stored once (at-least-once delivery, exactly-once storage).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.formats.errors import QuarantineError
from edge_agent.formats.preprocess import Preprocess
from edge_agent.formats.spec import image_shape_of, preprocess_of
from edge_agent.formats.wire import MAX_LABEL, check_message
from protos.nnoc.v1 import bundle_pb2, quarantine_pb2

log = logging.getLogger(__name__)

STORE_NAME = "quarantine.sqlite"
Row = tuple[Any, ...]  # one row of the quarantine table, in its column order
INSERT_CHUNK = 2048  # rows per INSERT statement at most (and SQLite's bound on its variables)
_ROW_PLACEHOLDER = "(" + ",".join("?" * 12) + ")"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    fleet TEXT NOT NULL,
    bundle_version INTEGER NOT NULL,
    shape TEXT NOT NULL,
    dtype TEXT NOT NULL,
    primary_label INTEGER NOT NULL,
    monitor_label INTEGER NOT NULL,
    captured_at REAL NOT NULL,
    received_at REAL NOT NULL,
    header BLOB NOT NULL,
    tensor BLOB NOT NULL,
    PRIMARY KEY (device_id, seq)
);
"""


@dataclass(frozen=True)
class Quarantine:
    """A quarantine loaded for repair: inputs as uint8 pixels and the labels the two models gave."""

    images: np.ndarray  # (N, C, H, W) uint8
    primary: np.ndarray  # (N,) int64, θ_bd's label
    monitor: np.ndarray  # (N,) int64, θ_aug's label
    keys: list[tuple[str, int]]  # (device_id, seq) per row

    def __len__(self) -> int:
        return len(self.primary)


class QuarantineStore:
    """A SQLite quarantine file. Use as a context manager; one writer at a time (SQLite's own locking)."""

    def __init__(self, path: Path, create: bool = True, checkpoints: bool = True) -> None:
        """``checkpoints=False``: this connection never copies the WAL back into the file itself; the caller runs
        :func:`checkpoint` from another thread (the collector does, so its writes do not wait for the copy)."""
        if path.is_dir() or path.suffix != ".sqlite":
            path = path / STORE_NAME
        if not create and not path.is_file():
            raise QuarantineError(f"no quarantine at {path}; pass the folder written by 'nnoc-trainer stream'")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        # A row holds an image or tensor of ~1-10 KB: 16 KiB pages write them with a quarter of the page splits of
        # the 4 KiB default (measured: 8.2 -> 6.7 us per 28x28 row). Takes effect on a new file only.
        self.db.execute("PRAGMA page_size=16384")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # an ACK promises the row survives a crash
        self.db.execute("PRAGMA journal_size_limit=67108864")  # a WAL emptied by a checkpoint shrinks to 64 MiB
        if not checkpoints:
            self.db.execute("PRAGMA wal_autocheckpoint=0")
        self.db.executescript(_SCHEMA)
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        version = int(self.meta("schema_version") or SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise QuarantineError(f"{path}: schema version {version} is newer than this tool knows")

    def __enter__(self) -> QuarantineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    def meta(self, key: str) -> str | None:
        """A metadata value (input spec, fleet ...), or None."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def describe(self, fleet: str, version: int, spec: bundle_pb2.InputSpec) -> None:
        """Record whose quarantine this is and the input it holds (the bundle's input spec, its image shape and
        preprocessing), for readers that have no bundle at hand."""
        described = {
            "shape": [int(d) for d in spec.shape],
            "dtype": spec.dtype,
            "image_shape": list(image_shape_of(spec)),
            "preprocess": preprocess_of(spec).to_dict(),
        }
        self.set_meta(fleet=fleet, bundle_version=str(version), input_spec=json.dumps(described))

    def set_meta(self, **values: str) -> None:
        """Set metadata values."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))

    def add_many(self, messages: Iterable[tuple[quarantine_pb2.QuarantineHeader, bytes]], checked: bool = False) -> int:
        """Store messages in one transaction; returns how many were new (duplicates are ignored).

        ``checked``: the caller has run :func:`check_message` on each already.
        """
        return self.insert_rows(self.rows(messages, checked))

    @staticmethod
    def rows(messages: Iterable[tuple[quarantine_pb2.QuarantineHeader, bytes]], checked: bool = False) -> list[Row]:
        """The table rows of messages (for :meth:`insert_rows`)."""
        now = time.time()
        rows = []
        shapes: dict[tuple[int, ...], str] = {}
        for header, tensor in messages:
            if not checked:
                check_message(header, tensor)
            shape = tuple(header.shape)
            if shape not in shapes:
                shapes[shape] = json.dumps(list(shape))
            rows.append(
                (
                    header.device_id,
                    header.seq,
                    header.fleet,
                    header.bundle_version,
                    shapes[shape],
                    header.dtype,
                    header.primary_label,
                    header.monitor_label,
                    header.captured_at.ToNanoseconds() / 1e9 if header.HasField("captured_at") else now,
                    now,
                    header.SerializeToString(),
                    tensor,
                )
            )
        return rows

    def insert_rows(self, rows: list[Row]) -> int:
        """Insert rows in one transaction (duplicates ignored); returns how many were new. Multi-row INSERT
        statements of up to INSERT_CHUNK rows: faster than ``executemany`` (6.1 -> 5.1 us per 28x28 row)."""
        if not rows:
            return 0
        per = max(1, min(INSERT_CHUNK, self.db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(rows[0])))
        before = self.db.total_changes
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for i in range(0, len(rows), per):
                part = rows[i : i + per]
                values = ",".join([_ROW_PLACEHOLDER] * len(part))
                self.db.execute(f"INSERT OR IGNORE INTO quarantine VALUES {values}", [v for row in part for v in row])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return self.db.total_changes - before

    def checkpoint(self) -> None:
        """Copy committed WAL frames into the file without blocking writers or readers (``PASSIVE``); SQLite
        releases the GIL meanwhile. Use a connection of its own (:meth:`checkpointer`) from another thread."""
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    @classmethod
    def checkpointer(cls, path: Path) -> QuarantineStore:
        """A second connection to an existing store, for :meth:`checkpoint` from another thread."""
        store = cls.__new__(cls)
        store.path = path
        store.db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        return store

    def device_counts(self) -> dict[str, int]:
        """Stored inputs per device."""
        rows = self.db.execute("SELECT device_id, COUNT(*) FROM quarantine GROUP BY device_id").fetchall()
        return {str(d): int(n) for d, n in rows}

    def count(self) -> int:
        """Number of stored inputs."""
        return int(self.db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0])

    def entries(self) -> list[dict[str, Any]]:
        """What each stored input's header says, in :meth:`load`'s order: device, seq, source, position, capture
        and arrival times, both labels (for operators: ``nnoc-trainer quarantine show/export``)."""
        rows = self.db.execute(
            "SELECT header, captured_at, received_at FROM quarantine ORDER BY received_at, device_id, seq"
        ).fetchall()
        out = []
        for blob, captured_at, received_at in rows:
            h = quarantine_pb2.QuarantineHeader.FromString(blob)
            out.append(
                {
                    "device_id": h.device_id,
                    "seq": int(h.seq),
                    "source_id": h.source_id,
                    "position": int(h.position) if h.HasField("position") else None,
                    "captured_at": float(captured_at),
                    "received_at": float(received_at),
                    "bundle_version": int(h.bundle_version),
                    "primary_label": int(h.primary_label),
                    "monitor_label": int(h.monitor_label),
                }
            )
        return out

    def stored_preprocess(self) -> Preprocess:
        """The preprocessing block recorded with the quarantine (what turns older agents' tensors into images)."""
        text = self.meta("input_spec")
        block = json.loads(text).get("preprocess") if text else None
        return Preprocess.from_dict(block, f"{self.path}: input_spec.preprocess") if block else Preprocess()

    def load(self, preprocess: Preprocess, classes: int = MAX_LABEL) -> Quarantine:
        """The stored inputs whose two labels lie in [0, ``classes``), in arrival order, as the model's uint8 images.

        Agents send the model's image (uint8, C, H, W); a float model-input tensor (older agents, the model's own
        tensor format) is turned back into its image with ``preprocess``. Rows of both kinds may mix. A row whose
        label is out of range (stored before the collector checked labels) is left out and counted in the log:
        labels index counts and tensors in the repair.
        """
        bound = max(1, min(int(classes) or MAX_LABEL, MAX_LABEL))
        rows = self.db.execute(
            "SELECT device_id, seq, shape, dtype, primary_label, monitor_label, tensor FROM quarantine "
            "WHERE primary_label >= 0 AND primary_label < ? AND monitor_label >= 0 AND monitor_label < ? "
            "ORDER BY received_at, device_id, seq",
            (bound, bound),
        ).fetchall()
        skipped = self.count() - len(rows)
        if skipped:
            log.warning("%s: %d quarantined input(s) with labels outside [0, %d) left out", self.path, skipped, bound)
        if not rows:
            return Quarantine(np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64), [])
        groups: dict[tuple[str, str], list[int]] = {}  # (shape, dtype) -> row indices: one conversion per kind
        for k, r in enumerate(rows):
            groups.setdefault((r[2], r[3]), []).append(k)
        parts: dict[int, np.ndarray] = {}
        for (shape_json, dtype), ks in groups.items():
            shape = tuple(json.loads(shape_json))
            stacked = np.frombuffer(b"".join(rows[k][6] for k in ks), dtype=np.dtype(dtype)).reshape(len(ks), *shape)
            for k, image in zip(ks, preprocess.to_image(stacked), strict=True):
                parts[k] = image
        shapes = {parts[k].shape for k in parts}
        if len(shapes) > 1:
            raise QuarantineError(f"{self.path}: images of different shapes {sorted(shapes)}")
        images = np.stack([parts[k] for k in range(len(rows))])
        return Quarantine(
            images=images,
            primary=np.array([r[4] for r in rows], dtype=np.int64),
            monitor=np.array([r[5] for r in rows], dtype=np.int64),
            keys=[(str(r[0]), int(r[1])) for r in rows],
        )
