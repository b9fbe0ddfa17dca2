"""Model updates: subscribe to the trainer's model service, download new bundles in chunks, verify, load,
check on a canary input, then swap between two requests. The previous bundle stays on disk for rollback
and the last good one is cached, so the agent starts and serves without the trainer.

Cache layout (``cache_dir``)::

    versions/<version>/   verified bundle folders (primary.onnx, monitor.onnx, manifest.pb, manifest.json)
    state.json            {"current": V, "previous": V'}: written atomically
    staging/              downloads in progress (resumed from their partial files)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edge_agent.agent import Agent
from edge_agent.backoff import Backoff
from edge_agent.ensemble import Ensemble
from edge_agent.formats.bundle import BundleError, VerifiedBundle, verify_bundle
from edge_agent.formats.signing import check_rollback_order
from edge_agent.formats.tls import channel as tls_channel
from edge_agent.formats.tls import channel_credentials
from edge_agent.runtime import RuntimeConfig
from protos.nnoc.v1 import bundle_pb2, model_service_pb2, model_service_pb2_grpc

log = logging.getLogger(__name__)


class BundleCache:
    """Verified bundles on local disk and which one is current."""

    def __init__(self, root: Path, trusted: Mapping[str, Any] | None = None) -> None:
        self.root = root
        self.trusted = trusted  # when set, every bundle must carry a valid signature by one of these keys
        (root / "versions").mkdir(parents=True, exist_ok=True)
        (root / "staging").mkdir(parents=True, exist_ok=True)

    def _state(self) -> dict[str, int | None]:
        path = self.root / "state.json"
        if not path.is_file():
            return {"current": None, "previous": None}
        try:
            data = json.loads(path.read_text())
            return {"current": data.get("current"), "previous": data.get("previous")}
        except (OSError, ValueError) as e:
            log.error("unreadable %s (%s): starting without a cached bundle", path, e)
            return {"current": None, "previous": None}

    def _write_state(self, current: int | None, previous: int | None) -> None:
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps({"current": current, "previous": previous}))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.replace(self.root / "state.json")

    def path(self, version: int) -> Path:
        """Folder of a cached version."""
        return self.root / "versions" / str(version)

    def load(self, which: str = "current") -> VerifiedBundle | None:
        """The current (or previous) bundle, verified again; None when there is none or it fails."""
        version = self._state()[which]
        if version is None:
            return None
        try:
            return verify_bundle(self.path(int(version)), self.trusted)
        except BundleError as e:
            log.error("cached bundle v%s failed verification: %s", version, e)
            return None

    def cached(self, manifest: bundle_pb2.Manifest) -> VerifiedBundle | None:
        """The cached copy of the version ``manifest`` describes (the previous one, after a move back), verified
        again and with the very same manifest; None when there is no such copy."""
        path = self.path(int(manifest.version))
        if not (path / "manifest.pb").is_file():
            return None
        try:
            bundle = verify_bundle(path, self.trusted)
        except BundleError as e:
            log.warning("cached bundle v%d failed verification (%s): downloading it again", manifest.version, e)
            return None
        return bundle if bundle.manifest == manifest else None

    def install(self, staged: Path, version: int) -> Path:
        """Move a verified staged folder into ``versions/``; returns its new path."""
        dest = self.path(version)
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
        return dest

    def set_current(self, version: int) -> None:
        """Make ``version`` current; the old current becomes previous. Older versions are deleted."""
        state = self._state()
        previous = state["current"] if state["current"] != version else state["previous"]
        self._write_state(version, previous)
        keep = {str(version), str(previous)}
        for d in (self.root / "versions").iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def last_rollback(self) -> float:
        """When the newest signed rollback order this agent applied was issued (0: none)."""
        try:
            return float(json.loads((self.root / "rollback.json").read_text())["issued_at"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    def record_rollback(self, issued_at: float) -> None:
        """Remember a signed rollback order as applied (written atomically): no older order is taken again."""
        tmp = self.root / "rollback.json.tmp"
        tmp.write_text(json.dumps({"issued_at": issued_at}))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.replace(self.root / "rollback.json")

    def rollback(self) -> int:
        """Swap current and previous; returns the version now current."""
        state = self._state()
        if state["previous"] is None or not self.path(int(state["previous"])).is_dir():
            raise BundleError("no previous bundle to roll back to")
        self._write_state(int(state["previous"]), state["current"])
        return int(state["previous"])


@dataclass(frozen=True)
class UpdateConfig:
    """Where the model service is and which fleet this agent belongs to."""

    target: str  # host:port of the trainer's model service
    fleet: str
    device_id: str
    retries: int = 5  # per artifact, for broken downloads (each retry resumes at the bytes already there)
    # seconds between reconnection attempts: drawn with full jitter under a ceiling that doubles from backoff_start
    # up to backoff_max (edge_agent/backoff.py), so that a fleet cut off together does not come back together
    backoff_start: float = 0.5
    backoff_max: float = 10.0
    tls_ca: Path | None = None  # verify the model service with this CA (None: plaintext)
    tls_cert: Path | None = None  # this agent's certificate, for mutual TLS
    tls_key: Path | None = None

    def channel(self) -> grpc.Channel:
        """A channel to the model service, TLS when ``tls_ca`` is set."""
        creds = channel_credentials(self.tls_ca, self.tls_cert, self.tls_key) if self.tls_ca else None
        return tls_channel(self.target, creds)


@dataclass
class UpdateCounters:
    """What the updater did (for metrics, status and tests)."""

    applied: int = 0
    refused: int = 0
    reconnects: int = 0
    last_error: str = ""
    history: list[str] = field(default_factory=list)


def canary(ensemble: Ensemble) -> None:
    """Run a neutral input through a freshly loaded ensemble; raise when it does not answer sanely."""
    spec = ensemble.spec
    x = np.full((2, *[int(d) for d in spec.shape]), spec.min_value, dtype=np.dtype(spec.dtype))
    decision = ensemble.classify(x)
    if decision.labels.shape != (2,):
        raise BundleError(f"canary: expected 2 labels, got shape {decision.labels.shape}")


class Updater:
    """Background subscriber that keeps the agent on the fleet's current bundle."""

    def __init__(
        self, agent: Agent, cache: BundleCache, cfg: UpdateConfig, runtime: RuntimeConfig | None = None
    ) -> None:
        self.agent, self.cache, self.cfg, self.runtime = agent, cache, cfg, runtime
        self.counters = UpdateCounters()
        self._stop = threading.Event()
        self._channel: grpc.Channel | None = None
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)

    def start(self) -> Updater:
        """Start subscribing."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop subscribing (closes the channel, which ends the stream)."""
        self._stop.set()
        if self._channel is not None:
            self._channel.close()
        self._thread.join(timeout)

    def _run(self) -> None:
        backoff = Backoff(self.cfg.backoff_start, self.cfg.backoff_max)
        while not self._stop.is_set():
            self._channel = self.cfg.channel()
            stub = model_service_pb2_grpc.ModelServiceStub(self._channel)
            try:
                request = model_service_pb2.SubscribeRequest(
                    fleet=self.cfg.fleet,
                    device_id=self.cfg.device_id,
                    current_version=self.agent.ensemble.bundle.version,
                )
                for notice in stub.Subscribe(request, wait_for_ready=True):
                    backoff.reset()
                    self.handle(stub, notice)
                    if self._stop.is_set():
                        break
            except grpc.RpcError as e:
                if self._stop.is_set():
                    break
                self.counters.reconnects += 1
                delay = backoff.next()
                log.info("model service %s unreachable (%s); retrying in %.1f s", self.cfg.target, e.code(), delay)
            else:
                delay = backoff.next()  # the stream ended (the service stopped it): come back, spread out as well
            finally:
                self._channel.close()
            self._stop.wait(delay)

    def _refuse(self, version: int, why: str) -> None:
        self.counters.refused += 1
        self.counters.last_error = f"v{version}: {why}"
        self.counters.history.append(f"refused v{version}: {why}")
        log.error("refused bundle v%d: %s (still serving v%d)", version, why, self.agent.ensemble.bundle.version)

    def handle(self, stub: model_service_pb2_grpc.ModelServiceStub, notice: model_service_pb2.VersionNotice) -> bool:
        """Apply one version notice; returns whether the agent now serves it. Never raises on a bad bundle."""
        current = self.agent.ensemble.bundle
        version = int(notice.version)
        if notice.fleet != self.cfg.fleet:
            self._refuse(version, f"notice for fleet {notice.fleet!r}, this agent serves {self.cfg.fleet!r}")
            return False
        if version == current.version:
            return True
        order = None
        if version < current.version:
            if self.cache.trusted is not None:  # going back needs the operator's signed order, not a flag
                try:
                    order = self._rollback_order(notice, current.version)
                except BundleError as e:
                    self._refuse(version, f"older than the current v{current.version}: {e}")
                    return False
            elif not notice.rollback:
                self._refuse(version, f"older than the current v{current.version} and not marked as a rollback")
                return False
        cur_spec, new_spec = current.manifest.input_spec, notice.manifest.input_spec
        if list(cur_spec.shape) != list(new_spec.shape) or cur_spec.dtype != new_spec.dtype:
            self._refuse(version, f"input spec {list(new_spec.shape)} {new_spec.dtype} differs from the fleet's")
            return False
        staged = self.cache.root / "staging" / str(version)
        cached = self.cache.cached(notice.manifest)
        try:
            if cached is None:
                self.download(stub, notice, staged)
                bundle = verify_bundle(staged, self.cache.trusted)
            else:  # a move back to the version kept on disk: nothing to download
                bundle = cached
            if bundle.version != version:
                raise BundleError(f"manifest says v{bundle.version}, the notice v{version}")
            ensemble = Ensemble(bundle, self.runtime)
            canary(ensemble)
        except (BundleError, ValueError, OSError, grpc.RpcError) as e:
            shutil.rmtree(staged, ignore_errors=True)  # a bad download is not resumed: fetch it anew next time
            self._refuse(version, str(e) if not isinstance(e, grpc.RpcError) else f"download failed: {e.code()}")
            return False
        if cached is None:
            path = self.cache.install(staged, version)
            ensemble.bundle = VerifiedBundle(path, bundle.manifest)  # sessions are in memory; files moved
        self.agent.swap(ensemble)
        self.cache.set_current(version)
        if order is not None:
            self.cache.record_rollback(order.issued_at)
        self.counters.applied += 1
        self.counters.history.append(f"applied v{version}" + (" (cached)" if cached is not None else ""))
        log.info("now serving bundle v%d (was v%d)%s", version, current.version, ", from the cache" if cached else "")
        return True

    def _rollback_order(self, notice: model_service_pb2.VersionNotice, serving: int) -> model_service_pb2.RollbackOrder:
        """The notice's signed rollback order when it applies to this agent now; :class:`BundleError` otherwise."""
        assert self.cache.trusted is not None
        order = check_rollback_order(notice.rollback_order, self.cache.trusted)
        now = time.time()
        if order.fleet != self.cfg.fleet or order.version != notice.version:
            raise BundleError(f"the signed order is for {order.fleet!r} v{order.version}, not this notice")
        if order.from_version != serving:
            raise BundleError(f"the signed order goes back from v{order.from_version}, this agent serves v{serving}")
        if not order.issued_at <= now + 300 or order.expires_at < now:
            raise BundleError("the signed rollback order has expired (or is dated in the future)")
        if order.issued_at <= self.cache.last_rollback():
            raise BundleError("the signed rollback order is not newer than one this agent applied (a replay)")
        return order

    def download(
        self, stub: model_service_pb2_grpc.ModelServiceStub, notice: model_service_pb2.VersionNotice, staged: Path
    ) -> None:
        """Fetch every artifact of ``notice`` into ``staged``, resuming partial files after a broken stream."""
        download_bundle(stub, notice, staged, self.cfg.retries)


