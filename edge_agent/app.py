"""``nnoc-edge run`` (the agent application): wire the agent's parts together, serve until SIGTERM, stop cleanly.

The bundle cache under ``state_dir`` lets the agent start and serve without the trainer; ``agent.json`` there
tells ``nnoc-edge status`` and ``nnoc-edge rollback`` where the running agent listens.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import MISSING, asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.agent import Agent
from edge_agent.batcher import Batcher, source_snapshot
from edge_agent.ensemble import Ensemble
from edge_agent.formats.bundle import BundleError, VerifiedBundle, verify_bundle
from edge_agent.formats.curve import load_public, load_secret
from edge_agent.formats.names import check_name
from edge_agent.formats.signing import load_trusted_keys
from edge_agent.formats.tls import server_credentials
from edge_agent.inference import DEFAULT_MAX_BATCH, serve
from edge_agent.metrics import AgentMetrics
from edge_agent.monitor import RejectMonitor
from edge_agent.options import flag, fraction, nonnegative_float, part, positive, positive_float
from edge_agent.ports import StateLock, check_port
from edge_agent.runtime import RuntimeConfig
from edge_agent.sources import Source, SourceError, SourceSpec, SourceStats, parse_source
from edge_agent.spool import Spool, SpoolConfig
from edge_agent.updates import BundleCache, UpdateConfig, Updater, bootstrap
from edge_agent.uplink import Uplink, UplinkConfig

log = logging.getLogger(__name__)

AGENT_FILE = "agent.json"
SOURCES_FILE = "sources.json"
LOCK_FILE = "agent.lock"


@dataclass(frozen=True)
class RunConfig:
    """Everything ``nnoc-edge run`` needs."""

    device_id: str = flag(MISSING, "this device's id (letters, digits, ._-): its quarantine and stats carry it")
    fleet: str = flag(MISSING, "fleet name: the model name on the inference endpoint")
    state_dir: Path = flag(
        Path("nnoc-edge-state"), "bundle cache, spool and agent.json (default ./nnoc-edge-state)", type=Path
    )
    bundle: Path | None = flag(None, "a bundle to serve when the cache has nothing newer", type=Path)
    model_service: str | None = flag(None, "HOST:PORT of the trainer's model service")
    collector: str | None = flag(None, "tcp://HOST:PORT of the trainer's quarantine collector")
    host: str = flag("127.0.0.1", "address the endpoints bind to")
    infer_port: int = flag(8001, "Open Inference Protocol gRPC port (0: any, written to agent.json)", type=int)
    metrics_port: int | None = flag(None, "Prometheus /metrics port (default: off)", type=int)
    sources: tuple[str, ...] = flag(
        (),
        "frames to classify (repeat for several): rtsp://..., http(s)://..., video:PATH, v4l2:/dev/videoN, "
        "dir:PATH, npy:PATH (uint8 pictures N,C,H,W), each optionally ?id=NAME&fps=N&loop=1&stall=S&decoder=D "
        "(opencv, the default, or pyav: the extra nnoculation-edge[pyav], GPL codecs)",
        name="--source",
        action="append",
    )
    source_batch: int = flag(8, "frames per batch at most, across sources (the dynamic batcher)", type=positive)
    batch_wait: float = flag(
        0.002, "seconds the batcher waits after a first frame for more to fill a batch", type=nonnegative_float
    )
    source_limit: int | None = flag(None, "frames per source at most (default: all; files once)", type=positive)
    decisions: Path | None = flag(
        None, "append each frame's decision as a JSON line (source, position, capture time, labels)", type=Path
    )
    window: int = flag(1000, "requests per reject-rate window (paper §7)", type=positive)
    reject_threshold: float = flag(
        0.05, "windowed reject rate that raises the alarm (logged, nnoc_reject_alarm, status)", type=fraction
    )
    spool: SpoolConfig = part(SpoolConfig, "the spool (quarantined inputs waiting for the uplink)", prefix="spool")
    stats_interval: float = flag(10.0, "seconds between stats messages", type=positive_float)
    max_batch: int = flag(
        DEFAULT_MAX_BATCH, "inputs per inference request at most; more get RESOURCE_EXHAUSTED", type=positive
    )
    bootstrap_timeout: float = 60.0  # empty cache: how long to wait for the model service's first bundle
    curve_key: Path | None = flag(None, "this agent's CURVE .key_secret file (uplink)", type=Path)
    curve_server_key: Path | None = flag(None, "the collector's CURVE public .key file", type=Path)
    tls_ca: Path | None = flag(None, "CA of the model service's certificate (TLS)", type=Path)
    tls_cert: Path | None = flag(None, "this agent's certificate: endpoint TLS, client mTLS", type=Path)
    tls_key: Path | None = flag(None, "this agent's TLS key", type=Path)
    infer_client_ca: Path | None = flag(None, "inference endpoint: require client certs signed by this CA", type=Path)
    insecure: bool = flag(False, "allow plaintext gRPC where TLS is not configured")
    # Ed25519 public keys; when given, only bundles they signed load
    trusted_keys: tuple[Path, ...] = flag(
        (),
        "Ed25519 public key (PEM) whose signature a bundle must carry (repeat for several)",
        name="--trusted-key",
        type=Path,
        action="append",
    )
    runtime: RuntimeConfig = part(RuntimeConfig, "inference runtime (onnxruntime)")


def seed_cache(cache: BundleCache, bundle_dir: Path | None, fleet: str) -> None:
    """Install ``bundle_dir`` into the cache when it is newer than what the cache serves."""
    if bundle_dir is None:
        return
    bundle = verify_bundle(bundle_dir, cache.trusted)
    if bundle.manifest.fleet != fleet:
        raise BundleError(f"--bundle {bundle_dir} is for fleet {bundle.manifest.fleet!r}, this agent's is {fleet!r}")
    current = cache.load()
    if current is not None and current.version >= bundle.version:
        log.info("cache already serves v%d; --bundle v%d not installed", current.version, bundle.version)
        return
    staged = cache.root / "staging" / f"seed-{bundle.version}"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(bundle_dir, staged)
    cache.install(staged, bundle.version)
    cache.set_current(bundle.version)


def check_transport(cfg: RunConfig) -> None:
    """Plaintext only where ``--insecure`` allows it; pairs of flags complete."""
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if cfg.infer_client_ca is not None and cfg.tls_cert is None:
        raise ValueError("--infer-client-ca needs --tls-cert/--tls-key for the inference endpoint")
    plain = []
    if cfg.tls_cert is None:
        plain.append("the inference endpoint (no --tls-cert/--tls-key)")
    if cfg.model_service and cfg.tls_ca is None:
        plain.append("the model service connection (no --tls-ca)")
    if plain and not cfg.insecure:
        raise ValueError(f"plaintext for {' and '.join(plain)}: configure TLS or pass --insecure")
    for what in plain:
        log.warning("--insecure: plaintext for %s", what)


def update_config(cfg: RunConfig) -> UpdateConfig:
    """The updater's settings from the run settings."""
    return UpdateConfig(
        cfg.model_service or "", cfg.fleet, cfg.device_id, tls_ca=cfg.tls_ca, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key
    )


