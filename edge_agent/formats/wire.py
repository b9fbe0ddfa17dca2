"""The quarantine wire header, the format agents send and the collector (and ``nnoc-trainer stream``) store.

On ZeroMQ a quarantine message is ``[QuarantineHeader, tensor bytes]`` (``protos/nnoc/v1/quarantine.proto``).
:func:`build_header` makes one (the agent and the offline stream both call it); :func:`check_header`,
:func:`tensor_layout` and :func:`check_message` validate one with overflow-safe arithmetic before anything uses
its numbers (the collector and the quarantine store both call them).
"""

from __future__ import annotations

import math

import numpy as np

from edge_agent.formats.errors import QuarantineError
from edge_agent.formats.names import is_name
from protos.nnoc.v1 import quarantine_pb2

# Why a quarantine message was refused (metrics labels: a fixed set, never text from the sender).
REASONS = (
    "malformed",  # frames or header that do not parse, fields out of range
    "identity",  # device id not the sender's (ZeroMQ identity or CURVE key)
    "unknown-fleet",
    "unknown-version",
    "layout",  # shape, dtype or size not the fleet's input
    "oversized",
    "values",  # NaN, infinities, values outside the spec's range
    "labels",  # a model's label outside the fleet's classes
)
INT63 = (1 << 63) - 1  # SQLite's INTEGER is a signed 64-bit number
MAX_LABEL = 1 << 16  # a label of a fleet whose manifest names no classes stays below this
MAX_DIMS = 8
DTYPES = ("float32", "float16", "float64", "uint8")  # what an input spec may declare


def build_header(
    device_id: str,
    fleet: str,
    bundle_version: int,
    shape: tuple[int, ...] | list[int],
    dtype: str,
    primary_label: int,
    monitor_label: int,
    seq: int = 0,
    source_id: str = "",
    captured_at: float | None = None,
    position: int | None = None,
    reject_score: float = 0.0,
) -> quarantine_pb2.QuarantineHeader:
    """A quarantine header for one rejected input of ``shape`` (no batch axis), stamped with ``captured_at``
    (seconds since the epoch; default now), and for a source's frame its id and position."""
    header = quarantine_pb2.QuarantineHeader(
        device_id=device_id,
        fleet=fleet,
        bundle_version=bundle_version,
        seq=seq,
        shape=[int(d) for d in shape],
        dtype=dtype,
        primary_label=int(primary_label),
        monitor_label=int(monitor_label),
        source_id=source_id,
        reject_score=float(reject_score),
    )
    if position is not None:
        header.position = int(position)
    if captured_at is None:
        header.captured_at.GetCurrentTime()
    else:
        header.captured_at.FromNanoseconds(int(captured_at * 1e9))
    return header


def check_header(header: quarantine_pb2.QuarantineHeader) -> None:
    """Fields that become SQLite integers or names: in range, before anything uses them."""
    if not is_name(header.device_id):
        raise QuarantineError(f"device_id {header.device_id[:80]!r} is not a valid device name")
    if not 1 <= header.bundle_version <= INT63:
        raise QuarantineError(f"bundle_version {header.bundle_version} is outside [1, 2**63-1]")
    if header.seq > INT63:
        raise QuarantineError(f"seq {header.seq} is above 2**63-1")
    if header.source_id and not is_name(header.source_id):
        raise QuarantineError(f"source_id {header.source_id[:80]!r} is not a valid source name")


def tensor_layout(header: quarantine_pb2.QuarantineHeader, max_bytes: int) -> tuple[np.dtype, tuple[int, ...], int]:
    """The header's dtype, shape and byte size, checked with Python integers (no wrap-around)."""
    if header.dtype not in DTYPES:
        raise QuarantineError(f"dtype {header.dtype[:40]!r} is not one of {list(DTYPES)}", "layout")
    dtype = np.dtype(header.dtype)
    shape = tuple(int(d) for d in header.shape)
    if not 1 <= len(shape) <= MAX_DIMS or any(d <= 0 for d in shape):
        raise QuarantineError(f"bad shape {list(shape)[: MAX_DIMS + 1]}", "layout")
    # math.prod on Python ints cannot overflow; stop early so a huge shape costs nothing.
    if any(d > max_bytes for d in shape) or math.prod(shape) * dtype.itemsize > max_bytes:
        raise QuarantineError(f"tensor of shape {list(shape)} exceeds the {max_bytes}-byte limit", "oversized")
    return dtype, shape, math.prod(shape) * dtype.itemsize


def check_message(header: quarantine_pb2.QuarantineHeader, tensor: bytes, max_bytes: int = 1 << 22) -> np.ndarray:
    """Validate a header and its tensor frame; return the tensor as an array of the declared shape."""
    check_header(header)
    dtype, shape, expected = tensor_layout(header, max_bytes)
    if len(tensor) != expected:
        raise QuarantineError(
            f"tensor frame has {len(tensor)} bytes, shape {list(shape)} {dtype} needs {expected}", "layout"
        )
    arr = np.frombuffer(tensor, dtype=dtype).reshape(shape)
    if dtype.kind == "f" and not np.isfinite(arr).all():
        raise QuarantineError("tensor holds NaN or infinite values", "values")
    return arr