def download_bundle(
    stub: model_service_pb2_grpc.ModelServiceStub,
    notice: model_service_pb2.VersionNotice,
    staged: Path,
    retries: int = 5,
) -> None:
    """Fetch every artifact of ``notice`` into ``staged``, resuming partial files after a broken stream."""
    staged.mkdir(parents=True, exist_ok=True)
    manifest: bundle_pb2.Manifest = notice.manifest
    for art in manifest.artifacts:
        if Path(art.name).name != art.name:
            raise BundleError(f"artifact name {art.name!r} is not a plain file name")
        path = staged / art.name
        for attempt in range(retries + 1):
            have = path.stat().st_size if path.exists() else 0
            if have > art.size:
                path.unlink()
                have = 0
            if have == art.size:
                break
            if attempt == 0 and have:  # a partial file an earlier run of this agent left (killed mid-download)
                log.info("resuming %s of v%d at byte %d of %d", art.name, manifest.version, have, art.size)
            try:
                request = model_service_pb2.DownloadRequest(
                    fleet=manifest.fleet, version=manifest.version, name=art.name, offset=have
                )
                with path.open("ab") as f:
                    for chunk in stub.Download(request, timeout=60):
                        if chunk.offset != f.tell():
                            raise BundleError(f"{art.name}: chunk at {chunk.offset}, expected {f.tell()}")
                        if f.tell() + len(chunk.data) > art.size:  # checked before the bytes touch the disk
                            raise BundleError(f"{art.name}: the service sends more than its {art.size} bytes")
                        f.write(chunk.data)
            except grpc.RpcError as e:
                if attempt == retries:
                    raise
                log.warning("download of %s broke at %d bytes (%s); resuming", art.name, have, e.code())
                time.sleep(min(0.1 * 2**attempt, 2.0))
    (staged / "manifest.pb").write_bytes(manifest.SerializeToString(deterministic=True))