def check_sources(specs: tuple[str, ...]) -> list[SourceSpec]:
    """Source specs that can be played, checked before anything starts (grammar, files exist, ids unique)."""
    parsed = [parse_source(spec, i) for i, spec in enumerate(specs)]
    ids = [p.id for p in parsed]
    if len(set(ids)) != len(ids):
        raise SourceError(f"--source ids must differ, got {ids}; name them with ?id=NAME")
    for p in parsed:
        if p.kind == "npy":
            try:
                head = np.load(p.target, mmap_mode="r")  # reads the header only
            except (OSError, ValueError) as e:
                raise SourceError(f"--source {p.target}: not a readable .npy array ({e})") from None
            if head.dtype != np.uint8 or head.ndim != 4 or head.shape[1] not in (1, 3):
                raise SourceError(
                    f"--source npy:{p.target}: holds {head.dtype} {list(head.shape)}; a source plays pictures, uint8 "
                    "(N, C, H, W) with C 1 or 3 (the agent preprocesses them per the bundle)"
                )
    return parsed


def check_run(cfg: RunConfig) -> None:
    """Names, ports, limits and the source: each wrong one is one line before anything starts."""
    check_name(cfg.device_id, "--device-id")
    check_name(cfg.fleet, "--fleet")
    check_port(cfg.infer_port, "--infer-port")
    if cfg.metrics_port is not None:
        check_port(cfg.metrics_port, "--metrics-port", allow_any=False)
    for name, value in (
        ("max-batch", cfg.max_batch),
        ("source-batch", cfg.source_batch),
        ("window", cfg.window),
        ("spool-max-items", cfg.spool.max_items),
        ("spool-max-bytes", cfg.spool.max_bytes),
    ):
        if int(value) < 1:
            raise ValueError(f"--{name} must be at least 1")  # fmt: skip
    if not cfg.stats_interval > 0:
        raise ValueError("--stats-interval must be above 0 seconds")
    check_sources(cfg.sources)


