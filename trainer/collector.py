"""The quarantine collector: a ZeroMQ ROUTER that receives the agents' quarantine and stats messages.

Wire format (``protos/nnoc/v1/quarantine.proto``): a quarantine message is ``[QuarantineHeader, tensor]``,
a stats message ``[AgentStats]``; the ROUTER sees the sender's identity as an extra first frame. For each
quarantine message the collector checks the header and the tensor against the fleet's input spec, writes it
durably into the store of its fleet and bundle version (``<root>/<fleet>/<version>/quarantine.sqlite``, the
format ``nnoc-trainer repair --quarantine`` reads), and only then answers ACK. Messages arriving together are
written in one transaction. A duplicate ``(device_id, seq)`` is acknowledged and not stored twice. A malformed
or oversized message is answered REJECTED with the reason; a device over its rate limit gets THROTTLED (it
keeps the message and resends later). Nothing a sender does can stop the loop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from edge_agent.curve import AllowList, CurveError, start_server_auth
from protos.nnoc.v1 import bundle_pb2, quarantine_pb2
from trainer.quarantine import QuarantineError, QuarantineStore, check_message
from trainer.registry import Registry

log = logging.getLogger(__name__)

Reply = quarantine_pb2.QuarantineReply
SpecSource = Callable[[str], bundle_pb2.InputSpec | None]


@dataclass(frozen=True)
class CollectorConfig:
    """Where the collector listens, where it stores, and its limits."""

    endpoint: str = "tcp://127.0.0.1:5555"
    root: Path = Path("quarantine")
    max_tensor_bytes: int = 1 << 20  # a larger tensor frame is refused (oversized)
    rate: float = 2000.0  # quarantine messages per second per device (token bucket refill)
    burst: float = 20000.0  # token bucket size: what a device may send at once after being quiet
    batch: int = 2048  # messages taken off the socket per transaction, at most
    poll_ms: int = 50
    curve_secret: Path | None = None  # the collector's CURVE .key_secret file: encrypt and authenticate
    curve_allow: Path | None = None  # folder of the agents' CURVE .key files (required with curve_secret)


@dataclass
class CollectorCounters:
    """What the collector did since it started."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    throttled: int = 0
    stats: int = 0
    malformed_frames: int = 0
    auth_denied: int = 0
    by_reason: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def quarantine_dir(root: Path, fleet: str, version: int) -> Path:
    """Folder of the quarantine collected for one fleet while ``version`` served."""
    return root / fleet / str(int(version))


def quarantine_size(root: Path, fleet: str, version: int) -> int:
    """Stored inputs in one fleet/version quarantine (0 when there is none yet)."""
    path = quarantine_dir(root, fleet, version) / "quarantine.sqlite"
    if not path.is_file():
        return 0
    with QuarantineStore(path, create=False) as store:
        return store.count()


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float) -> None:
        self.tokens, self.stamp = tokens, time.monotonic()


