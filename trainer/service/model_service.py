"""The trainer's gRPC model service (``protos/nnoc/v1/model_service.proto``) and ``grpc.health.v1``.

Agents subscribe to their fleet and get a notice with the manifest whenever the fleet's current version
changes; they download artifacts in chunks of at most 1 MiB, from any offset (a broken download resumes).
Operators list fleets, read a fleet's status (versions, quarantine sizes, devices, jobs, history), publish a
stored version and roll back. The store on disk is the source of truth: a watcher thread reads each fleet's
``fleet.json`` and pushes a notice when the current version changes, whoever changed it (this service, the
job runner, or ``nnoc-trainer fleet`` in another process).
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edge_agent.formats.bundle import read_manifest
from edge_agent.formats.tls import server_credentials
from edge_agent.options import flag, positive, safe_name
from edge_agent.ports import GRPC_EXCLUSIVE, PortError
from protos.nnoc.v1 import model_service_pb2 as ms
from protos.nnoc.v1 import model_service_pb2_grpc as ms_grpc
from trainer.service.collector import quarantine_size
from trainer.service.registry import Registry
from trainer.service.store import ModelStore, StoreError

log = logging.getLogger(__name__)

CHUNK_MAX = 1 << 20
SERVICE_NAME = "nnoc.v1.ModelService"


def agent_fleet(text: str) -> tuple[str, str]:
    """``CERT-NAME=FLEET`` (a ``--agent-fleet`` value) -> (pattern, fleet)."""
    pattern, sep, fleet = text.partition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected CERT-NAME=FLEET (a pattern such as cam-*=fmnist), got {text!r}")
    return pattern, safe_name(fleet)


@dataclass(frozen=True)
class ServiceConfig:
    """Where the service listens and how it streams."""

    listen: str = flag("127.0.0.1:50051", "gRPC model service address (port 0: any)")
    chunk_size: int = flag(CHUNK_MAX, "download chunk bytes (at most 1 MiB)", type=positive)
    max_workers: int = 64  # each open Subscribe stream holds one worker thread
    watch_interval: float = 0.2  # seconds between reads of the fleets' state
    # server certificate (PEM); None: plaintext (the CLI wants --insecure for that)
    tls_cert: Path | None = flag(None, "model service TLS certificate (PEM)", type=Path)
    tls_key: Path | None = flag(None, "model service TLS key (PEM)", type=Path)
    tls_client_ca: Path | None = flag(None, "mutual TLS: CA that signed the agents' certs", type=Path)
    # Authorization. Operator RPCs (ListFleets, FleetStatus, Publish, Rollback) need a client certificate whose
    # name (CN) is one of `operators`; without mutual TLS there is no identity, so they are refused unless
    # `insecure_operators` allows every caller (warned at start).
    operators: tuple[str, ...] = flag(
        (), "client certificate names (CN) allowed to call ListFleets, FleetStatus, Publish and Rollback", nargs="+"
    )
    insecure_operators: bool = flag(False, "without client certificates: let any caller use the operator RPCs (warned)")
    # (certificate name pattern, fleet): where given, an agent's certificate may subscribe to and download from
    # the fleets its name maps to only (fnmatch patterns: "cam-*"). Operators may read every fleet.
    agent_fleets: tuple[tuple[str, str], ...] = flag(
        (),
        "CERT-NAME=FLEET (fnmatch pattern, repeat): agents may subscribe and download their fleets only",
        name="--agent-fleet",
        type=agent_fleet,
        action="append",
    )


@dataclass(frozen=True)
class Caller:
    """Who called: the client certificate's name under mutual TLS (None without one) and its rights."""

    name: str | None
    operator: bool

    def describe(self) -> str:
        """For logs and the fleet history."""
        return f"{self.name!r}" if self.name else "a caller without a client certificate"


def certificate_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the peer's verified client certificate, or None (plaintext, TLS without client certs)."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else None


