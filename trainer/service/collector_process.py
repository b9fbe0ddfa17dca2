"""The quarantine collector in a process of its own, with its own memory and descriptor limits, restarted when it
dies.

Why a process: ZeroMQ bounds a frame (``ZMQ_MAXMSGSIZE``), not a message. A ROUTER buffers every frame of a
multipart message until its last one arrives, and holds every TCP connection a peer opens; neither has a limit in
libzmq, and both live inside libzmq where no receive loop sees them. A sender that streams unfinished frames, or
holds thousands of connections, grows the process that hosts the ROUTER. Here that process is the collector alone:
its address space (``--collector-memory``) and descriptors (``--collector-files``) are capped, so the model service,
its health check and the store watcher in ``serve`` keep their memory and descriptors; when a flood reaches a cap,
the collector dies and is started again on the same port, which drops every connection and frame the flood held.
Durability is unchanged: a message is acknowledged only after its durable write, and an agent resends what was not
acknowledged.

The child reports its port once and its counters every ``report_interval`` seconds, as JSON lines over a pipe (no
pickle crosses back); :attr:`CollectorProcess.counters` is the latest report plus the counts of earlier lives.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import resource
import threading
import time
from dataclasses import fields
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from trainer.service.collector import Collector, CollectorConfig, CollectorCounters, spec_source

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 10.0  # seconds between restarts at most, when the collector keeps dying


def _child(
    conn: Connection, cfg: CollectorConfig, store_root: str, registry_path: str | None, limits: dict[str, Any]
) -> None:
    """The collector's own process: limits first, then the ROUTER loop, reporting to the parent."""
    import zmq

    from trainer.science.sandbox import vm_size
    from trainer.service.registry import Registry
    from trainer.service.store import ModelStore

    if limits.get("memory_bytes"):  # beyond what the imports took: the collector's own buffers and stores
        resource.setrlimit(resource.RLIMIT_AS, (vm_size() + int(limits["memory_bytes"]),) * 2)
    if limits.get("files"):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        want = int(limits["files"]) if hard == resource.RLIM_INFINITY else min(int(limits["files"]), hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    logging.basicConfig(
        level=limits.get("log_level", logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    context = zmq.Context()
    registry = Registry(Path(registry_path)) if registry_path else None
    store = ModelStore(Path(store_root), create=False)
    try:
        collector = Collector(cfg, spec_source(store), registry, context).start()
    except (OSError, ValueError) as e:
        conn.send_bytes(json.dumps({"error": str(e)}).encode())
        return
    conn.send_bytes(json.dumps({"port": collector.port}).encode())
    interval = float(limits.get("report_interval", 0.5))
    try:
        while collector.alive:  # a report every interval, and one at once when the parent asks (a /metrics scrape)
            if conn.poll(interval) and conn.recv_bytes(64) != b"report":
                break  # "stop", or the parent closed its end (EOFError)
            conn.send_bytes(json.dumps(_report(collector)).encode())
        else:  # the ROUTER loop died (a MemoryError at the cap): end this life, the parent starts another
            conn.send_bytes(json.dumps(_report(collector)).encode())
            os._exit(3)
    except (EOFError, OSError):
        pass
    finally:
        collector.stop()
        with contextlib.suppress(OSError, ValueError):
            conn.send_bytes(json.dumps(_report(collector)).encode())
        context.term()


def _report(collector: Collector) -> dict[str, Any]:
    c = collector.counters
    counts = {f.name: getattr(c, f.name) for f in fields(CollectorCounters) if f.name != "by_reason"}
    counts["by_reason"] = dict(c.by_reason)
    return {"counters": counts, "open_stores": collector.open_stores}


class CollectorProcess:
    """:class:`~trainer.service.collector.Collector` run in a child process under limits, restarted when it dies.
    Same surface as the collector for ``serve``: ``start()``, ``stop()``, ``port``, ``counters``, ``open_stores``,
    and ``restarts`` (lives after the first)."""

    def __init__(
        self,
        cfg: CollectorConfig,
        store_root: Path,
        registry_path: Path | None,
        memory_bytes: int = 2 << 30,
        files: int = 8192,
        report_interval: float = 0.5,
    ) -> None:
        self.cfg, self.store_root, self.registry_path = cfg, store_root, registry_path
        self.limits = {
            "memory_bytes": memory_bytes,
            "files": files,
            "report_interval": report_interval,
            "log_level": logging.getLogger().getEffectiveLevel(),
        }
        self.port = 0
        self.restarts = 0
        self.open_stores = 0
        self._earlier = CollectorCounters()  # counts of the lives that ended
        self._latest = CollectorCounters()  # the living child's latest report
        self._lock = threading.Lock()
        self._reports = threading.Condition(self._lock)
        self._seq = 0  # reports read so far (a refresh waits for the next one)
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Connection | None = None
        self._thread = threading.Thread(target=self._supervise, name="collector-supervisor", daemon=True)

    @property
    def counters(self) -> CollectorCounters:
        """What every life of the collector did (the living one as of its latest report)."""
        with self._lock:
            out = CollectorCounters()
            for f in fields(CollectorCounters):
                a, b = getattr(self._earlier, f.name), getattr(self._latest, f.name)
                if f.name == "by_reason":
                    merged = dict(a)
                    for k, v in b.items():
                        merged[k] = merged.get(k, 0) + v
                    out.by_reason.update(merged)
                elif f.name in ("bytes_used", "budget_full"):
                    setattr(out, f.name, b)
                else:
                    setattr(out, f.name, a + b)
            return out

    def _spawn(self) -> None:
        """Start a child and wait for its port; OSError when it cannot bind (the first start reports it)."""
        cfg = self.cfg
        if self.port:  # a restart binds the port the agents know
            cfg = CollectorConfig(**{**cfg.__dict__, "endpoint": f"{cfg.endpoint.rsplit(':', 1)[0]}:{self.port}"})
        receive, send = self._ctx.Pipe(duplex=True)
        registry = str(self.registry_path) if self.registry_path is not None else None
        proc = self._ctx.Process(
            target=_child, args=(send, cfg, str(self.store_root), registry, self.limits), name="collector", daemon=True
        )
        proc.start()
        send.close()
        deadline = time.monotonic() + 60
        first: dict[str, Any] = {}
        while (time.monotonic() < deadline and proc.is_alive()) or receive.poll(0):
            if receive.poll(0.2):
                try:
                    first = json.loads(receive.recv_bytes())
                except (EOFError, OSError, ValueError):
                    break
                break
        if "port" not in first:
            proc.kill()
            proc.join(5)
            receive.close()
            raise OSError(first.get("error") or f"the collector process did not start (exit code {proc.exitcode})")
        self.port = int(first["port"])
        self._proc, self._conn = proc, receive

    def start(self) -> CollectorProcess:
        """Start the child (bound and listening when this returns) and its supervisor."""
        self._spawn()
        self._thread.start()
        return self

    def _read(self) -> bool:
        """Take the child's reports; False when it has gone."""
        assert self._conn is not None
        try:
            while self._conn.poll(0.2):
                report = json.loads(self._conn.recv_bytes(1 << 20))
                counts = report.get("counters", {})
                latest = CollectorCounters(**{k: v for k, v in counts.items() if k != "by_reason"})
                latest.by_reason.update(counts.get("by_reason", {}))
                with self._lock:
                    self._latest = latest
                    self.open_stores = int(report.get("open_stores", 0))
                    self._seq += 1
                    self._reports.notify_all()
        except (EOFError, OSError, ValueError, TypeError):
            return False
        return bool(self._proc is not None and self._proc.is_alive())

    def refresh(self, timeout: float = 1.0) -> None:
        """Ask the child for a report now and wait for it (at most ``timeout``): counters as of this moment."""
        with self._lock:
            seen = self._seq
        with self._send_lock, contextlib.suppress(OSError, AttributeError):
            assert self._conn is not None
            self._conn.send_bytes(b"report")
        with self._reports:
            self._reports.wait_for(lambda: self._seq > seen, timeout)

    def _supervise(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            if self._read():
                backoff = 0.5
                continue
            if self._stop.is_set():
                break
            code = self._proc.exitcode if self._proc is not None else None
            log.error(
                "the collector process died (exit code %s; a flood at its memory or descriptor limit?); restarting it "
                "on port %d in %.1f s",
                code,
                self.port,
                backoff,
            )
            with self._lock:
                _add(self._earlier, self._latest)
                self._latest = CollectorCounters()
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
            try:
                self._spawn()
                self.restarts += 1
            except OSError as e:
                log.error("collector restart failed: %s", e)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the supervisor and the child (its stores closed, a last report read)."""
        self._stop.set()
        self._thread.join(timeout)
        if self._conn is not None:
            with self._send_lock, contextlib.suppress(OSError):
                self._conn.send_bytes(b"stop")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._proc is not None and self._proc.is_alive():
                self._read()
            self._read()
            self._conn.close()
        if self._proc is not None:
            self._proc.join(1)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)


def _add(into: CollectorCounters, more: CollectorCounters) -> None:
    for f in fields(CollectorCounters):
        if f.name == "by_reason":
            for k, v in more.by_reason.items():
                into.by_reason[k] += v
        elif f.name not in ("bytes_used", "budget_full"):
            setattr(into, f.name, getattr(into, f.name) + getattr(more, f.name))