def run(cfg: RunConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Run the agent until ``stop`` is set (SIGTERM/SIGINT set it); returns final counters."""
    stop = stop or threading.Event()
    check_run(cfg)
    check_transport(cfg)
    lock = StateLock(cfg.state_dir, LOCK_FILE, "another nnoc-edge agent")
    try:
        return _run(cfg, stop)
    finally:
        lock.release()


def load_bundle(cfg: RunConfig) -> tuple[BundleCache, VerifiedBundle]:
    """The bundle to serve: ``--bundle`` when newer than the cache, else the cache, else the model service's."""
    trusted = load_trusted_keys(cfg.trusted_keys) if cfg.trusted_keys else None
    if trusted is None:
        log.warning("no --trusted-key: bundles are checked against their manifests' hashes but not signatures")
    cache = BundleCache(cfg.state_dir / "bundles", trusted)
    seed_cache(cache, cfg.bundle, cfg.fleet)
    bundle = cache.load()
    if bundle is None and cfg.model_service:
        bundle = bootstrap(cache, update_config(cfg), cfg.bootstrap_timeout)
    if bundle is None:
        raise BundleError(
            f"no bundle to serve: pass --bundle DIR or --model-service HOST:PORT (nothing cached in {cache.root})"
        )
    if bundle.manifest.fleet != cfg.fleet:
        raise BundleError(
            f"the cached bundle belongs to fleet {bundle.manifest.fleet!r}, not {cfg.fleet!r}: "
            "use another --state-dir or the bundle's fleet"
        )
    return cache, bundle


def start_uplink(cfg: RunConfig, spool: Spool, agent: Agent) -> Uplink | None:
    """The quarantine uplink to ``--collector`` (CURVE when both key files are given), or None without one."""
    if not cfg.collector:
        return None
    if (cfg.curve_key is None) != (cfg.curve_server_key is None):
        raise ValueError("--curve-key and --curve-server-key go together")
    if cfg.curve_key is not None and cfg.curve_server_key is not None:
        load_secret(cfg.curve_key), load_public(cfg.curve_server_key)  # unreadable keys fail at start
    else:
        log.warning("quarantine uplink in plaintext: pass --curve-key and --curve-server-key to encrypt it")
    uplink_cfg = UplinkConfig(
        cfg.collector,
        cfg.device_id,
        stats_interval=cfg.stats_interval,
        curve_key=cfg.curve_key,
        curve_server_key=cfg.curve_server_key,
    )
    return Uplink(spool, uplink_cfg, stats=agent.stats).start()


def _run(cfg: RunConfig, stop: threading.Event) -> dict[str, Any]:
    if cfg.sources and cfg.runtime.spin == "auto":  # decoders share the cores: onnxruntime must not spin on them
        cfg = replace(cfg, runtime=replace(cfg.runtime, spin="off"))
    cache, bundle = load_bundle(cfg)
    spool = Spool(replace(cfg.spool, path=cfg.state_dir / "spool.sqlite"))
    agent = Agent(Ensemble(bundle, cfg.runtime), spool, RejectMonitor(cfg.window, cfg.reject_threshold), cfg.device_id)
    uplink = agent.uplink = start_uplink(cfg, spool, agent)
    updater = None
    if cfg.model_service:
        updater = Updater(agent, cache, update_config(cfg), cfg.runtime).start()
    creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.infer_client_ca) if cfg.tls_cert and cfg.tls_key else None
    metrics = AgentMetrics(agent, uplink, updater)
    specs = check_sources(cfg.sources)
    batcher = None
    if specs:  # with sources, endpoint requests and frames share the dynamic batcher
        batcher = Batcher(agent, cfg.source_batch, cfg.batch_wait, cfg.decisions, metrics.observe).start()
    try:
        server, port = serve(
            agent,
            cfg.fleet,
            f"{cfg.host}:{cfg.infer_port}",
            credentials=creds,
            max_batch=cfg.max_batch,
            metrics=metrics,
            batcher=batcher,
        )
        if cfg.metrics_port is not None:
            metrics.serve(cfg.metrics_port, cfg.host)
    except BaseException:
        for part in (batcher, updater, uplink):
            if part is not None:
                part.stop()
        agent.close()
        spool.close()
        raise

    def reload(*_: object) -> None:  # SIGHUP: serve what the cache says is current (after `nnoc-edge rollback`)
        fresh = cache.load()
        if fresh is not None and fresh.version != agent.ensemble.bundle.version:
            agent.swap(Ensemble(fresh, cfg.runtime))
            log.info("reloaded: now serving v%d", fresh.version)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, reload)
    info = {
        "pid": os.getpid(),
        "process_start": process_start(os.getpid()),
        "device_id": cfg.device_id,
        "fleet": cfg.fleet,
        "infer_port": port,
        "metrics_port": cfg.metrics_port,
        "host": cfg.host,
        "started": time.time(),
    }
    _write_agent_file(cfg.state_dir, info, agent)
    log.info(
        "agent %s serving %s v%d on %s:%d (%s)",
        cfg.device_id,
        cfg.fleet,
        agent.ensemble.bundle.version,
        cfg.host,
        port,
        agent.ensemble.provider,
    )
    sources_stop = threading.Event()
    sources = [Source(spec, batcher.deliver, sources_stop, cfg.source_limit) for spec in specs] if batcher else []
    stats = {src.spec.id: src.stats for src in sources}
    for src in sources:
        assert batcher is not None
        batcher.add_source(src.spec.id, src.stats, src.spec.live)
        metrics.add_source(src.spec.id, src.stats)
        src.start()
    try:
        while not stop.wait(1.0):
            _write_agent_file(cfg.state_dir, info, agent)
            if sources:
                _write_sources(cfg.state_dir, batcher, stats)
    finally:
        sources_stop.set()
        for src in sources:
            src.join(5)
        server.stop(grace=2.0).wait()
        if batcher is not None:
            batcher.stop()  # after the sources: what they delivered is classified first
            _write_sources(cfg.state_dir, batcher, stats)
        if updater is not None:
            updater.stop()
        agent.close()  # commits the rejects still pending before the uplink's last round
        if uplink is not None:
            uplink.stop()
        snap = agent.monitor.snapshot()
        result = {"bundle_version": agent.ensemble.bundle.version, **asdict(snap), "spool_depth": spool.depth()}
        if sources:
            result["sources"] = source_snapshot(batcher, stats)
        spool.close()
        _remove_own(cfg.state_dir / AGENT_FILE)
        log.info("agent stopped: %s", result)
    return result