class ModelServicer(ms_grpc.ModelServiceServicer):
    """Subscribe, Download and the operator RPCs over a :class:`ModelStore`."""

    def __init__(self, store: ModelStore, registry: Registry, quarantine_root: Path, cfg: ServiceConfig) -> None:
        if not 0 < cfg.chunk_size <= CHUNK_MAX:
            raise ValueError(f"chunk size must lie in (0, {CHUNK_MAX}], got {cfg.chunk_size}")
        self.store, self.registry, self.quarantine_root, self.cfg = store, registry, quarantine_root, cfg
        self._lock = threading.Lock()
        self._subscribers: dict[str, set[queue.Queue[ms.VersionNotice | None]]] = defaultdict(set)
        self._seen: dict[str, tuple[int | None, str]] = {}
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="store-watcher", daemon=True)
        self.denied: dict[str, int] = defaultdict(int)  # refused calls per RPC (PERMISSION_DENIED)

    # -- authorization -------------------------------------------------------------------------------------

    def caller(self, context: grpc.ServicerContext) -> Caller:
        """Who is calling, and whether that is an operator."""
        name = certificate_name(context)
        if name is None:
            return Caller(None, self.cfg.insecure_operators)
        return Caller(name, name in self.cfg.operators)

    def _deny(self, context: grpc.ServicerContext, rpc: str, caller: Caller, why: str) -> None:
        self.denied[rpc] += 1
        log.warning("denied %s to %s: %s", rpc, caller.describe(), why)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

    def _operator(self, context: grpc.ServicerContext, rpc: str) -> Caller:
        """The caller when it is an operator; otherwise the call ends with PERMISSION_DENIED and the reason."""
        caller = self.caller(context)
        if not caller.operator:
            if caller.name is None:
                why = (
                    f"{rpc} is an operator call and this caller has no client certificate: use mutual TLS with an "
                    "operator certificate (serve --tls-client-ca and --operators NAME), or start serve with "
                    "--insecure-operators"
                )
            else:
                why = f"certificate {caller.name!r} is not an operator (serve --operators names who may call {rpc})"
            self._deny(context, rpc, caller, why)
        return caller

    def _agent(self, context: grpc.ServicerContext, rpc: str, fleet: str, device_id: str | None = None) -> Caller:
        """The caller when it may read ``fleet`` (and, under mutual TLS, speaks as ``device_id``)."""
        caller = self.caller(context)
        if caller.name is None or caller.operator:
            return caller
        if device_id is not None and device_id != caller.name:
            self._deny(context, rpc, caller, f"certificate {caller.name!r} cannot subscribe as device {device_id!r}")
        if self.cfg.agent_fleets and not any(
            fleet == f and fnmatch.fnmatchcase(caller.name, pattern) for pattern, f in self.cfg.agent_fleets
        ):
            self._deny(context, rpc, caller, f"certificate {caller.name!r} is not an agent of fleet {fleet!r}")
        return caller

    # -- notices -------------------------------------------------------------------------------------------

    def _notice(self, fleet: str) -> ms.VersionNotice | None:
        state = self.store.state(fleet)
        if state.current is None:
            return None
        manifest = read_manifest(self.store.version_dir(fleet, state.current) / "bundle")
        return ms.VersionNotice(
            fleet=fleet,
            version=state.current,
            manifest=manifest,
            rollback=self.store.last_action(fleet) == "rollback",
        )

    def start(self) -> None:
        """Start watching the store."""
        for fleet in self.store.fleets():
            self._seen[fleet] = (self.store.state(fleet).current, self.store.last_action(fleet))
        self._watcher.start()

    def stop(self) -> None:
        """Stop watching and end every open Subscribe stream."""
        self._stop.set()
        with self._lock:
            for subs in self._subscribers.values():
                for q in subs:
                    q.put(None)
        self._watcher.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.watch_interval):
            try:
                self.check_store()
            except Exception:  # a half-written store must not kill the watcher; the next pass sees it whole
                log.exception("reading the model store failed")

    def check_store(self) -> None:
        """Push a notice to a fleet's subscribers when its current version changed since the last check."""
        for fleet in self.store.fleets():
            now = (self.store.state(fleet).current, self.store.last_action(fleet))
            if self._seen.get(fleet) == now:
                continue
            self._seen[fleet] = now
            notice = self._notice(fleet)
            if notice is None:
                continue
            with self._lock:
                subs = list(self._subscribers.get(fleet, ()))
            log.info("fleet %s: v%d is current (%s); telling %d agents", fleet, notice.version, now[1], len(subs))
            for q in subs:
                q.put(notice)

    # -- agent RPCs ----------------------------------------------------------------------------------------

    def Subscribe(self, request: ms.SubscribeRequest, context: grpc.ServicerContext) -> Iterator[ms.VersionNotice]:
        """The fleet's current version now, then every change, until the agent or the service goes away."""
        self._agent(context, "Subscribe", request.fleet, request.device_id)
        try:
            first = self._notice(request.fleet)
        except StoreError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        if not request.device_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "SubscribeRequest needs a device_id")
        q: queue.Queue[ms.VersionNotice | None] = queue.Queue()
        with self._lock:
            self._subscribers[request.fleet].add(q)
        context.add_callback(lambda: q.put(None))  # the agent hung up: end the loop below
        self.registry.record_subscription(request.device_id, request.fleet, request.current_version, True)
        log.info("agent %s subscribed to %s (serving v%d)", request.device_id, request.fleet, request.current_version)
        try:
            if first is not None:
                yield first
            while not self._stop.is_set():
                notice = q.get()
                if notice is None or not context.is_active():
                    break
                yield notice
        finally:
            with self._lock:
                self._subscribers[request.fleet].discard(q)
            self.registry.record_subscription(request.device_id, request.fleet, 0, False)

    def Download(self, request: ms.DownloadRequest, context: grpc.ServicerContext) -> Iterator[ms.Chunk]:
        """One artifact from ``offset`` on, in chunks of at most ``chunk_size`` bytes."""
        self._agent(context, "Download", request.fleet)
        try:
            path = self.store.artifact(request.fleet, request.version, request.name)
        except StoreError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        total = path.stat().st_size
        if not 0 <= request.offset <= total:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} outside [0, {total}]")
        with path.open("rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while data := f.read(self.cfg.chunk_size):
                if not context.is_active():
                    return
                yield ms.Chunk(offset=offset, data=data, total_size=total)
                offset += len(data)

    # -- operator RPCs -------------------------------------------------------------------------------------

    def ListFleets(self, request: ms.ListFleetsRequest, context: grpc.ServicerContext) -> ms.ListFleetsResponse:
        """Names of the fleets in the store."""
        self._operator(context, "ListFleets")
        return ms.ListFleetsResponse(fleets=self.store.fleets())

    def status(self, fleet: str) -> ms.FleetStatusResponse:
        """Versions, quarantine sizes, devices, jobs and history of one fleet."""
        state = self.store.state(fleet)
        out = ms.FleetStatusResponse(fleet=fleet, current_version=state.current or 0)
        for v in state.versions:
            out.versions.add(
                version=v, quarantine_size=quarantine_size(self.quarantine_root, fleet, v), current=v == state.current
            )
        for d in self.registry.devices(fleet):
            out.devices.add(
                device_id=d["device_id"],
                bundle_version=d["bundle_version"],
                requests=d["requests"],
                rejects=d["rejects"],
                window_reject_rate=d["window_reject_rate"],
                spool_depth=d["spool_depth"],
                provider=d["provider"],
                last_seen=d["last_seen"],
                subscribed=bool(d["subscribed"]),
            )
        for j in self.registry.jobs(fleet):
            out.jobs.add(
                id=j.id,
                from_version=j.from_version,
                state=j.state,
                reason=j.reason,
                detail=j.detail,
                version=j.version,
                created_at=j.created_at,
                updated_at=j.updated_at,
            )
        for h in state.history:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h.get("at", 0)))
            out.history.append(f"{when} {h['action']} v{h.get('version')}" + (f" by {h['by']}" if h.get("by") else ""))
        return out

    def FleetStatus(self, request: ms.FleetStatusRequest, context: grpc.ServicerContext) -> ms.FleetStatusResponse:
        """See :meth:`status`."""
        self._operator(context, "FleetStatus")
        try:
            return self.status(request.fleet)
        except StoreError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            raise  # abort raises; this line is for the type checker

    def Publish(self, request: ms.PublishRequest, context: grpc.ServicerContext) -> ms.FleetStatusResponse:
        """Make a stored version current."""
        by = f"{self._operator(context, 'Publish').describe()} over gRPC"
        try:
            self.store.publish(request.fleet, int(request.version), by=by, note=request.note[:500])
        except StoreError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        self.check_store()
        return self.status(request.fleet)

    def Rollback(self, request: ms.RollbackRequest, context: grpc.ServicerContext) -> ms.FleetStatusResponse:
        """Make an older version current (0: the one current before)."""
        by = f"{self._operator(context, 'Rollback').describe()} over gRPC"
        try:
            self.store.rollback(request.fleet, int(request.version) or None, by=by)
        except StoreError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        self.check_store()
        return self.status(request.fleet)


