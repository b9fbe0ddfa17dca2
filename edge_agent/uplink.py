"""The quarantine uplink: a ZeroMQ DEALER that streams the spool to the trainer's collector (a ROUTER).

Each spooled input goes out as the multipart message ``[QuarantineHeader, tensor bytes]`` with the spool's
sequence number in the header; the collector answers a ``QuarantineReply`` after its durable write (one reply
for all of this device's messages one write stored: the header asks for ``batched_acks``), and only then is the
row deleted from the spool. Unacknowledged rows are resent after ``resend_after`` seconds;
ZeroMQ reconnects by itself, with libzmq's jitter; a socket monitor counts the connections. The uplink runs in its
own thread and never blocks inference: it reads the spool, the request path only writes it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from edge_agent.backoff import stretch
from edge_agent.formats.curve import configure_client
from edge_agent.spool import Spool
from protos.nnoc.v1 import quarantine_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UplinkConfig:
    """Where the collector is and how eagerly to (re)send."""

    endpoint: str  # e.g. "tcp://127.0.0.1:5555"
    device_id: str
    window: int = 256  # unacknowledged messages in flight at most
    resend_after: float = 5.0  # seconds without an ACK before a message is sent again
    poll_ms: int = 50
    # Pause after a round that sent or acknowledged something, so that the next round moves a batch (one spool
    # query and one ACK transaction for many messages) instead of one message at a time; it bounds how long a
    # new reject waits before it leaves the box.
    batch_delay: float = 0.05
    linger_ms: int = 0
    stats_interval: float = 10.0  # seconds between AgentStats messages (when a stats source is given)
    curve_key: Path | None = None  # this agent's CURVE .key_secret file (with curve_server_key: encrypted link)
    curve_server_key: Path | None = None  # the collector's CURVE public .key file
    # libzmq reconnects by itself: the first try after reconnect_ms, each later one after an interval that doubles
    # up to reconnect_max_ms, and every interval gets a random extra of up to reconnect_ms (libzmq's own jitter), so
    # a fleet cut off by a collector restart comes back spread over that much
    reconnect_ms: int = 500
    reconnect_max_ms: int = 10_000


@dataclass
class UplinkCounters:
    """What the uplink did since it started (for metrics and tests)."""

    sent: int = 0
    resent: int = 0
    acked: int = 0
    refused: int = 0
    throttled: int = 0
    deferred: int = 0  # OVER_QUOTA or UNAVAILABLE: kept in the spool, sent again after the collector's retry_after
    bad_replies: int = 0
    stats_sent: int = 0
    spool_errors: int = 0  # rounds the spool failed (disk full, I/O): the uplink waits and tries again
    connects: int = 0  # connections made to the collector (the first one included)
    connected: bool = False

    @property
    def reconnects(self) -> int:
        """Connections made again after the first one."""
        return max(self.connects - 1, 0)


SPOOL_RETRY = 1.0  # seconds between tries while the spool fails


class Uplink:
    """Background sender of the spool. ``start()`` it, ``stop()`` it; one ZeroMQ context per process."""

    def __init__(
        self,
        spool: Spool,
        cfg: UplinkConfig,
        context: zmq.Context | None = None,
        stats: Callable[[], quarantine_pb2.AgentStats] | None = None,
    ) -> None:
        self.spool = spool
        self.stats = stats
        self.cfg = cfg
        self.context = context or zmq.Context.instance()
        self.counters = UplinkCounters()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"uplink-{cfg.device_id}", daemon=True)

    def start(self) -> Uplink:
        """Start the sender thread."""
        self._thread.start()
        return self

    def notify(self) -> None:
        """Tell the sender that the spool has new rows (it also polls on its own)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the sender thread; unacknowledged rows stay in the spool for the next start."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _connect(self) -> tuple[zmq.Socket, zmq.Socket, zmq.Poller]:
        """The DEALER to the collector, the monitor socket that reports its connections, and a poller on both."""
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, self.cfg.linger_ms)
        sock.setsockopt(zmq.IDENTITY, self.cfg.device_id.encode())
        sock.setsockopt(zmq.SNDHWM, self.cfg.window * 2)
        sock.setsockopt(zmq.RECONNECT_IVL, self.cfg.reconnect_ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, self.cfg.reconnect_max_ms)
        if self.cfg.curve_key is not None and self.cfg.curve_server_key is not None:
            configure_client(sock, self.cfg.curve_key, self.cfg.curve_server_key)
        events_of_link = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.cfg.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(events_of_link, zmq.POLLIN)
        return sock, events_of_link, poller

    def _run(self) -> None:
        sock, events_of_link, poller = self._connect()
        # What was sent and when lives here, not in the spool: sending costs the spool no writes. A restart
        # forgets it and sends every row again; the collector keys on (device, seq) and stores each once.
        in_flight: dict[int, float] = {}  # seq -> when it was last sent; stays until ACKed, REJECTED or gone
        cursor = 0  # the newest seq sent so far: rows above it have never been sent
        next_stats = time.monotonic()
        paused_until = 0.0  # the collector asked to wait (quota, budget, a store it cannot write)
        to_delete: list[int] = []  # answered for good (ACK, REJECTED), not yet deleted from the spool
        next_error_log = 0.0
        try:
            while not self._stop.is_set():
                try:
                    if self.stats is not None and time.monotonic() >= next_stats:
                        next_stats = time.monotonic() + self.cfg.stats_interval
                        msg = self.stats()
                        msg.device_id = self.cfg.device_id
                        msg.sent_at.GetCurrentTime()
                        try:
                            sock.send_multipart([msg.SerializeToString()], flags=zmq.NOBLOCK)
                            self.counters.stats_sent += 1
                        except zmq.Again:  # disconnected: stats are a snapshot, the next one will do
                            pass
                    horizon = time.monotonic() - self.cfg.resend_after
                    expired = sorted(seq for seq, t in in_flight.items() if t <= horizon)  # no reply in time: due again
                    room = self.cfg.window - (len(in_flight) - len(expired)) if time.monotonic() >= paused_until else 0
                    sent_now = 0
                    if room > 0:
                        expired = expired[:room]
                        items = self.spool.get(expired) if expired else []
                        for seq in expired:  # found again above unless ACKed meanwhile or dropped by the spool's bound
                            del in_flight[seq]
                        resends = len(items)
                        if len(items) < room:
                            fresh = self.spool.after(cursor, room - len(items))
                            cursor = fresh[-1].seq if fresh else cursor
                            items += fresh
                        for k, item in enumerate(items):
                            header = quarantine_pb2.QuarantineHeader.FromString(item.header)
                            header.seq = item.seq
                            header.device_id = self.cfg.device_id
                            header.batched_acks = True  # one reply may acknowledge several (QuarantineReply.acked)
                            in_flight[item.seq] = time.monotonic()  # sent, or tried: either way due again later
                            try:
                                sock.send_multipart([header.SerializeToString(), item.tensor], flags=zmq.NOBLOCK)
                            except zmq.Again:  # queue full while disconnected: this and the rest after resend_after
                                for rest in items[k + 1 :]:
                                    in_flight[rest.seq] = time.monotonic()
                                break
                            self.counters.sent += 1
                            sent_now += 1
                            if k < resends:
                                self.counters.resent += 1
                    events = dict(poller.poll(self.cfg.poll_ms))
                    if events_of_link in events:
                        self._link_events(events_of_link)
                    acks = to_delete  # every seq the collector answered for good, deleted below
                    while sock in events:
                        try:
                            frames = sock.recv_multipart(flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        reply = self._parse_reply(frames)
                        if reply is None:
                            continue
                        if reply.status == quarantine_pb2.QuarantineReply.ACK:
                            in_flight.pop(reply.seq, None)
                            acks.append(reply.seq)
                            for seq in reply.acked:  # the rest of this device's messages the same write stored
                                in_flight.pop(seq, None)
                                acks.append(seq)
                        elif reply.status == quarantine_pb2.QuarantineReply.REJECTED:
                            # The collector will never accept this message as it is: drop it, count it, say why.
                            log.warning("collector refused quarantine message %d: %s", reply.seq, reply.error)
                            self.counters.refused += 1
                            in_flight.pop(reply.seq, None)
                            acks.append(reply.seq)
                        elif reply.status == quarantine_pb2.QuarantineReply.THROTTLED:
                            self.counters.throttled += 1  # stays spooled and in flight: due again after resend_after
                        elif reply.status in (
                            quarantine_pb2.QuarantineReply.OVER_QUOTA,
                            quarantine_pb2.QuarantineReply.UNAVAILABLE,
                        ):
                            # Stays spooled (the spool's own bound applies) and in flight; nothing goes out for a while.
                            self.counters.deferred += 1
                            # stretched at random: the agents the collector deferred together do not all come
                            # back in the same second
                            wait = stretch(min(max(reply.retry_after, self.cfg.resend_after), 600.0))
                            if time.monotonic() + wait > paused_until:
                                log.warning("collector defers quarantine for %.0f s: %s", wait, reply.error)
                                paused_until = time.monotonic() + wait
                    if to_delete:  # kept until the DELETE commits: a failed one is tried again next round
                        self.counters.acked += self.spool.ack(to_delete)
                        to_delete.clear()
                    if not in_flight and not to_delete and self.spool.depth() == 0:
                        self._wake.wait(self.cfg.poll_ms / 1000)
                        self._wake.clear()
                    elif acks or sent_now:
                        self._stop.wait(self.cfg.batch_delay)
                except (sqlite3.Error, OSError) as e:  # the spool failed (disk full, I/O error): wait, try again
                    self.counters.spool_errors += 1
                    if time.monotonic() >= next_error_log:
                        log.warning("uplink: the spool failed (%s); retrying every %.1f s", e, SPOOL_RETRY)
                        next_error_log = time.monotonic() + 60.0
                    self._stop.wait(SPOOL_RETRY)
        finally:
            sock.disable_monitor()
            events_of_link.close()
            sock.close()

    def _link_events(self, monitor: zmq.Socket) -> None:
        """Count the connections the socket monitor reports (a handshake done: connected; gone: disconnected)."""
        while True:
            try:
                event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.counters.connects += 1
                self.counters.connected = True
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.counters.connected = False

    def _parse_reply(self, frames: list[bytes]) -> quarantine_pb2.QuarantineReply | None:
        try:
            if len(frames) != 1:
                raise ValueError(f"{len(frames)} frames")
            return quarantine_pb2.QuarantineReply.FromString(frames[0])
        except Exception as e:  # a malformed reply must not kill the uplink
            self.counters.bad_replies += 1
            log.warning("ignoring a malformed collector reply: %s", e)
            return None
