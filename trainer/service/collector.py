"""The quarantine collector: a ZeroMQ ROUTER that receives the agents' quarantine and stats messages.

Wire format (``protos/nnoc/v1/quarantine.proto``): a quarantine message is ``[QuarantineHeader, tensor]``,
a stats message ``[AgentStats]``; the ROUTER sees the sender's identity as an extra first frame. For each
quarantine message the collector checks the header and the tensor against the input spec of the fleet and
bundle version it names (a version must be in the model store), writes it durably into that version's store
(``<root>/<fleet>/<version>/quarantine.sqlite``, the format ``nnoc-trainer repair --quarantine`` reads), and
only then answers ACK. Messages arriving together are written in one transaction per version. A duplicate
``(device_id, seq)`` is acknowledged and not stored twice.

Every message stands alone: one that fails a check is answered REJECTED with the reason and the rest of its
batch is stored and acknowledged; a store that cannot write answers UNAVAILABLE for its messages only. What a
sender can make the collector hold is bounded: stores open at once (least recently used closed), a quota of
stored inputs per device and version and a byte budget for the whole quarantine (both answered OVER_QUOTA, a
status the agent keeps and resends after ``retry_after``), and a token bucket per device (THROTTLED). With
CURVE, each agent's public key is bound to one device id (its key file's name): a message or stats for any
other device id is REJECTED. Refusals are counted per reason and logged once per device and reason per
interval. Nothing a sender does can stop the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sqlite3
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zmq

from edge_agent.formats.curve import AllowList, CurveError, start_server_auth
from edge_agent.formats.errors import QuarantineError
from edge_agent.formats.names import is_name
from edge_agent.formats.spec import accepted_range, image_shape_of
from edge_agent.formats.wire import INT63, MAX_LABEL, check_header, tensor_layout
from edge_agent.options import flag, positive, positive_float
from protos.nnoc.v1 import bundle_pb2, quarantine_pb2
from trainer.service.quarantine import STORE_NAME, QuarantineStore, Row
from trainer.service.registry import Registry
from trainer.service.store import ModelStore, StoreError

log = logging.getLogger(__name__)

Reply = quarantine_pb2.QuarantineReply


class VersionSpec(NamedTuple):
    """What a stored (fleet, version) lets its quarantine hold: its input spec and its class count (0: the
    manifest names no classes; labels are then bounded by :data:`MAX_LABEL`)."""

    input_spec: bundle_pb2.InputSpec
    classes: int = 0


# (fleet, version) -> that version's spec; raises QuarantineError (reason unknown-fleet/unknown-version)
SpecSource = Callable[[str, int], VersionSpec]
Item = tuple[bytes, quarantine_pb2.QuarantineHeader, bytes]
Groups = list[tuple[str, int, bundle_pb2.InputSpec, list[Item]]]  # checked messages per (fleet, version, spec)
_NOBLOCK, _SNDMORE, _RCVMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.RCVMORE)
HANDSHAKE_MS = 5000  # see Collector._run
REPLY_HWM = 100_000  # replies queued per peer at most (see Collector._run)
ROW_OVERHEAD = 200  # bytes SQLite spends on a stored row beside its header and tensor (measured order)


@dataclass(frozen=True)
class CollectorConfig:
    """Where the collector listens, where it stores, and its limits."""

    endpoint: str = flag("tcp://127.0.0.1:5555", "ZeroMQ endpoint to bind (port 0: any)", name="--collector")
    root: Path = Path("quarantine")
    max_tensor_bytes: int = flag(1 << 20, "larger quarantine tensors are refused (oversized)", type=positive)
    rate: float = flag(2000.0, "quarantine messages/s per device", name="--rate-limit", type=positive_float)
    burst: float = flag(20000.0, "messages a quiet device may send at once", type=positive_float)
    batch: int = 2048  # messages taken off the socket per transaction, at most
    poll_ms: int = 50
    curve_secret: Path | None = flag(None, "collector's CURVE .key_secret file (encrypt, authenticate)", type=Path)
    curve_allow: Path | None = flag(None, "folder of the agents' CURVE .key files", type=Path)
    # quarantine stores (SQLite files) open at once; the least recently used closes
    max_open_stores: int = flag(16, "quarantine files open at once", type=positive)
    # stored inputs per device and fleet version (the paper repairs from N = 1000)
    device_quota: int = flag(20_000, "stored quarantine per device and version (OVER_QUOTA)", type=positive)
    budget_bytes: int = flag(
        4 << 30,
        "bytes the quarantine may take on disk (default 4 GiB); beyond it new quarantine waits (OVER_QUOTA)",
        name="--quarantine-budget",
        type=positive,
    )
    retry_after: float = 30.0  # seconds an OVER_QUOTA / UNAVAILABLE sender is asked to wait
    # A device known only from its reports (it never subscribed to the model service) leaves the registry after this
    # long without one: a sender cycling through identities cannot grow the registry for good.
    max_peer_connections: int = flag(
        256, "TCP connections one peer address may hold; more are closed at once", type=positive
    )
    device_ttl: float = flag(3600.0, "seconds a device that never subscribed stays listed after its last report",
                             type=positive_float)  # fmt: skip
    log_interval: float = 10.0  # a repeated refusal is logged once per device and reason per interval

    def __post_init__(self) -> None:
        for name in ("max_tensor_bytes", "batch", "max_open_stores", "device_quota", "budget_bytes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"collector {name.replace('_', '-')} must be at least 1")
        if not (self.rate > 0 and self.burst >= 1):
            raise ValueError("collector rate must be above 0 and burst at least 1")


@dataclass
class CollectorCounters:
    """What the collector did since it started (``by_reason``: refusals per reason, see quarantine.REASONS)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    throttled: int = 0
    over_quota: int = 0
    unavailable: int = 0
    stats: int = 0
    malformed_frames: int = 0
    auth_denied: int = 0
    internal_errors: int = 0
    connections_refused: int = 0  # connections shut down over the per-peer limit
    bytes_used: int = 0  # the quarantine's size on disk, estimated between scans
    budget_full: bool = False
    by_reason: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def max_frame_bytes(max_tensor_bytes: int) -> int:
    """The largest frame the collector's socket takes (``ZMQ_MAXMSGSIZE``): twice the tensor limit and room for a
    header, so that a tensor somewhat over the limit is answered REJECTED, and anything far over disconnects."""
    return 2 * max_tensor_bytes + (64 << 10)