class ModelServer:
    """The gRPC server: model service + health. ``start()``; ``stop()`` says NOT_SERVING first."""

    def __init__(self, servicer: ModelServicer, cfg: ServiceConfig) -> None:
        self.servicer, self.cfg = servicer, cfg
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="model-service"),
            options=[("grpc.max_send_message_length", 2 * CHUNK_MAX + (1 << 16)), *GRPC_EXCLUSIVE],
        )
        ms_grpc.add_ModelServiceServicer_to_server(servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        try:
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
                self.port = self.server.add_secure_port(cfg.listen, creds)
            else:
                self.port = self.server.add_insecure_port(cfg.listen)
        except RuntimeError as e:
            raise PortError(f"model service cannot listen on {cfg.listen}: {e} (is the port taken?)") from None
        if self.port == 0:
            raise PortError(f"model service cannot listen on {cfg.listen} (is the port taken?)")

    def start(self) -> ModelServer:
        """Serve and report SERVING."""
        self.servicer.start()
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("model service on port %d", self.port)
        return self

    def stop(self, grace: float = 3.0) -> None:
        """NOT_SERVING, end the subscriptions, then stop accepting RPCs."""
        self.health.enter_graceful_shutdown()
        self.servicer.stop()
        self.server.stop(grace).wait()
