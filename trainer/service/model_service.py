"""The trainer's gRPC model service (``protos/nnoc/v1/model_service.proto``) and ``grpc.health.v1``.

Agents subscribe to their fleet and get a notice with the manifest whenever the fleet's current version
changes; they download artifacts in chunks of at most 1 MiB, from any offset (a broken download resumes).
Operators list fleets, read a fleet's status (versions, quarantine sizes, devices, jobs, history), publish a
stored version and roll back. The store on disk is the source of truth: a watcher reads each fleet's
``fleet.json`` and pushes a notice when the current version changes, whoever changed it (this service, the
job runner, or ``nnoc-trainer fleet`` in another process).

The server is ``grpc.aio`` on an event loop of its own thread: an open Subscribe stream is a coroutine waiting on
its queue, not a thread, so one process holds thousands of subscriptions (the thread-per-stream server it replaced
held 64). Blocking work (the store's files, the registry's SQLite) runs in the loop's executor; the subscriber
sets and the last-seen versions are touched on the loop only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fnmatch
import logging
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edge_agent.formats.bundle import read_manifest
from edge_agent.formats.names import is_name
from edge_agent.formats.tls import server_credentials
from edge_agent.options import flag, positive, safe_name
from edge_agent.ports import GRPC_EXCLUSIVE, PortError
from protos.nnoc.v1 import model_service_pb2 as ms
from protos.nnoc.v1 import model_service_pb2_grpc as ms_grpc
from trainer.service.collector import quarantine_size
from trainer.service.registry import Registry
from trainer.service.rollout import RolloutError, desired, release
from trainer.service.rollout import render as render_rollout
from trainer.service.store import ModelStore, StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK_MAX = 1 << 20
MAX_PENDING_CALLS = 20_000  # calls accepted by gRPC core and not yet started by the loop (see ModelServer)
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
class FleetView:
    """One read of what decides a fleet's versions (see :func:`trainer.service.rollout.desired`)."""

    fleet: str
    current: int | None
    last_action: str
    rollout: dict[str, Any] | None

    @property
    def key(self) -> tuple[Any, ...]:
        """Changes whenever some device's version may change."""
        r = self.rollout
        return (self.current, self.last_action, r and r["id"], r and r["state"], r and r["stage"])


@dataclass(eq=False)
class Subscriber:
    """One open Subscribe stream: its device, its queue of notices (None ends it) and the version last told."""

    device_id: str
    queue: asyncio.Queue[ms.VersionNotice | None]
    version: int | None


@dataclass(frozen=True)
class Caller:
    """Who called: the client certificate's name under mutual TLS (None without one) and its rights."""

    name: str | None
    operator: bool

    def describe(self) -> str:
        """For logs and the fleet history."""
        return f"{self.name!r}" if self.name else "a caller without a client certificate"