def quarantine_dir(root: Path, fleet: str, version: int) -> Path:
    """Folder of the quarantine collected for one fleet while ``version`` served."""
    return root / fleet / str(int(version))


def quarantine_size(root: Path, fleet: str, version: int) -> int:
    """Stored inputs in one fleet/version quarantine (0 when there is none yet)."""
    path = quarantine_dir(root, fleet, version) / STORE_NAME
    if not path.is_file():
        return 0
    with QuarantineStore(path, create=False) as store:
        return store.count()


def disk_usage(root: Path) -> int:
    """Bytes of the files under ``root`` (0 when it does not exist)."""
    if not root.is_dir():
        return 0
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def fixed_spec(
    fleet: str, spec: bundle_pb2.InputSpec, versions: tuple[int, ...] = (1,), classes: int = 10
) -> SpecSource:
    """A :data:`SpecSource` for one fleet and its versions (benchmarks and tests without a model store)."""

    def spec_for(name: str, version: int) -> VersionSpec:
        if name != fleet:
            raise QuarantineError(f"unknown fleet {name!r}", "unknown-fleet")
        if version not in versions:
            raise QuarantineError(f"fleet {name!r} has no version {version}", "unknown-version")
        return VersionSpec(spec, classes)

    return spec_for


def spec_source(store: ModelStore) -> SpecSource:
    """The input spec and class count of a stored (fleet, version), from its manifest; QuarantineError when there
    is none."""

    def spec_for(fleet: str, version: int) -> VersionSpec:
        if fleet not in store.fleets():
            raise QuarantineError(f"unknown fleet {fleet!r}", "unknown-fleet")
        try:
            manifest = store.manifest(fleet, version)
            return VersionSpec(manifest.input_spec, len(manifest.class_names))
        except StoreError as e:
            raise QuarantineError(f"fleet {fleet!r} has no version {version} in the store", "unknown-version") from e

    return spec_for


