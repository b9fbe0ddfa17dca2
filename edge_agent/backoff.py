"""Reconnection delays with jitter, so that a fleet does not come back in lockstep.

When the trainer restarts, every agent's subscription breaks at the same instant. Plain doubling delays
(0.2, 0.4, 0.8 s ...) bring all of them back at the same instants again: 2,000 agents knock together, over and
over, until the cap. "Full jitter" (each delay drawn uniformly between 0 and the doubled delay, as AWS's
architecture blog measured against equal and decorrelated jitter) spreads them over the whole window from the
second try on, at the same mean load. The ZeroMQ uplink gets libzmq's own jitter (each reconnection interval plus
a random share of ``ZMQ_RECONNECT_IVL``); the collector's "wait" answers are stretched here by :func:`stretch`.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays for a reconnection loop: ``next()`` after each failure, ``reset()`` after a success.

    The n-th delay (from 0) is drawn uniformly from ``[0, min(cap, start * 2**n)]``.
    """

    def __init__(self, start: float, cap: float, rng: random.Random | None = None) -> None:
        if not 0 < start <= cap:
            raise ValueError(f"backoff: need 0 < start <= cap, got start {start}, cap {cap}")
        self.start, self.cap = start, cap
        self.rng = rng or random.Random()
        self.failures = 0

    def ceiling(self) -> float:
        """The largest delay the next ``next()`` may return."""
        return min(self.cap, self.start * 2.0 ** min(self.failures, 62))

    def next(self) -> float:
        """The delay before the next attempt (one more failure counted)."""
        delay = self.rng.uniform(0.0, self.ceiling())
        self.failures += 1
        return delay

    def reset(self) -> None:
        """A success: the next failure starts from ``start`` again."""
        self.failures = 0


def stretch(seconds: float, rng: random.Random | None = None, spread: float = 0.5) -> float:
    """``seconds`` lengthened by a random share up to ``spread``: for waits a server asked for, which every client
    would otherwise end at the same time."""
    return seconds * (1.0 + (rng or random).uniform(0.0, spread))