def certificate_name(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> str | None:
    """The common name of the peer's verified client certificate, or None (plaintext, TLS without client certs)."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else None


class ModelServicer(ms_grpc.ModelServiceServicer):
    """Subscribe, Download and the operator RPCs over a :class:`ModelStore` (coroutines on the server's loop)."""

    def __init__(self, store: ModelStore, registry: Registry, quarantine_root: Path, cfg: ServiceConfig) -> None:
        if not 0 < cfg.chunk_size <= CHUNK_MAX:
            raise ValueError(f"chunk size must lie in (0, {CHUNK_MAX}], got {cfg.chunk_size}")
        self.store, self.registry, self.quarantine_root, self.cfg = store, registry, quarantine_root, cfg
        # fleet -> its open Subscribe streams; touched on the event loop only
        self._subscribers: dict[str, set[Subscriber]] = defaultdict(set)
        self._seen: dict[str, tuple[Any, ...]] = {}
        self._reading = threading.Lock()  # one reader of the store's fleet states at a time (watcher, Publish)
        self._watcher: asyncio.Task[None] | None = None
        self.denied: dict[str, int] = defaultdict(int)  # refused calls per RPC (PERMISSION_DENIED)

    def subscriptions(self) -> int:
        """Open Subscribe streams, all fleets."""
        return sum(len(subs) for subs in list(self._subscribers.values()))

    # -- authorization -------------------------------------------------------------------------------------

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """Who is calling, and whether that is an operator."""
        name = certificate_name(context)
        if name is None:
            return Caller(None, self.cfg.insecure_operators)
        return Caller(name, name in self.cfg.operators)

    async def _deny(self, context: grpc.aio.ServicerContext, rpc: str, caller: Caller, why: str) -> NoReturn:
        self.denied[rpc] += 1
        log.warning("denied %s to %s: %s", rpc, caller.describe(), why)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        raise AssertionError("abort returned")  # abort raises; this line is for the type checker

    async def _operator(self, context: grpc.aio.ServicerContext, rpc: str) -> Caller:
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
            await self._deny(context, rpc, caller, why)
        return caller

    async def _agent(
        self, context: grpc.aio.ServicerContext, rpc: str, fleet: str, device_id: str | None = None
    ) -> Caller:
        """The caller when it may read ``fleet`` (and, under mutual TLS, speaks as ``device_id``)."""
        caller = self.caller(context)
        if caller.name is None or caller.operator:
            return caller
        if device_id is not None and device_id != caller.name:
            await self._deny(
                context, rpc, caller, f"certificate {caller.name!r} cannot subscribe as device {device_id!r}"
            )
        if self.cfg.agent_fleets and not any(
            fleet == f and fnmatch.fnmatchcase(caller.name, pattern) for pattern, f in self.cfg.agent_fleets
        ):
            await self._deny(context, rpc, caller, f"certificate {caller.name!r} is not an agent of fleet {fleet!r}")
        return caller

    # -- notices -------------------------------------------------------------------------------------------

    def _view(self, fleet: str) -> FleetView:
        """What decides each device's version: the fleet's current version, its last action, its rollout."""
        state = self.store.state(fleet)
        record = self.store.rollout(fleet, state.rollout) if state.rollout else None
        return FleetView(fleet, state.current, self.store.last_action(fleet), record)

    def _notice(self, view: FleetView, device_id: str, manifests: dict[int, Any]) -> ms.VersionNotice | None:
        """The notice that tells ``device_id`` its version (blocking: reads the manifest once per version)."""
        version, back = desired(view.current, view.rollout, device_id)
        if version is None:
            return None
        if version not in manifests:
            manifests[version] = read_manifest(self.store.version_dir(view.fleet, version) / "bundle")
        rollback = back or (version == view.current and view.last_action == "rollback")
        notice = ms.VersionNotice(fleet=view.fleet, version=version, manifest=manifests[version], rollback=rollback)
        if back and view.rollout is not None and view.rollout.get("rollback_order"):
            notice.rollback_order.ParseFromString(base64.b64decode(view.rollout["rollback_order"]))
        elif rollback:
            notice.rollback_order.ParseFromString(self.store.rollback_order(view.fleet))
        return notice

    def _manifests(self, fleet: str, versions: set[int | None]) -> dict[int, Any]:
        return {v: read_manifest(self.store.version_dir(fleet, v) / "bundle") for v in versions if v is not None}

    def _changes(self) -> list[FleetView]:
        """Fleets whose current version or rollout changed since the last read (blocking: the store)."""
        out = []
        with self._reading:
            for fleet in self.store.fleets():
                view = self._view(fleet)
                if self._seen.get(fleet) != view.key:
                    self._seen[fleet] = view.key
                    out.append(view)
        return out

    def _remember(self) -> None:
        with self._reading:
            for fleet in self.store.fleets():
                self._seen[fleet] = self._view(fleet).key

    async def start(self) -> None:
        """Start watching the store (on the server's loop)."""
        await asyncio.to_thread(self._remember)
        self._watcher = asyncio.create_task(self._watch(), name="store-watcher")

    async def stop(self) -> None:
        """Stop watching and end every open Subscribe stream."""
        if self._watcher is not None:
            self._watcher.cancel()
        for subs in self._subscribers.values():
            for sub in subs:
                sub.queue.put_nowait(None)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.watch_interval)
            try:
                await self.check_store()
            except Exception:  # a half-written store must not kill the watcher; the next pass sees it whole
                log.exception("reading the model store failed")

    async def check_store(self) -> None:
        """Tell each subscriber whose version changed (a publish, a rollback, a rollout's stage or abort)."""
        for view in await asyncio.to_thread(self._changes):
            subs = list(self._subscribers.get(view.fleet, ()))
            wanted = {sub: desired(view.current, view.rollout, sub.device_id)[0] for sub in subs}
            wanted = {sub: v for sub, v in wanted.items() if v is not None and v != sub.version}
            manifests = await asyncio.to_thread(self._manifests, view.fleet, set(wanted.values()))
            told: dict[int, int] = defaultdict(int)
            for sub in wanted:
                notice = self._notice(view, sub.device_id, manifests)  # every manifest read already: no I/O
                if notice is not None:
                    sub.version = notice.version
                    sub.queue.put_nowait(notice)
                    told[notice.version] += 1
            rollout = f", rollout {view.rollout['id']} {view.rollout['state']}" if view.rollout else ""
            log.info(
                "fleet %s: v%s current (%s%s); told %s",
                view.fleet,
                view.current,
                view.last_action,
                rollout,
                ", ".join(f"{n} agents v{v}" for v, n in sorted(told.items())) or "no agent",
            )

    # -- agent RPCs ----------------------------------------------------------------------------------------

    async def Subscribe(
        self, request: ms.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ms.VersionNotice]:
        """The fleet's current version now, then every change, until the agent or the service goes away."""
        await self._agent(context, "Subscribe", request.fleet, request.device_id)
        if not is_name(request.device_id):  # the same rule as the collector's: no path, escape or 100 kB id
            shown = request.device_id[:80]
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"device_id {shown!r} is not a valid device name: use 1-64 letters, digits, '.', '_' or '-'",
            )
        try:
            view = await asyncio.to_thread(self._view, request.fleet)
            first = await asyncio.to_thread(self._notice, view, request.device_id, {})
        except StoreError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        sub = Subscriber(request.device_id, asyncio.Queue(), first.version if first else None)
        self._subscribers[request.fleet].add(sub)
        loop = asyncio.get_running_loop()
        loop.run_in_executor(
            None, self.registry.record_subscription, request.device_id, request.fleet, request.current_version, True
        )
        log.info("agent %s subscribed to %s (serving v%d)", request.device_id, request.fleet, request.current_version)
        try:
            if first is not None:
                yield first
            while (notice := await sub.queue.get()) is not None:
                yield notice
        finally:  # the stream ended: the service stopped, the agent hung up (cancelled here) or the send failed
            self._subscribers[request.fleet].discard(sub)
            loop.run_in_executor(None, self.registry.record_subscription, request.device_id, request.fleet, 0, False)

    async def Download(self, request: ms.DownloadRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[ms.Chunk]:
        """One artifact from ``offset`` on, in chunks of at most ``chunk_size`` bytes."""
        await self._agent(context, "Download", request.fleet)
        try:
            path = await asyncio.to_thread(self.store.artifact, request.fleet, request.version, request.name)
        except StoreError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        total = path.stat().st_size
        if not 0 <= request.offset <= total:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} outside [0, {total}]")
        with path.open("rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while data := await asyncio.to_thread(f.read, self.cfg.chunk_size):
                yield ms.Chunk(offset=offset, data=data, total_size=total)
                offset += len(data)

    # -- operator RPCs -------------------------------------------------------------------------------------

    async def ListFleets(
        self, request: ms.ListFleetsRequest, context: grpc.aio.ServicerContext
    ) -> ms.ListFleetsResponse:
        """Names of the fleets in the store."""
        await self._operator(context, "ListFleets")
        return ms.ListFleetsResponse(fleets=await asyncio.to_thread(self.store.fleets))

    def status(self, fleet: str) -> ms.FleetStatusResponse:
        """Versions, quarantine sizes, devices, jobs and history of one fleet (blocking: store and registry)."""
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
        record = self.store.rollout(fleet, state.rollout) if state.rollout else None
        if record is not None:
            out.rollout.extend(render_rollout(record))
        for h in state.history:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h.get("at", 0)))
            out.history.append(f"{when} {h['action']} v{h.get('version')}" + (f" by {h['by']}" if h.get("by") else ""))
        return out

    async def FleetStatus(
        self, request: ms.FleetStatusRequest, context: grpc.aio.ServicerContext
    ) -> ms.FleetStatusResponse:
        """See :meth:`status`."""
        await self._operator(context, "FleetStatus")
        try:
            return await asyncio.to_thread(self.status, request.fleet)
        except StoreError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            raise  # abort raises; this line is for the type checker

    async def Publish(self, request: ms.PublishRequest, context: grpc.aio.ServicerContext) -> ms.FleetStatusResponse:
        """Make a stored version current."""
        by = f"{(await self._operator(context, 'Publish')).describe()} over gRPC"
        try:
            fleet, version, note = request.fleet, int(request.version), request.note[:500]
            if request.now:
                await asyncio.to_thread(self.store.publish, fleet, version, by=by, note=note)
            else:  # the fleet's rollout policy decides (at once when it has none)
                await asyncio.to_thread(release, self.store, self.registry, fleet, version, by, None, note)
        except (StoreError, RolloutError) as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        await self.check_store()
        return await asyncio.to_thread(self.status, request.fleet)

    async def Rollback(self, request: ms.RollbackRequest, context: grpc.aio.ServicerContext) -> ms.FleetStatusResponse:
        """Make an older version current (0: the one current before)."""
        by = f"{(await self._operator(context, 'Rollback')).describe()} over gRPC"
        try:
            await asyncio.to_thread(self.store.rollback, request.fleet, int(request.version) or None, by=by)
        except StoreError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        await self.check_store()
        return await asyncio.to_thread(self.status, request.fleet)