class _PeerLimit:
    """At most ``limit`` TCP connections from one peer address (a ZeroMQ socket monitor reports each accepted and
    closed connection with its descriptor): a connection over the limit is shut down at once (``shutdown`` on a
    duplicate of its descriptor: libzmq sees the peer go and closes it itself), so one host cannot take the
    collector's descriptors from the others. libzmq itself has no such limit."""

    EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED

    def __init__(self, sock: zmq.Socket, limit: int, warn: _OnceEvery, counters: CollectorCounters) -> None:
        self.limit, self.warn, self.counters = limit, warn, counters
        self.monitor = sock.get_monitor_socket(self.EVENTS)
        self._sock = sock
        self._peer_of: dict[int, str] = {}  # descriptor -> peer address, for the connections open now
        self._count: dict[str, int] = defaultdict(int)

    def take_events(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._accepted(fd)
            else:  # disconnected or closed: the descriptor is no longer that connection
                peer = self._peer_of.pop(fd, None)
                if peer is not None:
                    self._count[peer] -= 1
                    if self._count[peer] <= 0:
                        del self._count[peer]

    def _accepted(self, fd: int) -> None:
        try:
            with socket.socket(fileno=os.dup(fd)) as conn:
                peer = str(conn.getpeername()[0])
                if self._count[peer] >= self.limit:
                    conn.shutdown(socket.SHUT_RDWR)
                    self.counters.connections_refused += 1
                    self.warn((peer, "connections"), f"peer {peer} holds {self.limit} connections: closing another")
                    return
        except OSError:  # gone already, or not a TCP socket (ipc://): nothing to count
            return
        self._peer_of[fd] = peer
        self._count[peer] += 1

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self.monitor.close(0)


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float) -> None:
        self.tokens, self.stamp = tokens, time.monotonic()


class _OnceEvery:
    """Rate-limited logging: one line per key per interval, with how many were held back. Bounded keys."""

    def __init__(self, interval: float, max_keys: int = 4096) -> None:
        self.interval, self.max_keys = interval, max_keys
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def __call__(self, key: tuple[str, str], message: str) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return
        if len(self._last) >= self.max_keys:
            self._last.clear()  # a flood of new keys: start over rather than grow
        held = f" ({last[1]} more like it in the last {self.interval:.0f} s)" if last and last[1] else ""
        log.warning("%s%s", message, held)
        self._last[key] = (now, 0)


class _SpecCache:
    """Input specs per (fleet, version): a stored version never changes, so a hit is kept (LRU-bounded);
    a miss is asked again after ``retry`` seconds, so a version published a moment ago is not refused for long."""

    def __init__(self, source: SpecSource, size: int = 1024, retry: float = 1.0) -> None:
        self.source, self.size, self.retry = source, size, retry
        self._items: OrderedDict[tuple[str, int], tuple[float, VersionSpec | QuarantineError]] = OrderedDict()

    def get(self, fleet: str, version: int) -> VersionSpec:
        key = (fleet, version)
        now = time.monotonic()
        hit = self._items.get(key)
        if hit is None or (isinstance(hit[1], QuarantineError) and now - hit[0] > self.retry):
            try:
                value: VersionSpec | QuarantineError = self.source(fleet, version)
            except QuarantineError as e:
                value = e
            hit = (now, value)
            self._items[key] = hit
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        self._items.move_to_end(key)
        if isinstance(hit[1], QuarantineError):
            raise hit[1]
        return hit[1]


@dataclass
class _Write:
    """What one batch stores into one quarantine file, and what to count once it is written."""

    fleet: str
    version: int
    store: QuarantineStore
    per_device: dict[str, int]
    accepted: list[Item] = field(default_factory=list)
    taken: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    pending: int = 0  # bytes the accepted messages will take
    rows: list[Row] = field(default_factory=list)


class _Stores:
    """Open quarantine stores, at most ``limit`` (least recently used closed first), with per-device counts.

    Their connections never checkpoint while writing: a thread of this class copies each open store's WAL back
    into its file every ``interval`` seconds (PASSIVE, through connections of its own), while the collector goes
    on receiving; closing a store's last connection checkpoints it whole.
    """

    def __init__(self, root: Path, limit: int, interval: float = 0.5) -> None:
        self.root, self.limit, self.interval = root, limit, interval
        self._open: OrderedDict[tuple[str, int], tuple[QuarantineStore, dict[str, int]]] = OrderedDict()
        self._paths: set[Path] = set()  # of the open stores, for the checkpointer (under _lock)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._checkpoints, name="collector-checkpoints", daemon=True)
        self._thread.start()

    def _checkpoints(self) -> None:
        conns: dict[Path, QuarantineStore] = {}
        try:
            while not self._stop.wait(self.interval):
                with self._lock:
                    paths = set(self._paths)
                for path in set(conns) - paths:
                    conns.pop(path).close()
                for path in paths:
                    try:
                        if path not in conns:
                            conns[path] = QuarantineStore.checkpointer(path)
                        conns[path].checkpoint()
                    except sqlite3.Error as e:  # busy, or a store that failed: the next round tries again
                        log.debug("checkpoint of %s: %s", path, e)
                        failed = conns.pop(path, None)
                        if failed is not None:
                            failed.close()
        finally:
            for store in conns.values():
                store.close()

    def get(self, fleet: str, version: int, spec: bundle_pb2.InputSpec) -> tuple[QuarantineStore, dict[str, int]]:
        key = (fleet, version)
        entry = self._open.get(key)
        if entry is None:
            while len(self._open) >= self.limit:
                _, (old, _) = self._open.popitem(last=False)
                self._forget(old)
            store = QuarantineStore(quarantine_dir(self.root, fleet, version), checkpoints=False)
            try:
                if store.meta("fleet") is None:
                    store.describe(fleet, version, spec)
                entry = (store, store.device_counts())
            except BaseException:
                store.close()
                raise
            self._open[key] = entry
            with self._lock:
                self._paths.add(store.path)
        self._open.move_to_end(key)
        return entry

    def drop(self, fleet: str, version: int) -> None:
        """Close a store that failed (it is opened afresh next time)."""
        entry = self._open.pop((fleet, version), None)
        if entry is not None:
            self._forget(entry[0])

    def _forget(self, store: QuarantineStore) -> None:
        with self._lock:
            self._paths.discard(store.path)
        store.close()

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)  # its connections closed before the writers' (the last one checkpoints whole)
        for store, _ in self._open.values():
            store.close()
        self._open.clear()


