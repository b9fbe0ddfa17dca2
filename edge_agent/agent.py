"""The agent's request path: classify with the ensemble, hand every reject to the spool's writer, count."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from edge_agent.ensemble import Decision, Ensemble, InputError
from edge_agent.formats.spec import preprocess_of
from edge_agent.formats.wire import build_header
from edge_agent.monitor import RejectMonitor, VersionCounts
from edge_agent.spool import Items, Spool, SpoolWriter
from edge_agent.uplink import Uplink
from protos.nnoc.v1 import quarantine_pb2

Origin = tuple[str, float, int]  # a source frame's (source id, capture time in epoch seconds, position)


class Agent:
    """Ensemble + durable quarantine + monitor. The ensemble can be swapped between two requests."""

    def __init__(
        self, ensemble: Ensemble, spool: Spool, monitor: RejectMonitor, device_id: str, uplink: Uplink | None = None
    ) -> None:
        self._ensemble = ensemble
        self._swap_lock = threading.Lock()
        self.spool, self.monitor, self.device_id, self.uplink = spool, monitor, device_id, uplink
        self.writer = SpoolWriter(spool, stored=self._stored)
        self.versions = VersionCounts()
        self.nonfinite = 0  # inputs rejected because a model's logits or the score were NaN or infinite

    @property
    def unspooled(self) -> int:
        """Rejected inputs the spool could not take (its bound with reject-new, a full disk)."""
        return self.writer.unspooled

    def _stored(self) -> None:
        if self.uplink is not None:
            self.uplink.notify()

    def close(self) -> None:
        """Commit the rejects still pending (durability ``deferred``) and stop the spool's writer."""
        self.writer.close()

    @property
    def ensemble(self) -> Ensemble:
        """The ensemble serving now."""
        return self._ensemble

    def swap(self, ensemble: Ensemble) -> Ensemble:
        """Serve ``ensemble`` from the next request on; returns the previous one."""
        with self._swap_lock:
            self.versions.start(ensemble.bundle.version)
            old, self._ensemble = self._ensemble, ensemble
        return old

    def stats(self) -> quarantine_pb2.AgentStats:
        """A snapshot for the collector: requests, rejects, windowed reject rate, spool, version."""
        snap = self.monitor.snapshot()
        ensemble = self._ensemble
        requests, rejects, errors = self.versions.get(ensemble.bundle.version)
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
            version_requests=requests,
            version_rejects=rejects,
            version_errors=errors,
        )

    def classify(
        self, x: np.ndarray, images: np.ndarray | None = None, origins: Sequence[Origin | None] | None = None
    ) -> tuple[Decision, int]:
        """Classify a batch (model-input tensors); rejected inputs go to the spool per its durability.

        ``images``: the model's uint8 images ``x`` was made from (N, C, H, W), when the caller has them (raw
        frames); otherwise they are recovered from ``x`` through the preprocessing. The quarantine carries the
        image, not the float tensor: a quarter of the bytes, and what the trainer's repair works on.
        ``origins``: per input, (source id, capture time, position) of a source's frame, or None.
        Under durability ``power``/``process`` the rejects are committed before this returns; under ``deferred``
        within the spool's flush interval. Returns the decision and the bundle version that made it. Raises
        ``InputError`` for a bad batch.
        """
        ensemble = self._ensemble  # one version answers the whole batch, even if a swap lands meanwhile
        version = ensemble.bundle.version
        try:
            decision = ensemble.classify(x)
        except InputError:
            raise
        except Exception:  # the models failed on a good input: the version's fault, counted for rollouts
            self.versions.error(version, len(x))
            raise
        # Plain Python on a list from here: right after a run, onnxruntime has pushed the interpreter's and
        # numpy's code out of the caches, and numpy reductions on these few flags cost several microseconds each
        # (a tenth of a small model's call at batch 1).
        flags = decision.rejected.tolist()
        rejected = [i for i, flag in enumerate(flags) if flag] if True in flags else []
        if rejected:
            if decision.nonfinite.any():  # fail closed, counted apart: a model that is not a number there
                self.nonfinite += int(decision.nonfinite.sum())
            kept = images[rejected] if images is not None else x[rejected]  # copies: the caller may reuse its buffers
            picked = [origins[i] if origins is not None else None for i in rejected]
            self.writer.submit(lambda: self._rows(ensemble, decision, rejected, kept, images is not None, picked))
        self.monitor.record(flags)
        self.versions.record(version, len(flags), len(rejected))
        return decision, version

    def _rows(
        self,
        ensemble: Ensemble,
        decision: Decision,
        rejected: list[int],
        kept: np.ndarray,
        are_images: bool,
        origins: list[Origin | None],
    ) -> Items:
        """The spool rows (header, image bytes) of the rejected inputs, built on the writer's thread."""
        manifest = ensemble.bundle.manifest
        if not are_images:
            kept = preprocess_of(manifest.input_spec).to_image(kept)
        rows = []
        for i, image, origin in zip(rejected, kept, origins, strict=True):
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
            rows.append((header.SerializeToString(), np.ascontiguousarray(image).tobytes()))
        return rows