class ModelServer:
    """The gRPC server (``grpc.aio``): model service + health, on an event loop in a thread of its own.

    ``start()``; ``stop()`` says NOT_SERVING first. The constructor binds the port (a taken one raises
    :class:`PortError`), so callers learn of it before anything starts.
    """

    def __init__(self, servicer: ModelServicer, cfg: ServiceConfig) -> None:
        self.servicer, self.cfg = servicer, cfg
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="model-service", daemon=True)
        self._thread.start()
        try:
            self.port = self._call(self._bind())
        except BaseException:
            self._close_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _bind(self) -> int:
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", 2 * CHUNK_MAX + (1 << 16)),
                # Calls that arrived and wait for the loop to pick them up: gRPC core sheds them (CANCELLED) past
                # 1,000, at random up to 3,000. A fleet resubscribing at once (the trainer restarted) is such a
                # burst; let it queue.
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
                *GRPC_EXCLUSIVE,
            ]
        )
        ms_grpc.add_ModelServiceServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        cfg = self.cfg
        try:
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
                port = self.server.add_secure_port(cfg.listen, creds)
            else:
                port = self.server.add_insecure_port(cfg.listen)
        except RuntimeError as e:
            raise PortError(f"model service cannot listen on {cfg.listen}: {e} (is the port taken?)") from None
        if port == 0:
            raise PortError(f"model service cannot listen on {cfg.listen} (is the port taken?)")
        return port

    def start(self) -> ModelServer:
        """Serve and report SERVING."""
        self._call(self._start())
        log.info("model service on port %d", self.port)
        return self

    async def _start(self) -> None:
        await self.servicer.start()
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING to health checks from now on."""
        if not self._loop.is_closed():
            self._call(self.health.enter_graceful_shutdown())

    def stop(self, grace: float = 3.0) -> None:
        """NOT_SERVING, end the subscriptions, then stop accepting RPCs."""
        if self._loop.is_closed():
            return
        self._call(self._stop(grace), timeout=grace + 30)
        self._close_loop()

    async def _stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.servicer.stop()
        await self.server.stop(grace)

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()