def bootstrap(cache: BundleCache, cfg: UpdateConfig, timeout: float) -> VerifiedBundle:
    """First start with an empty cache: fetch the fleet's current bundle from the model service and cache it.

    Waits up to ``timeout`` seconds for the service (it may start after the agent); raises BundleError.
    """
    deadline = time.monotonic() + timeout
    with cfg.channel() as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = model_service_pb2.SubscribeRequest(fleet=cfg.fleet, device_id=cfg.device_id, current_version=0)
        try:
            stream = stub.Subscribe(request, wait_for_ready=True, timeout=max(1.0, deadline - time.monotonic()))
            notice = next(iter(stream))
            stream.cancel()
        except grpc.RpcError as e:
            raise BundleError(f"no bundle cached and the model service {cfg.target} gave none: {e.code()}") from e
        except StopIteration:
            raise BundleError(f"fleet {cfg.fleet!r} has no current version on {cfg.target}") from None
        if notice.fleet != cfg.fleet:
            raise BundleError(f"the model service answered for fleet {notice.fleet!r}, not {cfg.fleet!r}")
        staged = cache.root / "staging" / str(notice.version)
        try:
            download_bundle(stub, notice, staged, cfg.retries)
            bundle = verify_bundle(staged, cache.trusted)
        except (BundleError, OSError, grpc.RpcError) as e:
            shutil.rmtree(staged, ignore_errors=True)
            raise BundleError(f"first download of v{notice.version} failed: {e}") from e
    path = cache.install(staged, bundle.version)
    cache.set_current(bundle.version)
    log.info("first start: fetched %s v%d from %s", cfg.fleet, bundle.version, cfg.target)
    return VerifiedBundle(path, bundle.manifest)
