"""Listening addresses and exclusive locks, checked the same way by the trainer's and the edge's servers.

Every listener binds exclusively: gRPC servers are created with :data:`GRPC_EXCLUSIVE` (no ``SO_REUSEPORT``, so a
second server on a taken port fails instead of sharing it), ZeroMQ and HTTP listeners refuse a taken port by
themselves. An address is checked before anything starts, so a typo is one line, not a half-started service.
A state folder is held by one process at a time through :class:`StateLock`.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

# gRPC server options: refuse a port another process listens on (gRPC turns SO_REUSEPORT on by default).
GRPC_EXCLUSIVE = [("grpc.so_reuseport", 0)]


class PortError(OSError):
    """An address that cannot be listened on; the message says which and why."""


def check_address(address: str, what: str, allow_any: bool = True) -> tuple[str, int]:
    """``HOST:PORT`` split and checked: PORT 1-65535 (0 = any free port, where ``allow_any``)."""
    host, sep, port_text = address.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    low = 0 if allow_any else 1
    if not sep or not host or not low <= port <= 65535:
        hint = " (0: any free port)" if allow_any else ""
        raise PortError(f"{what} {address!r}: expected HOST:PORT with PORT from {max(low, 1)} to 65535{hint}")
    return host, port


def check_port(port: int, what: str, allow_any: bool = True) -> int:
    """A port number from 1 to 65535 (0 = any free port, where ``allow_any``)."""
    check_address(f"host:{port}", what, allow_any)
    return port


class StateLock:
    """An exclusive ``flock`` on ``folder/name`` holding this process's PID; released by :meth:`release` or
    when the process dies (the kernel drops the lock, so a killed holder never blocks the next start)."""

    def __init__(self, folder: Path, name: str, what: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / name
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise PortError(
                f"{folder} is in use by {what} (pid {holder}); stop it or pass another state folder"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        """Give the folder up (the lock file stays; its content is stale until the next holder writes)."""
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