def _write_atomically(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as JSON at ``path`` (temp file + rename: a reader never sees half a file). A full disk or an I/O
    error keeps the last good file and is not an error: the agent goes on serving."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)
    except OSError as e:
        log.debug("could not write %s: %s", path, e)


def _write_sources(state_dir: Path, batcher: Batcher | None, stats: dict[str, SourceStats]) -> None:
    """Per-source counters for ``nnoc-edge status``."""
    _write_atomically(state_dir / SOURCES_FILE, {"updated": time.time(), "sources": source_snapshot(batcher, stats)})


def _write_agent_file(state_dir: Path, info: dict[str, Any], agent: Agent) -> None:
    """Where the running agent listens, the version it serves and what only it can count (rejects the spool could
    not take, non-finite rejects), for ``nnoc-edge status``; rewritten every second."""
    counts = {
        "bundle_version": agent.ensemble.bundle.version,
        "not_spooled": agent.unspooled,
        "nonfinite_rejects": agent.nonfinite,
        "updated": time.time(),
    }
    _write_atomically(state_dir / AGENT_FILE, {**info, **counts})


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None when there is none.
    With the pid it names one process: a pid alone may have been reused by another since."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def running_agent(state_dir: Path) -> dict[str, Any] | None:
    """The agent that wrote ``state_dir/agent.json`` when that process still runs (same pid and start time);
    None when none runs (a file left by an agent that died is stale)."""
    try:
        info = json.loads((state_dir / AGENT_FILE).read_text())
        pid, started = int(info["pid"]), info.get("process_start")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if started is None or process_start(pid) != started:
        return None
    return dict(info)


def _remove_own(path: Path) -> None:
    """Remove ``agent.json`` only when this process wrote it."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def status(state_dir: Path) -> dict[str, Any]:
    """What the cache serves, the spool depth, and where a running agent listens."""
    if not state_dir.is_dir():
        raise ValueError(f"no agent state in {state_dir}: pass the --state-dir the agent runs with")
    cache = BundleCache(state_dir / "bundles")
    cur, prev = cache.load(), cache.load("previous")
    out: dict[str, Any] = {"current": cur.version if cur else None, "previous": prev.version if prev else None}
    running = running_agent(state_dir)
    if (state_dir / "spool.sqlite").is_file():
        with Spool(SpoolConfig(state_dir / "spool.sqlite")) as spool:
            out.update(
                spool_depth=spool.depth(),
                spool_dropped=spool.counter("dropped"),  # spooled, then dropped at the bound (drop-oldest)
                spool_refused_at_bound=spool.counter("rejected_full"),  # reject-new at the bound, every run
            )
    if running is not None:  # every reject not spooled since it started (the bound, a full disk, an error):
        out["not_spooled"] = int(running.get("not_spooled", 0))  # in its memory, as the disk may be full
        out["nonfinite_rejects"] = int(running.get("nonfinite_rejects", 0))
    out["running"] = running
    if running is None and (state_dir / AGENT_FILE).is_file():
        out["stale_agent_file"] = True  # its agent died without removing it
    sources_file = state_dir / SOURCES_FILE
    if sources_file.is_file():  # the last run's sources when none runs now
        try:
            out["sources"] = json.loads(sources_file.read_text())["sources"]
        except (OSError, ValueError, KeyError):
            out["sources"] = None
    return out


def rollback(state_dir: Path) -> dict[str, Any]:
    """Make the previous bundle current; a running agent is told (SIGHUP) and swaps to it."""
    if not state_dir.is_dir():
        raise ValueError(f"no agent state in {state_dir}: pass the --state-dir the agent runs with")
    version = BundleCache(state_dir / "bundles").rollback()
    running = running_agent(state_dir)  # never a process that merely reuses a dead agent's pid
    signalled = False
    if running is not None:
        try:
            os.kill(int(running["pid"]), signal.SIGHUP)
            signalled = True
        except ProcessLookupError:
            pass
    return {"current": version, "signalled_running_agent": signalled}