class Collector:
    """The ROUTER loop in a background thread: ``start()``, ``stop()``; ``port`` is the bound port."""

    def __init__(
        self,
        cfg: CollectorConfig,
        spec_for: SpecSource,
        registry: Registry | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.cfg, self.registry = cfg, registry
        self.context = context or zmq.Context.instance()
        self.counters = CollectorCounters()
        self._specs = _SpecCache(spec_for)
        self._stores = _Stores(cfg.root, cfg.max_open_stores)
        self._buckets: dict[str, _Bucket] = {}
        self._layouts_of: dict[tuple[str, int], tuple[bundle_pb2.InputSpec, list[tuple[str, list[int], int]]]] = {}
        self._warn = _OnceEvery(cfg.log_interval)
        self._batch_layouts: dict[tuple[str, int], tuple[list[tuple[str, list[int], int]], int]] = {}
        self._curve = cfg.curve_secret is not None
        self._next_expiry = 0.0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0
        self.counters.bytes_used = disk_usage(cfg.root)
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)

    @property
    def alive(self) -> bool:
        """Whether the ROUTER loop still runs."""
        return self._thread.is_alive()

    @property
    def open_stores(self) -> int:
        """Quarantine stores open now."""
        return len(self._stores)

    def start(self) -> Collector:
        """Bind and start; raises OSError (or CurveError) when the endpoint cannot be bound."""
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and close the stores."""
        self._stop.set()
        self._thread.join(timeout)

    # -- the loop ------------------------------------------------------------------------------------------

    def _bind(self, sock: zmq.Socket) -> None:
        if self.cfg.endpoint.endswith(":0"):
            self.port = sock.bind_to_random_port(self.cfg.endpoint.rsplit(":", 1)[0])
        else:
            sock.bind(self.cfg.endpoint)
            self.port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])

    def _run(self) -> None:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to a vanished peer are dropped, not an error
        # ...and so are replies past a peer's send high-water mark (default 1,000, counted loosely): a sender with a
        # window of ~1,000 unacknowledged messages then waits for ACKs that never come. A reply is ~30 bytes, so
        # a mark far above any sender's window costs little and drops nothing a reading peer would get.
        sock.setsockopt(zmq.SNDHWM, REPLY_HWM)
        # A frame guard above the tensor limit: a peer sending a larger frame is disconnected by ZeroMQ; anything
        # between the two limits is received and answered REJECTED (oversized). It bounds a frame, not a message
        # (libzmq buffers a multipart message's frames until its last): serve runs the collector in a process of its
        # own under memory and descriptor caps for that (collector_process.py).
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes(self.cfg.max_tensor_bytes))
        # A connection that has not finished its ZMTP (or CURVE) handshake within this long is closed: a sender that
        # opens thousands of TCP connections and says nothing frees their descriptors after 5 s (libzmq: 30 s).
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        auth = None
        try:
            if self.cfg.curve_secret is not None:
                if self.cfg.curve_allow is None:
                    raise CurveError("CURVE needs an allow-list folder of agent keys (--curve-allow)")
                allow = AllowList(self.cfg.curve_allow, on_denied=self._denied)
                auth = start_server_auth(self.context, sock, self.cfg.curve_secret, allow)
            self._bind(sock)
        except (zmq.ZMQError, CurveError) as e:
            self._error = e if isinstance(e, CurveError) else OSError(f"collector cannot bind {self.cfg.endpoint}: {e}")
            self._ready.set()
            sock.close()
            if auth is not None:
                auth.stop()
            return
        self._ready.set()
        log.info("collector listening on port %d, storing under %s", self.port, self.cfg.root)
        peers = _PeerLimit(sock, self.cfg.max_peer_connections, self._warn, self.counters)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(peers.monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(self.cfg.poll_ms))
                if peers.monitor in ready:
                    peers.take_events()
                if sock in ready:
                    batch, users = self._receive(sock)
                    self._send(sock, self.handle(batch, users))
        finally:
            peers.close()
            sock.close()
            if auth is not None:
                auth.stop()
            self._stores.close()

    @staticmethod
    def _send(sock: zmq.Socket, replies: list[tuple[bytes, Reply]]) -> None:
        send = sock.send
        for ident, reply in replies:
            send(ident, _SNDMORE)  # plain ints: send_multipart's enum arithmetic cost more than the send
            send(reply.SerializeToString())

    def _receive(self, sock: zmq.Socket) -> tuple[list[list[bytes]], list[str | None] | None]:
        """Up to ``batch`` waiting messages (identity frame first) and, with CURVE, the device each one's key is
        bound to (the ZAP handler's User-Id, read from the frames: only then are they received as Frame objects)."""
        batch: list[list[bytes]] = []
        if not self._curve:  # pyzmq's recv_multipart, without its enum arithmetic per frame
            recv, more = sock.recv, sock.get
            while len(batch) < self.cfg.batch:
                try:
                    message = [recv(_NOBLOCK)]
                except zmq.Again:
                    break
                while more(_RCVMORE):  # the rest of a multipart message is there already
                    message.append(recv(_NOBLOCK))
                batch.append(message)
            return batch, None
        users: list[str | None] = []
        while len(batch) < self.cfg.batch:
            try:
                frames = sock.recv_multipart(_NOBLOCK, copy=False)
            except zmq.Again:
                break
            users.append(str(frames[1].get("User-Id")) if len(frames) > 1 else None)
            batch.append([f.bytes for f in frames])
        return batch, users

    def _denied(self, key: str) -> None:
        self.counters.auth_denied += 1

    # -- one message ---------------------------------------------------------------------------------------

    def _admit(self, device_id: str, now: float) -> bool:
        """Take a token from the device's bucket (``now``: the batch's monotonic time)."""
        bucket = self._buckets.get(device_id)
        if bucket is None:
            if len(self._buckets) >= 65536:  # many senders: forget the idle ones (their buckets are full)
                self._buckets = {
                    d: b
                    for d, b in self._buckets.items()
                    if (now - b.stamp) * self.cfg.rate + b.tokens < self.cfg.burst
                }
            bucket = self._buckets[device_id] = _Bucket(self.cfg.burst)
        bucket.tokens = min(self.cfg.burst, bucket.tokens + (now - bucket.stamp) * self.cfg.rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _layouts(self, fleet: str, version: int, spec: bundle_pb2.InputSpec) -> list[tuple[str, list[int], int]]:
        """(dtype, shape, bytes) a version's quarantine may take, cached with the spec they come from: the model's
        image (uint8, C, H, W; what agents send) and the model's input tensor (agents before the image wire)."""
        cached = self._layouts_of.get((fleet, version))
        if cached is None or cached[0] is not spec:
            shape = [int(d) for d in spec.shape]
            image = list(image_shape_of(spec)) if len(shape) == 3 else shape
            if len(self._layouts_of) > 4096:
                self._layouts_of.clear()
            layouts = [
                ("uint8", image, math.prod(image)),
                (spec.dtype, shape, np.dtype(spec.dtype).itemsize * math.prod(shape)),
            ]
            cached = self._layouts_of[(fleet, version)] = (spec, layouts)
        return cached[1]

    def _check(self, ident: bytes, user: str | None, body: list[bytes]) -> quarantine_pb2.QuarantineHeader:
        """Everything but the values (checked per batch, vectorised, in :meth:`_check_values`)."""
        if len(body) != 2:
            raise QuarantineError(f"a quarantine message has 2 frames, this one {len(body)}")
        header = quarantine_pb2.QuarantineHeader()
        try:
            header.ParseFromString(body[0])
        except Exception as e:  # protobuf DecodeError
            raise QuarantineError(f"malformed header: {e}") from e
        check_header(header)
        if header.device_id.encode() != ident:
            raise QuarantineError(f"header device_id {header.device_id!r} is not the sender's identity", "identity")
        if user is not None and header.device_id != user:
            raise QuarantineError(f"the CURVE key of device {user!r} cannot send as {header.device_id!r}", "identity")
        if not is_name(header.fleet):
            raise QuarantineError(f"unknown fleet {header.fleet[:80]!r}", "unknown-fleet")
        key = (header.fleet, header.bundle_version)
        known = self._batch_layouts.get(key)
        if known is None:  # first message of this version in the batch (a miss is not kept: asked again)
            version = self._specs.get(*key)
            known = self._layouts(header.fleet, int(header.bundle_version), version.input_spec), version.classes
            self._batch_layouts[key] = known
        layouts, classes = known
        bound = classes or MAX_LABEL
        for what, label in (("primary_label", header.primary_label), ("monitor_label", header.monitor_label)):
            if not 0 <= label < bound:  # a label indexes counts and tensors in the repair: never out of range
                raise QuarantineError(f"{what} {label} is outside the fleet's labels [0, {bound})", "labels")
        tensor = body[1]
        for dtype, shape, nbytes in layouts:
            if header.dtype == dtype and len(tensor) == nbytes and header.shape == shape:
                if nbytes > self.cfg.max_tensor_bytes:
                    raise QuarantineError(
                        f"tensor of {nbytes} bytes exceeds the {self.cfg.max_tensor_bytes}-byte limit"
                    )
                return header  # the common case: exactly one of the version's layouts
        _, got, expected = tensor_layout(header, self.cfg.max_tensor_bytes)  # says precisely what is wrong
        if len(tensor) != expected:
            raise QuarantineError(f"tensor frame has {len(tensor)} bytes, {list(got)} needs {expected}", "layout")
        wanted = " or ".join(f"{shape} {dtype}" for dtype, shape, _ in layouts)
        raise QuarantineError(
            f"tensor {list(got)} {header.dtype} does not match the fleet's input ({wanted})", "layout"
        )

    @staticmethod
    def _check_values(spec: bundle_pb2.InputSpec, items: list[Item]) -> np.ndarray:
        """Which messages hold NaN, infinities or values outside the spec's range. Only model-input tensors are
        checked (vectorised, one pass over the batch): any uint8 image is a valid image."""
        bad = np.zeros(len(items), dtype=bool)
        tensors = [k for k, (_, header, _) in enumerate(items) if header.dtype != "uint8"]
        if not tensors:
            return bad
        rows = np.frombuffer(b"".join(items[k][2] for k in tensors), dtype=np.dtype(spec.dtype))
        rows = rows.reshape(len(tensors), -1)
        lo, hi = rows.min(axis=1), rows.max(axis=1)  # NaN anywhere in a row makes its min and max NaN
        low, high = accepted_range(spec)
        out = ~(lo >= low) | ~(hi <= high)
        if rows.dtype.kind == "f":
            out |= np.isinf(lo) | np.isinf(hi)
        bad[tensors] = out
        return bad

    # -- one batch -----------------------------------------------------------------------------------------

    def handle(self, batch: list[list[bytes]], users: list[str | None] | None = None) -> list[tuple[bytes, Reply]]:
        """Validate, store and answer one batch of raw ROUTER messages (identity frame first).

        ``users``: per message, the device id its CURVE key is bound to (None without CURVE).
        """
        replies, groups = self._check_batch(batch, users)
        return replies + self._store_groups(groups)

    def _check_batch(
        self, batch: list[list[bytes]], users: list[str | None] | None
    ) -> tuple[list[tuple[bytes, Reply]], Groups]:
        """Stats recorded, malformed messages answered; the rest grouped by (fleet, version, spec) to store."""
        c = self.counters
        replies: list[tuple[bytes, Reply]] = []
        checked: dict[tuple[str, int], list[Item]] = defaultdict(list)
        self._batch_layouts.clear()  # specs looked up once per version and batch
        for frames, user in zip(batch, users or [None] * len(batch), strict=True):
            ident, body = frames[0], frames[1:]
            if len(body) == 1:
                self._stats(ident, user, body[0])
                continue
            c.received += 1
            try:
                header = self._check(ident, user, body)
            except QuarantineError as e:
                replies.append(self._refuse(ident, body, e))
                continue
            except Exception as e:  # a bug, not the sender's fault: no reply, so the agent keeps and resends it
                c.internal_errors += 1
                self._warn(("*", "internal"), f"could not check a message from {ident[:64]!r}: {e!r}")
                continue
            checked[(header.fleet, int(header.bundle_version))].append((ident, header, body[1]))
        return replies, [(f, v, self._specs.get(f, v).input_spec, items) for (f, v), items in checked.items()]

    def _store_groups(self, groups: Groups) -> list[tuple[bytes, Reply]]:
        """Store each group (one transaction per version) in this thread; the replies."""
        replies, writes = self._admit_groups(groups)
        return replies + self._finish(writes, self._write(writes))

    def _admit_groups(self, groups: Groups) -> tuple[list[tuple[bytes, Reply]], list[_Write]]:
        """Per message: values, rate, budget and quota. The refusals, and per group the rows to write."""
        replies: list[tuple[bytes, Reply]] = []
        writes: list[_Write] = []
        for fleet, version, spec, items in groups:
            refused, write = self._admit_group(fleet, version, spec, items)
            replies.extend(refused)
            if write is not None:
                writes.append(write)
        return replies, writes

    def _admit_group(
        self, fleet: str, version: int, spec: bundle_pb2.InputSpec, items: list[Item]
    ) -> tuple[list[tuple[bytes, Reply]], _Write | None]:
        c = self.counters
        replies: list[tuple[bytes, Reply]] = []
        bad = self._check_values(spec, items)
        try:
            store, per_device = self._stores.get(fleet, version, spec)
        except (sqlite3.Error, OSError, QuarantineError) as e:
            return self._unavailable(fleet, version, items, e), None
        write = _Write(fleet, version, store, per_device)
        now = time.monotonic()
        for (ident, header, tensor), is_bad in zip(items, bad.tolist(), strict=True):
            device = header.device_id
            if is_bad:
                why = f"tensor holds NaN, infinities or values outside [{spec.min_value}, {spec.max_value}]"
                replies.append(self._refuse(ident, None, QuarantineError(why, "values"), header))
            elif not self._admit(device, now):
                c.throttled += 1
                replies.append((ident, Reply(device_id=device, seq=header.seq, status=Reply.THROTTLED)))
            elif c.bytes_used + write.pending + len(tensor) > self.cfg.budget_bytes:
                if not c.budget_full:
                    log.error(
                        "quarantine budget reached: %d of %d bytes under %s; new quarantine is refused (OVER_QUOTA, "
                        "agents keep it) until space is freed or the budget is raised",
                        c.bytes_used, self.cfg.budget_bytes, self.cfg.root,
                    )  # fmt: skip
                    c.budget_full = True
                replies.append(self._over_quota(ident, header, "budget", "the collector's storage budget is used up"))
            elif per_device.get(device, 0) + write.taken[device] >= self.cfg.device_quota:
                why = f"device {device} has {self.cfg.device_quota} quarantined inputs for {fleet} v{version} (quota)"
                replies.append(self._over_quota(ident, header, "quota", why))
            else:
                write.taken[device] += 1
                write.pending += len(tensor) + len(device) + ROW_OVERHEAD
                write.accepted.append((ident, header, tensor))
        if not write.accepted:
            return replies, None
        write.rows = QuarantineStore.rows(((h, t) for _, h, t in write.accepted), checked=True)
        return replies, write

    @staticmethod
    def _write(writes: list[_Write]) -> list[int | BaseException]:
        """The SQLite part: per write, how many rows were new, or the error that stopped it. (Tried on a thread of
        its own while the socket thread checks the next batch: no faster, the GIL is held for most of it.)"""
        out: list[int | BaseException] = []
        for w in writes:
            try:
                out.append(w.store.insert_rows(w.rows))
            except (sqlite3.Error, OSError) as e:
                out.append(e)
        return out

    def _finish(self, writes: list[_Write], results: list[int | BaseException]) -> list[tuple[bytes, Reply]]:
        """After the writes: count, and ACK what is stored (UNAVAILABLE for a store that failed)."""
        c = self.counters
        replies: list[tuple[bytes, Reply]] = []
        for w, new in zip(writes, results, strict=True):
            if isinstance(new, BaseException):
                self._stores.drop(w.fleet, w.version)
                replies.extend(self._unavailable(w.fleet, w.version, w.accepted, new))
                continue
            if new:
                for device, n in w.taken.items():  # duplicates count too: an upper bound, exact after a reopen
                    w.per_device[device] = w.per_device.get(device, 0) + n
                c.bytes_used += w.pending * new // len(w.accepted)
            c.stored += new
            c.duplicates += len(w.accepted) - new
            replies.extend(self._acks(w.accepted))
        return replies

    @staticmethod
    def _acks(accepted: list[Item]) -> list[tuple[bytes, Reply]]:
        """ACKs for stored messages: one per message, except to senders that read ``acked`` (``batched_acks`` in
        their headers): one reply for all of theirs in this write."""
        replies: list[tuple[bytes, Reply]] = []
        batched: dict[bytes, tuple[str, list[int]]] = {}
        for ident, h, _ in accepted:
            if h.batched_acks:
                batched.setdefault(ident, (h.device_id, []))[1].append(h.seq)
            else:
                replies.append((ident, Reply(device_id=h.device_id, seq=h.seq, status=Reply.ACK)))
        for ident, (device, seqs) in batched.items():
            replies.append((ident, Reply(device_id=device, seq=seqs[0], status=Reply.ACK, acked=seqs[1:])))
        return replies

    def _refuse(
        self,
        ident: bytes,
        body: list[bytes] | None,
        error: QuarantineError,
        header: quarantine_pb2.QuarantineHeader | None = None,
    ) -> tuple[bytes, Reply]:
        self.counters.rejected += 1
        self.counters.by_reason[error.reason] += 1
        if header is None:
            header = quarantine_pb2.QuarantineHeader()
            if body:
                try:
                    header.ParseFromString(body[0])
                except Exception:  # an unparseable header: the reply names no seq
                    header.Clear()
        who = ident[:64].decode(errors="replace")
        self._warn((who, error.reason), f"refused quarantine from {who!r} seq {header.seq}: {error}")
        seq = header.seq if header.seq <= INT63 else 0
        return ident, Reply(device_id=header.device_id[:64], seq=seq, status=Reply.REJECTED, error=str(error)[:500])

    def _over_quota(
        self, ident: bytes, header: quarantine_pb2.QuarantineHeader, reason: str, why: str
    ) -> tuple[bytes, Reply]:
        self.counters.over_quota += 1
        self.counters.by_reason[reason] += 1
        self._warn((header.device_id, reason), f"not stored (OVER_QUOTA, kept by the agent): {why}")
        return ident, Reply(
            device_id=header.device_id,
            seq=header.seq,
            status=Reply.OVER_QUOTA,
            error=why,
            retry_after=self.cfg.retry_after,
        )

    def _unavailable(self, fleet: str, version: int, items: list[Item], e: BaseException) -> list[tuple[bytes, Reply]]:
        self.counters.unavailable += len(items)
        self._warn((fleet, "store"), f"cannot write the quarantine of {fleet} v{version}: {e}; agents resend later")
        return [
            (ident, Reply(device_id=h.device_id, seq=h.seq, status=Reply.UNAVAILABLE, error="the collector cannot "
                          "store now", retry_after=self.cfg.retry_after))
            for ident, h, _ in items
        ]  # fmt: skip

    def _stats(self, ident: bytes, user: str | None, body: bytes) -> None:
        who = ident[:64].decode(errors="replace")
        try:
            stats = quarantine_pb2.AgentStats.FromString(body)
        except Exception as e:  # protobuf DecodeError: log and move on, stats are fire-and-forget
            self.counters.malformed_frames += 1
            self._warn((who, "stats"), f"malformed stats message from {who!r}: {e}")
            return
        why = ""
        if stats.device_id.encode() != ident or (user is not None and stats.device_id != user):
            why = f"stats for {stats.device_id[:64]!r} from sender {who!r}" + (f" (key of {user!r})" if user else "")
        elif not (is_name(stats.device_id) and is_name(stats.fleet)):
            why = "stats with an invalid device or fleet name"
        elif max(
            stats.bundle_version, stats.requests, stats.rejects, stats.spool_depth, stats.spool_dropped,
            stats.version_requests, stats.version_rejects, stats.version_errors,
        ) > INT63:  # fmt: skip
            why = "stats with a count above 2**63-1"
        elif not 0.0 <= stats.window_reject_rate <= 1.0:
            why = f"stats with a reject rate {stats.window_reject_rate} outside [0, 1]"
        else:  # a device enters the registry only with a report of a stored fleet and version
            try:
                self._specs.get(stats.fleet, int(stats.bundle_version))
            except QuarantineError as e:
                why = f"stats of a version the store does not hold ({e})"
        if why:
            self.counters.malformed_frames += 1
            self.counters.by_reason["identity" if "sender" in why else "malformed"] += 1
            self._warn((who, "stats"), f"{why}: ignored")
            return
        self.counters.stats += 1
        if self.registry is not None:
            try:
                self.registry.record_stats(stats)
                if time.monotonic() >= self._next_expiry:  # devices only reports ever named, silent for long: gone
                    self._next_expiry = time.monotonic() + 60.0
                    gone = self.registry.expire(self.cfg.device_ttl)
                    if gone:
                        log.info("registry: %d device(s) that never subscribed and went silent expired", gone)
            except sqlite3.Error as e:
                self._warn(("*", "registry"), f"cannot record stats: {e}")