class Collector:
    """The ROUTER loop in a background thread: ``start()``, ``stop()``; ``port`` is the bound port."""

    def __init__(
        self,
        cfg: CollectorConfig,
        spec_for: SpecSource,
        registry: Registry | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.cfg, self.spec_for, self.registry = cfg, spec_for, registry
        self.context = context or zmq.Context.instance()
        self.counters = CollectorCounters()
        self._stores: dict[tuple[str, int], QuarantineStore] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._specs: dict[str, tuple[float, bundle_pb2.InputSpec | None]] = {}
        self._layouts: dict[str, tuple[bundle_pb2.InputSpec, list[int], int]] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)

    def start(self) -> Collector:
        """Bind and start; raises when the endpoint cannot be bound."""
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

    def _run(self) -> None:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to a vanished peer are dropped, not an error
        # A memory guard far above the tensor limit: a peer sending more is disconnected by ZeroMQ; anything
        # between the two limits is received and answered REJECTED (oversized).
        sock.setsockopt(zmq.MAXMSGSIZE, max(64 << 20, 4 * self.cfg.max_tensor_bytes))
        auth = None
        try:
            if self.cfg.curve_secret is not None:
                if self.cfg.curve_allow is None:
                    raise CurveError("CURVE needs an allow-list folder of agent keys (--curve-allow)")
                allow = AllowList(self.cfg.curve_allow, on_denied=self._denied)
                auth = start_server_auth(self.context, sock, self.cfg.curve_secret, allow)
            if self.cfg.endpoint.endswith(":0"):
                self.port = sock.bind_to_random_port(self.cfg.endpoint.rsplit(":", 1)[0])
            else:
                sock.bind(self.cfg.endpoint)
                self.port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        except (zmq.ZMQError, CurveError) as e:
            self._error = e if isinstance(e, CurveError) else OSError(f"collector cannot bind {self.cfg.endpoint}: {e}")
            self._ready.set()
            sock.close()
            if auth is not None:
                auth.stop()
            return
        self._ready.set()
        log.info("collector listening on port %d, storing under %s", self.port, self.cfg.root)
        try:
            while not self._stop.is_set():
                if not sock.poll(self.cfg.poll_ms):
                    continue
                batch: list[list[bytes]] = []
                while len(batch) < self.cfg.batch:
                    try:
                        batch.append(sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                try:
                    replies = self.handle(batch)
                except Exception:  # a store failure: no ACK goes out, the agents resend later
                    log.exception("could not store a batch of %d messages; not acknowledged", len(batch))
                    continue
                for ident, reply in replies:
                    sock.send_multipart([ident, reply.SerializeToString()])
        finally:
            sock.close()
            if auth is not None:
                auth.stop()
            for store in self._stores.values():
                store.close()
            self._stores.clear()

    def _denied(self, key: str) -> None:
        self.counters.auth_denied += 1

    # -- one batch -----------------------------------------------------------------------------------------

    def _spec(self, fleet: str) -> bundle_pb2.InputSpec | None:
        now = time.monotonic()
        cached = self._specs.get(fleet)
        # A known fleet's spec is re-read every 5 s; an unknown fleet is asked about again after 1 s, so a fleet
        # created a moment ago is not refused for long.
        if cached is None or now - cached[0] > (5.0 if cached[1] is not None else 1.0):
            try:
                cached = (now, self.spec_for(fleet))
            except Exception as e:  # an unknown or broken fleet is the sender's problem, reported as such
                log.debug("no input spec for fleet %r: %s", fleet, e)
                cached = (now, None)
            self._specs[fleet] = cached
        return cached[1]

    def _admit(self, device_id: str) -> bool:
        bucket = self._buckets.get(device_id)
        if bucket is None:
            bucket = self._buckets[device_id] = _Bucket(self.cfg.burst)
        now = time.monotonic()
        bucket.tokens = min(self.cfg.burst, bucket.tokens + (now - bucket.stamp) * self.cfg.rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _store(self, fleet: str, version: int, spec: bundle_pb2.InputSpec) -> QuarantineStore:
        store = self._stores.get((fleet, version))
        if store is None:
            store = QuarantineStore(quarantine_dir(self.cfg.root, fleet, version))
            if store.meta("fleet") is None:
                described = {"shape": list(spec.shape), "dtype": spec.dtype, "scale": spec.scale}
                store.set_meta(fleet=fleet, bundle_version=str(version), input_spec=json.dumps(described))
            self._stores[(fleet, version)] = store
        return store

    def _check(self, header: quarantine_pb2.QuarantineHeader, tensor: bytes) -> bundle_pb2.InputSpec:
        """Everything but the values (checked per batch, vectorised, in :meth:`_check_values`)."""
        spec = self._spec(header.fleet)
        if spec is None:
            raise QuarantineError(f"unknown fleet {header.fleet!r}")
        shape, nbytes = self._layout(header.fleet, spec)
        fits = header.device_id and header.dtype == spec.dtype and len(tensor) == nbytes and header.shape == shape
        if fits and nbytes <= self.cfg.max_tensor_bytes:
            return spec  # the common case: exactly the fleet's layout
        arr = check_message(header, tensor, self.cfg.max_tensor_bytes)  # says precisely what is wrong
        raise QuarantineError(
            f"tensor {list(arr.shape)} {arr.dtype} does not match the fleet's input {shape} {spec.dtype}"
        )

    def _layout(self, fleet: str, spec: bundle_pb2.InputSpec) -> tuple[list[int], int]:
        """The fleet's tensor shape and byte size (cached with the spec they come from)."""
        cached = self._layouts.get(fleet)
        if cached is None or cached[0] is not spec:
            shape = [int(d) for d in spec.shape]
            cached = self._layouts[fleet] = (spec, shape, np.dtype(spec.dtype).itemsize * int(np.prod(shape)))
        return cached[1], cached[2]

    @staticmethod
    def _check_values(spec: bundle_pb2.InputSpec, tensors: list[bytes]) -> np.ndarray:
        """Which tensors (rows) hold NaN, infinities or values outside the spec's range."""
        rows = np.frombuffer(b"".join(tensors), dtype=np.dtype(spec.dtype)).reshape(len(tensors), -1)
        lo, hi = rows.min(axis=1), rows.max(axis=1)  # NaN anywhere in a row makes its min and max NaN
        bad = ~(lo >= spec.min_value) | ~(hi <= spec.max_value)
        if rows.dtype.kind == "f":
            bad |= np.isinf(lo) | np.isinf(hi)
        return np.asarray(bad)

    def handle(self, batch: list[list[bytes]]) -> list[tuple[bytes, Reply]]:
        """Validate, store and answer one batch of raw ROUTER messages (identity frame first)."""
        c = self.counters
        replies: list[tuple[bytes, Reply]] = []
        Item = tuple[bytes, quarantine_pb2.QuarantineHeader, bytes]
        checked: dict[str, list[Item]] = defaultdict(list)
        accepted: dict[tuple[str, int], list[Item]] = defaultdict(list)
        for frames in batch:
            ident, body = frames[0], frames[1:]
            if len(body) == 1:
                self._stats(ident, body[0])
                continue
            c.received += 1
            header = quarantine_pb2.QuarantineHeader()
            try:
                if len(body) != 2:
                    raise QuarantineError(f"a quarantine message has 2 frames, this one {len(body)}")
                try:
                    header.ParseFromString(body[0])
                except Exception as e:  # protobuf DecodeError
                    raise QuarantineError(f"malformed header: {e}") from e
                if header.device_id and header.device_id.encode() != ident:
                    raise QuarantineError(f"header device_id {header.device_id!r} is not the sender's identity")
                self._check(header, body[1])
            except QuarantineError as e:
                replies.append(self._refuse(ident, header, str(e)))
                continue
            checked[header.fleet].append((ident, header, body[1]))
        for fleet, items in checked.items():
            spec = self._spec(fleet)
            assert spec is not None
            bad = self._check_values(spec, [t for _, _, t in items])
            for (ident, header, tensor), is_bad in zip(items, bad, strict=True):
                if is_bad:
                    why = (
                        "tensor holds NaN, infinities or values outside the fleet's range "
                        f"[{spec.min_value}, {spec.max_value}]"
                    )
                    replies.append(self._refuse(ident, header, why))
                elif not self._admit(header.device_id):
                    c.throttled += 1
                    replies.append((ident, Reply(device_id=header.device_id, seq=header.seq, status=Reply.THROTTLED)))
                else:
                    accepted[(header.fleet, int(header.bundle_version))].append((ident, header, tensor))
        for (fleet, version), items in accepted.items():
            spec = self._spec(fleet)
            assert spec is not None
            new = self._store(fleet, version, spec).add_many(((h, t) for _, h, t in items), checked=True)
            c.stored += new
            c.duplicates += len(items) - new
            replies.extend((ident, Reply(device_id=h.device_id, seq=h.seq, status=Reply.ACK)) for ident, h, _ in items)
        return replies

    def _refuse(self, ident: bytes, header: quarantine_pb2.QuarantineHeader, why: str) -> tuple[bytes, Reply]:
        self.counters.rejected += 1
        self.counters.by_reason[why.split(":")[0][:60]] += 1
        log.warning("refused quarantine message from %r seq %d: %s", ident[:64], header.seq, why)
        return ident, Reply(device_id=header.device_id, seq=header.seq, status=Reply.REJECTED, error=why)

    def _stats(self, ident: bytes, body: bytes) -> None:
        try:
            stats = quarantine_pb2.AgentStats.FromString(body)
        except Exception as e:  # protobuf DecodeError: log and move on, stats are fire-and-forget
            self.counters.malformed_frames += 1
            log.warning("malformed stats message from %r: %s", ident[:64], e)
            return
        if stats.device_id.encode() != ident:
            self.counters.malformed_frames += 1
            log.warning("stats for %r from sender %r ignored", stats.device_id, ident[:64])
            return
        self.counters.stats += 1
        if self.registry is not None:
            self.registry.record_stats(stats)
