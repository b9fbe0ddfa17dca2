"""The agent's request path: classify with the ensemble, spool every reject before answering, count."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from edge_agent.ensemble import Decision, Ensemble
from edge_agent.formats.spec import preprocess_of
from edge_agent.formats.wire import build_header
from edge_agent.monitor import RejectMonitor
from edge_agent.spool import Spool, SpoolFull
from edge_agent.uplink import Uplink
from protos.nnoc.v1 import quarantine_pb2

log = logging.getLogger(__name__)

Origin = tuple[str, float, int]  # a source frame's (source id, capture time in epoch seconds, position)


class Agent:
    """Ensemble + durable quarantine + monitor. The ensemble can be swapped between two requests."""

    def __init__(
        self, ensemble: Ensemble, spool: Spool, monitor: RejectMonitor, device_id: str, uplink: Uplink | None = None
    ) -> None:
        self._ensemble = ensemble
        self._swap_lock = threading.Lock()
        self.spool, self.monitor, self.device_id, self.uplink = spool, monitor, device_id, uplink
        self.unspooled = 0  # rejected inputs the spool could not take (its bound with reject-new, or a full disk)

    @property
    def ensemble(self) -> Ensemble:
        """The ensemble serving now."""
        return self._ensemble

    def swap(self, ensemble: Ensemble) -> Ensemble:
        """Serve ``ensemble`` from the next request on; returns the previous one."""
        with self._swap_lock:
            old, self._ensemble = self._ensemble, ensemble
        return old

    def stats(self) -> quarantine_pb2.AgentStats:
        """A snapshot for the collector: requests, rejects, windowed reject rate, spool, version."""
        snap = self.monitor.snapshot()
        ensemble = self._ensemble
        return quarantine_pb2.AgentStats(
            device_id=self.device_id,
            fleet=ensemble.bundle.manifest.fleet,
            bundle_version=ensemble.bundle.version,
            requests=snap.requests,
            rejects=snap.rejects,
            window_reject_rate=snap.window_reject_rate,
            window_size=snap.window_size,
            spool_depth=self.spool.depth(),
            spool_dropped=self.spool.counter("dropped") + self.spool.counter("rejected_full") + self.spool.disk_full,
            provider=ensemble.provider,
        )

    def classify(
        self, x: np.ndarray, images: np.ndarray | None = None, origins: Sequence[Origin | None] | None = None
    ) -> tuple[Decision, int]:
        """Classify a batch (model-input tensors); rejected inputs are spooled durably before this returns.

        ``images``: the model's uint8 images ``x`` was made from (N, C, H, W), when the caller has them (raw
        frames); otherwise they are recovered from ``x`` through the preprocessing. The quarantine carries the
        image, not the float tensor: a quarter of the bytes, and what the trainer's repair works on.
        ``origins``: per input, (source id, capture time, position) of a source's frame, or None.
        Returns the decision and the bundle version that made it. Raises ``InputError`` for a bad batch.
        """
        ensemble = self._ensemble  # one version answers the whole batch, even if a swap lands meanwhile
        decision = ensemble.classify(x)
        if decision.rejected.any():
            rejected = np.flatnonzero(decision.rejected)
            manifest = ensemble.bundle.manifest
            kept = images[rejected] if images is not None else preprocess_of(manifest.input_spec).to_image(x[rejected])
            items = []
            for i, image in zip(rejected, kept, strict=True):
                origin = origins[int(i)] if origins is not None else None
                source, captured_at, position = origin if origin is not None else ("", None, None)
                header = build_header(
                    self.device_id,
                    manifest.fleet,
                    manifest.version,
                    image.shape,
                    "uint8",
                    decision.primary[i],
                    decision.monitor[i],
                    source_id=source,
                    captured_at=captured_at,
                    position=position,
                    reject_score=float(decision.score[i]),
                )
                items.append((header.SerializeToString(), np.ascontiguousarray(image).tobytes()))
            try:
                self.spool.put_many(items)
            except SpoolFull as e:
                # The inputs are still refused (label -1); only their quarantine copy is lost, counted by the
                # spool (rejected_full, disk_full) and here, and logged. Serving goes on.
                self.unspooled += len(items)
                log.warning("%d rejected input(s) not quarantined: %s", len(items), e)
            if self.uplink is not None:
                self.uplink.notify()
        self.monitor.record(decision.rejected.tolist())
        return decision, ensemble.bundle.version
