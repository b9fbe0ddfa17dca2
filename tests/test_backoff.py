"""Reconnection delays with jitter: a fleet cut off at one instant comes back spread out, not in lockstep."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from edge_agent.backoff import Backoff, stretch

AGENTS = 2000


def attempts(jitter: bool, horizon: float = 60.0) -> Counter[int]:
    """When 2,000 agents cut off at t=0 try again while the service stays down: tries per 100 ms slot."""
    slots: Counter[int] = Counter()
    for agent in range(AGENTS):
        backoff = Backoff(0.5, 10.0, random.Random(agent))
        t = 0.0
        while True:
            t += backoff.next() if jitter else backoff.ceiling()
            if not jitter:
                backoff.failures += 1
            if t > horizon:
                break
            slots[int(t * 10)] += 1
    return slots


def test_full_jitter_spreads_a_fleet_that_plain_doubling_keeps_in_lockstep() -> None:
    plain, jittered = attempts(jitter=False), attempts(jitter=True)
    assert max(plain.values()) == AGENTS  # every agent knocks in the same 100 ms, again and again
    assert all(n == AGENTS for n in plain.values())
    # jittered: the first tries spread over the first 0.5 s, and once the ceiling has grown (after 5 s) no 100 ms
    # holds more than 5% of the fleet (2,000 in one slot without jitter)
    assert max(jittered.values()) < AGENTS * 0.3
    assert max(n for slot, n in jittered.items() if slot >= 50) < AGENTS * 0.05
    # the same load on average: the jittered delays are half the ceiling on average, so about as many tries or more
    assert sum(jittered.values()) >= sum(plain.values())


def test_delays_stay_under_a_doubling_ceiling_and_reset() -> None:
    b = Backoff(0.5, 10.0, random.Random(0))
    ceilings = []
    for _ in range(8):
        ceilings.append(b.ceiling())
        assert 0 <= b.next() <= ceilings[-1]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    b.reset()
    assert b.ceiling() == 0.5
    with pytest.raises(ValueError, match="start <= cap"):
        Backoff(5.0, 1.0)


def test_stretch_lengthens_a_server_asked_wait_by_up_to_half() -> None:
    rng = random.Random(1)
    waits = [stretch(30.0, rng) for _ in range(1000)]
    assert min(waits) >= 30.0 and max(waits) <= 45.0 and max(waits) - min(waits) > 10.0
