"""Reject-rate monitoring (paper §7): the share of rejected requests over windows of N requests."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitorSnapshot:
    """Counters at one moment."""

    requests: int
    rejects: int
    window_size: int
    window_fill: int
    window_reject_rate: float  # over the last ``window_fill`` requests (<= window_size)
    alarm: bool  # the windowed rate exceeds the threshold over a full window


class RejectMonitor:
    """Counts requests and rejects; the windowed reject rate can trigger a repair (paper §7)."""

    def __init__(self, window: int = 1000, threshold: float = 0.05) -> None:
        if window < 1 or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"window must be >= 1 and threshold in [0, 1] (got {window}, {threshold})")
        self.window, self.threshold = window, threshold
        # The last ``window`` outcomes as a ring of 0/1 bytes: recording one touches a byte and two ints, which
        # stays cheap on the request path right after a model run, when little of the interpreter is in cache.
        self._ring = bytearray(window)
        self._pos = 0  # where the next outcome goes
        self._fill = 0  # outcomes in the ring (< window until it has gone round once)
        self._in_window = 0
        self._requests = 0
        self._rejects = 0
        self._alarm = False
        self._lock = threading.Lock()

    def record(self, rejected: list[bool]) -> None:
        """Add one batch's outcomes (True: rejected)."""
        with self._lock:
            ring, pos, window, in_window = self._ring, self._pos, self.window, self._in_window
            for r in rejected:
                bit = 1 if r else 0
                in_window += bit - ring[pos]
                ring[pos] = bit
                self._rejects += bit
                pos = pos + 1 if pos + 1 < window else 0
            self._pos, self._in_window = pos, in_window
            self._requests += len(rejected)
            fill = self._fill = min(self._fill + len(rejected), window)
            alarm = fill == window and in_window / fill > self.threshold
            if alarm != self._alarm:  # the paper's §7 signal: log both edges (nnoc_reject_alarm holds the state)
                self._alarm = alarm
                rate = self._in_window / fill
                if alarm:
                    log.warning(
                        "reject alarm: %.3f of the last %d requests rejected (> %s)", rate, fill, self.threshold
                    )
                else:
                    log.info("reject alarm cleared: %.3f of the last %d requests rejected", rate, fill)

    def snapshot(self) -> MonitorSnapshot:
        """Current totals and the windowed reject rate."""
        with self._lock:
            fill = self._fill
            rate = self._in_window / fill if fill else 0.0
            return MonitorSnapshot(
                self._requests, self._rejects, self.window, fill, rate, fill == self.window and rate > self.threshold
            )


class VersionCounts:
    """Inputs classified, rejected and failed per bundle version since this process started serving it.

    A version that is swapped in again (a rollout moved back and forth) starts from zero again, so the numbers
    describe its latest stretch; the trainer's registry adds the stretches up. A batch the previous version was
    still answering during a swap counts for that version.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, list[int]] = {}

    def start(self, version: int) -> None:
        """``version`` starts serving (a swap): its counts start from zero."""
        with self._lock:
            self._counts[version] = [0, 0, 0]

    def record(self, version: int, requests: int, rejects: int) -> None:
        """``requests`` inputs answered by ``version``, ``rejects`` of them rejected."""
        with self._lock:
            row = self._counts.setdefault(version, [0, 0, 0])
            row[0] += requests
            row[1] += rejects

    def error(self, version: int, requests: int) -> None:
        """A batch of ``requests`` inputs that ``version``'s models failed on (not a bad input: the models raised)."""
        with self._lock:
            row = self._counts.setdefault(version, [0, 0, 0])
            row[0] += requests
            row[2] += requests

    def get(self, version: int) -> tuple[int, int, int]:
        """(requests, rejects, errors) of ``version``'s latest stretch; zeros when it has not served."""
        with self._lock:
            row = self._counts.get(version, [0, 0, 0])
            return row[0], row[1], row[2]
