"""A dynamic batcher in front of the agent (as Triton's): frames waiting from many sources and the inference
endpoint's requests go through the ensemble as one batch, up to ``max_batch`` inputs, waiting at most
``max_wait`` seconds after the first arrival for more.

Frames are preprocessed (the bundle's colour conversion and resize) in the batching thread as a batch is taken:
a source's thread only decodes, and a live frame that a newer one replaces is never preprocessed.

Files deliver with back-pressure (a file source waits while its queue is full: nothing is dropped); a live
source has a one-frame slot, and a newer frame replaces an unread one (the source counts the drop). Requests
are never split, and the endpoint's requests go first: a caller is waiting on each.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from edge_agent.agent import Agent, Origin
from edge_agent.ensemble import Decision, InputError, check_input, image_to_input, to_model_image
from edge_agent.formats.preprocess import Yuv420
from edge_agent.formats.spec import preprocess_of
from edge_agent.sources import Frame, SourceStats

log = logging.getLogger(__name__)

Observer = Callable[[str, float, bool], None]  # (origin, seconds, ok): the agent's metrics


@dataclass
class _Request:
    x: np.ndarray
    images: np.ndarray | None
    future: Future[tuple[Decision, int]] = field(default_factory=Future)


@dataclass
class _Queue:
    frames: deque[Frame]  # as decoded (preprocessed when taken into a batch)
    capacity: int
    stats: SourceStats


class Batcher:
    """Collect, batch, classify, hand results back. ``start()`` runs the batching thread; ``stop()`` ends it."""

    def __init__(
        self,
        agent: Agent,
        max_batch: int = 32,
        max_wait: float = 0.002,
        decisions: Path | None = None,
        observe: Observer | None = None,
    ) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError("max_batch must be at least 1 and max_wait at least 0")
        self.agent, self.max_batch, self.max_wait = agent, max_batch, max_wait
        self._cond = threading.Condition()
        self._requests: deque[_Request] = deque()
        self._queues: dict[str, _Queue] = {}
        self._order: list[str] = []  # round-robin over sources
        self._next = 0
        self._stop = threading.Event()
        self._observe = observe
        self._decisions: IO[str] | None = decisions.open("a", buffering=1) if decisions is not None else None
        self.batches = 0
        self.batched_inputs = 0
        self.latency: dict[str, deque[float]] = {}  # per source, capture -> decision seconds (last 10,000)
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)

    # -- the producers ---------------------------------------------------------------------------------------

    def add_source(self, source_id: str, stats: SourceStats, live: bool) -> None:
        """Register a source before it delivers (live: one-frame slot; file: ``max_batch`` frames)."""
        with self._cond:
            self._queues[source_id] = _Queue(deque(), 1 if live else max(2, self.max_batch), stats)
            self._order.append(source_id)
            self.latency[source_id] = deque(maxlen=10_000)

    def deliver(self, frame: Frame, may_block: bool) -> bool:
        """A source's frame, as decoded: the batching thread preprocesses it when it takes it into a batch, so the
        source's thread only reads (a decoder with frame threads waits on that thread: 0.79x -> 0.80-0.84x of decoding
        alone on a 720p file, BENCHMARKS.md) and a live frame that a newer one replaces costs no preprocessing.

        ``may_block`` (files): wait while the queue is full; returns True. Otherwise (live) a full slot's frame is
        replaced and False is returned (the source counts a drop).
        """
        with self._cond:
            q = self._queues[frame.source]
            replaced = False
            while len(q.frames) >= q.capacity:
                if not may_block:
                    q.frames.popleft()
                    replaced = True
                    break
                if self._stop.is_set():
                    return True
                self._cond.wait(0.1)
            waiting = self._waiting()
            q.frames.append(frame)
            if waiting == 0 or waiting + 1 >= self.max_batch:  # else the batcher wakes at its deadline anyway
                self._cond.notify_all()
        return not replaced

    def submit(self, x: np.ndarray, images: np.ndarray | None = None) -> Future[tuple[Decision, int]]:
        """An endpoint request (checked here, so a bad one fails alone); its future gives (decision, version)."""
        x = check_input(x, self.agent.ensemble.spec)
        request = _Request(x, images)
        with self._cond:
            if self._stop.is_set():
                raise RuntimeError("the agent is stopping")
            self._requests.append(request)
            self._cond.notify_all()
        return request.future

    def classify(self, x: np.ndarray, images: np.ndarray | None = None, timeout: float = 60.0) -> tuple[Decision, int]:
        """Submit and wait (what the endpoint calls)."""
        return self.submit(x, images).result(timeout)

    # -- the batching thread ---------------------------------------------------------------------------------

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(10)
        with self._cond:
            for r in self._requests:
                r.future.set_exception(RuntimeError("the agent is stopping"))
            self._requests.clear()
        if self._decisions is not None:
            self._decisions.close()
            self._decisions = None

    def pending(self) -> int:
        """Inputs waiting (frames and request rows)."""
        with self._cond:
            return self._waiting()

    def _waiting(self) -> int:
        return sum(len(q.frames) for q in self._queues.values()) + sum(len(r.x) for r in self._requests)

    def _take(self) -> tuple[list[_Request], list[Frame]]:
        """Requests first (whole), then frames round-robin across sources, up to ``max_batch`` inputs."""
        requests: list[_Request] = []
        room = self.max_batch
        while self._requests and (not requests or len(self._requests[0].x) <= room):
            r = self._requests.popleft()
            requests.append(r)
            room -= len(r.x)
        frames: list[Frame] = []
        while room > 0 and any(q.frames for q in self._queues.values()):
            sid = self._order[self._next % len(self._order)]
            self._next += 1
            q = self._queues[sid]
            if q.frames:
                frames.append(q.frames.popleft())
                room -= 1
        return requests, frames

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting() and not self._stop.is_set():
                    self._cond.wait(0.5)
                if self._stop.is_set() and not self._waiting():
                    return
                deadline = time.monotonic() + self.max_wait
                while self._waiting() < self.max_batch and not self._stop.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                requests, frames = self._take()
                self._cond.notify_all()  # room for blocked file sources
            if requests or frames:
                self._run(requests, frames)

    def _preprocess(self, frames: list[Frame]) -> list[tuple[Frame, np.ndarray]]:
        """Each frame with the model's image; a picture the preprocessing refuses (not 8-bit, or a channel count other
        than 1 or 3) is left out and counted as its source's decode error, the others go on."""
        spec = self.agent.ensemble.spec
        out: list[tuple[Frame, np.ndarray]] = []
        for f in frames:
            picture = f.picture if isinstance(f.picture, Yuv420) else f.picture[None]  # a batch of one
            try:
                image = to_model_image(picture, spec)[0]
            except InputError as e:
                stats = self._queues[f.source].stats
                stats.decode_errors += 1
                stats.last_error = str(e)[:200]
                log.warning("source %s frame %d refused: %s", f.source, f.position, e)
                continue
            out.append((f, image))
        return out

    def _run(self, requests: list[_Request], taken: list[Frame]) -> None:
        spec = self.agent.ensemble.spec
        t0 = time.perf_counter()
        frames = self._preprocess(taken)
        if not requests and not frames:
            return
        try:
            parts_x = [r.x for r in requests]
            parts_images = [r.images for r in requests]
            if frames:
                images = np.stack([image for _, image in frames])
                parts_x.append(image_to_input(images, spec))
                parts_images.append(images)
            x = np.concatenate(parts_x) if len(parts_x) > 1 else parts_x[0]
            all_images = None  # tensors only: the agent recovers the images of the rejected ones alone
            if any(p is not None for p in parts_images):
                recover = preprocess_of(spec).to_image
                all_images = np.concatenate(
                    [recover(xp) if p is None else p for xp, p in zip(parts_x, parts_images, strict=True)]
                )
            origins: list[Origin | None] = [None] * sum(len(r.x) for r in requests)
            origins += [(f.source, f.captured_at, f.position) for f, _ in frames]
            decision, version = self.agent.classify(x, all_images, origins)
        except Exception as e:  # InputError after a swap changed the input, or a runtime failure: tell everyone
            log.warning("a batch of %d request(s) and %d frame(s) failed: %s", len(requests), len(frames), e)
            for r in requests:
                r.future.set_exception(e if isinstance(e, InputError) else RuntimeError(str(e)))
            for f, _ in frames:
                self._queues[f.source].stats.classify_errors += 1
            if frames and self._observe is not None:
                self._observe("source", 0.0, False)
            return
        seconds = time.perf_counter() - t0
        self.batches += 1
        self.batched_inputs += len(x)
        start = 0
        for r in requests:
            n = len(r.x)
            r.future.set_result((decision.part(start, start + n), version))
            start += n
        if frames:
            self._record_frames(frames, decision.part(start, start + len(frames)), version)
            if self._observe is not None:
                self._observe("source", seconds, True)

    def _record_frames(self, frames: list[tuple[Frame, np.ndarray]], decision: Decision, version: int) -> None:
        now = time.time()
        rejected = decision.rejected.tolist()
        for (f, _), r in zip(frames, rejected, strict=True):
            q = self._queues[f.source]
            q.stats.classified += 1
            q.stats.rejected += r
            self.latency[f.source].append(now - f.captured_at)
        if self._decisions is None and not log.isEnabledFor(logging.DEBUG):
            return  # the rows below are for the decisions file and debug logs only
        columns = zip(decision.labels.tolist(), decision.primary.tolist(), decision.monitor.tolist(),
                      decision.score.tolist(), strict=True)  # fmt: skip
        for (f, _), r, (label, primary, monitor, score) in zip(frames, rejected, columns, strict=True):
            row = {
                "source": f.source,
                "position": f.position,
                "captured_at": round(f.captured_at, 6),
                "label": label,
                "rejected": r,
                "primary": primary,
                "monitor": monitor,
                "score": round(score, 6),
                "version": version,
            }
            log.debug("frame %s", row)
            if self._decisions is not None:
                self._decisions.write(json.dumps(row) + "\n")


def source_snapshot(batcher: Batcher | None, stats: dict[str, SourceStats]) -> dict[str, Any]:
    """Per-source counters and capture-to-decision latency percentiles (status file, ``nnoc-edge status``)."""
    out: dict[str, Any] = {}
    for sid, st in stats.items():
        row = st.as_dict()
        lat = list(batcher.latency.get(sid, ())) if batcher is not None else []
        if lat:
            row["latency_p50_s"] = round(float(np.percentile(lat, 50)), 4)
            row["latency_p99_s"] = round(float(np.percentile(lat, 99)), 4)
        out[sid] = row
    return out
