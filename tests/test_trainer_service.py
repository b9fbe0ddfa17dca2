"""The trainer service: model store, quarantine collector, gRPC model service, serve CLI (all on loopback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import zmq

from conftest import ROOT, dealer, make_version, run_cli, start_service, wait_for
from edge_agent.formats.bundle import verify_bundle
from protos.nnoc.v1 import model_service_pb2 as ms
from protos.nnoc.v1 import model_service_pb2_grpc as ms_grpc
from protos.nnoc.v1 import quarantine_pb2
from trainer.service.collector import Collector, CollectorConfig, quarantine_size, spec_source
from trainer.service.registry import Registry
from trainer.service.store import ModelStore, StoreError

Reply = quarantine_pb2.QuarantineReply


@pytest.fixture()
def store(predeployed: tuple[Path, dict[str, Any]], tmp_path: Path) -> ModelStore:
    s = ModelStore(tmp_path / "exports")
    s.create("default")
    s.publish("default", s.add("default", predeployed[0]))
    return s


def test_store_publish_rollback_and_refusals(
    store: ModelStore, predeployed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    state = store.state("default")
    assert (state.current, state.versions) == (1, [1])
    assert (store.version_dir("default", 1) / "monitor.pt").is_file()  # checkpoints kept for the next repair
    with pytest.raises(StoreError, match="already holds v1"):
        store.add("default", predeployed[0])
    with pytest.raises(StoreError, match="not 'other'"):
        store.create("other")
        store.add("other", predeployed[0])
    with pytest.raises(StoreError, match="fleet name"):
        store.state("../etc")
    v2 = make_version(predeployed[0], tmp_path / "v2", 2)
    assert store.add("default", v2) == 2 and store.state("default").current == 1  # added, not yet current
    store.publish("default", 2)
    assert store.state("default").current == 2 and store.last_action("default") == "publish"
    store.rollback("default")
    assert store.state("default").current == 1 and store.last_action("default") == "rollback"
    with pytest.raises(StoreError, match="older"):
        store.rollback("default", 2)
    with pytest.raises(StoreError, match="no version 7"):
        store.publish("default", 7)
    assert [h["action"] for h in store.state("default").history] == [
        "create",
        "add",
        "publish",
        "add",
        "publish",
        "rollback",
    ]


def test_store_publish_is_atomic_under_concurrent_readers(
    store: ModelStore, predeployed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    for v in (2, 3):
        store.add("default", make_version(predeployed[0], tmp_path / f"v{v}", v))
    # Readers in another process: each read of the current version must find a whole, verified bundle.
    reader = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from trainer.service.store import ModelStore\n"
        "s = ModelStore(Path(sys.argv[1])); n = 0; seen = set(); print('ready', flush=True); t = time.monotonic()\n"
        "while time.monotonic() - t < 4:\n"
        "    st = s.state('default'); b = s.bundle('default', st.current)\n"
        "    assert b.version == st.current, (b.version, st.current); seen.add(st.current); n += 1\n"
        "print(n, sorted(seen))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", reader, str(store.root)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    writers = []

    def flip(k: int) -> None:
        for i in range(150):
            store.publish("default", 1 + (i + k) % 3, by=f"writer {k}")

    for p in procs:  # each reader has imported the store and is about to read (no sleep to guess when)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for k in range(2):  # two writers in this process as well: the lock serialises them
        writers.append(threading.Thread(target=flip, args=(k,)))
        writers[-1].start()
    for w in writers:
        w.join()
    for p in procs:
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0, out
        assert int(out.split()[0]) > 10
    assert len(store.state("default").history) == 1 + 3 + 1 + 300


def _message(seq: int, device: str = "cam-1", fleet: str = "default", **kw: Any) -> list[bytes]:
    h = quarantine_pb2.QuarantineHeader(
        device_id=device, fleet=fleet, bundle_version=1, seq=seq, shape=[1, 28, 28], dtype="float32",
        primary_label=0, monitor_label=3,
    )  # fmt: skip
    for k, v in kw.items():
        if k != "tensor":
            setattr(h, k, v) if not isinstance(v, list) else (h.ClearField(k), getattr(h, k).extend(v))
    tensor = kw.get("tensor", np.full((1, 28, 28), 0.5, np.float32).tobytes())
    return [h.SerializeToString(), tensor]


def _replies(sock: zmq.Socket, n: int, timeout: float = 10.0) -> list[Reply]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        if sock.poll(100):
            out.append(Reply.FromString(sock.recv_multipart()[0]))
    return out


def test_collector_validates_dedupes_limits_and_records_stats(store: ModelStore, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.sqlite")
    ctx = zmq.Context()
    cfg = CollectorConfig("tcp://127.0.0.1:0", tmp_path / "q", max_tensor_bytes=8192, rate=5.0, burst=30.0)
    collector = Collector(cfg, spec_source(store), registry, ctx).start()
    sock = dealer(ctx, collector.port, b"cam-1")
    try:
        for seq in range(10):
            sock.send_multipart(_message(seq))
        sock.send_multipart(_message(3))  # a duplicate
        sock.send_multipart(_message(10, dtype="uint8", tensor=bytes(range(256)) * 3 + bytes(16)))  # the image
        replies = _replies(sock, 12)
        assert [r.status for r in replies] == [Reply.ACK] * 12
        bad = {
            "garbage header": [b"\xff\xfe not protobuf", b"x"],
            "three frames": [*_message(100), b"extra"],
            "wrong shape": _message(101, shape=[1, 28, 27], tensor=np.zeros((1, 28, 27), np.float32).tobytes()),
            "NaN": _message(102, tensor=np.full((1, 28, 28), np.nan, np.float32).tobytes()),
            "out of range": _message(103, tensor=np.full((1, 28, 28), 7.0, np.float32).tobytes()),
            "oversized": _message(104, shape=[1, 64, 64], tensor=np.zeros((1, 64, 64), np.float32).tobytes()),
            "unknown fleet": _message(105, fleet="nowhere"),
            "short tensor": _message(106, tensor=b"\x00" * 12),
            "spoofed device": _message(107, device="cam-9"),
            "image of another size": _message(108, dtype="uint8", shape=[1, 28, 27], tensor=bytes(28 * 27)),
        }
        for frames in bad.values():
            sock.send_multipart(frames)
        replies = _replies(sock, len(bad))
        assert [r.status for r in replies] == [Reply.REJECTED] * len(bad)
        assert all(r.error for r in replies)
        errors = {r.seq: r.error for r in replies}  # replies may come in another order than the messages
        assert "exceeds" in errors[104] and "unknown fleet" in errors[105] and "NaN" in errors[102]
        assert "[1, 28, 28] uint8" in errors[108]  # the refusal names the layouts the fleet takes
        # Rate limit: the bucket holds 30 and 23 are spent; a burst of 40 more is partly throttled.
        for seq in range(200, 240):
            sock.send_multipart(_message(seq))
        replies = _replies(sock, 40)
        throttled = [r.seq for r in replies if r.status == Reply.THROTTLED]
        assert 0 < len(throttled) < 40
        stats = quarantine_pb2.AgentStats(device_id="cam-1", fleet="default", bundle_version=1, requests=500)
        stats.rejects, stats.window_reject_rate, stats.window_size = 40, 0.08, 100
        sock.send_multipart([stats.SerializeToString()])
        sock.send_multipart([b"\x00\x01garbage"])  # a malformed one-frame message: counted, ignored
        assert wait_for(lambda: collector.counters.stats == 1 and collector.counters.malformed_frames == 1)
    finally:
        sock.close()
        collector.stop()
        ctx.term()
    c = collector.counters
    assert c.duplicates == 1 and c.rejected == len(bad) and c.throttled == len(throttled)
    assert quarantine_size(tmp_path / "q", "default", 1) == c.stored == 11 + 40 - len(throttled)
    devices = registry.devices("default")
    assert devices[0]["device_id"] == "cam-1" and devices[0]["requests"] == 500
    assert devices[0]["window_reject_rate"] == pytest.approx(0.08)


def test_collector_acks_a_write_in_one_reply_to_agents_that_ask_and_one_per_message_to_others(
    store: ModelStore, tmp_path: Path
) -> None:
    collector = Collector(CollectorConfig("tcp://127.0.0.1:0", tmp_path / "q"), spec_source(store))
    batch = [[b"cam-1", *_message(seq, batched_acks=True)] for seq in range(5)]
    batch += [[b"cam-2", *_message(seq, device="cam-2")] for seq in range(3)]  # an agent before batched ACKs
    batch.append([b"cam-1", *_message(3, batched_acks=True)])  # a resend of one already in this write
    batch.append([b"cam-1", *_message(9, shape=[1, 28, 27], batched_acks=True)])  # refused: its own reply
    replies = [(ident, Reply.FromString(r.SerializeToString())) for ident, r in collector.handle(batch)]
    by_sender: dict[bytes, list[Reply]] = {}
    for ident, r in replies:
        by_sender.setdefault(ident, []).append(r)
    acks = [r for r in by_sender[b"cam-1"] if r.status == Reply.ACK]
    assert len(acks) == 1 and sorted([acks[0].seq, *acks[0].acked]) == [0, 1, 2, 3, 3, 4]
    assert [(r.status, r.seq) for r in by_sender[b"cam-1"] if r.status != Reply.ACK] == [(Reply.REJECTED, 9)]
    assert sorted((r.seq, r.status, len(r.acked)) for r in by_sender[b"cam-2"]) == [(k, Reply.ACK, 0) for k in range(3)]
    assert collector.counters.stored == 8 and collector.counters.duplicates == 1
    assert quarantine_size(tmp_path / "q", "default", 1) == 8


def test_collector_restart_keeps_unacknowledged_messages(store: ModelStore, tmp_path: Path) -> None:
    from edge_agent.spool import Spool, SpoolConfig
    from edge_agent.uplink import Uplink, UplinkConfig

    ctx = zmq.Context()
    cfg = CollectorConfig("tcp://127.0.0.1:0", tmp_path / "q")
    first = Collector(cfg, spec_source(store), None, ctx).start()
    port = first.port
    first.stop()  # down before the agent sends anything
    spool = Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power"))
    frames = _message(0)  # the spool gives each row its own seq
    for _ in range(300):
        spool.put(frames[0], frames[1])
    up = Uplink(spool, UplinkConfig(f"tcp://127.0.0.1:{port}", "cam-1", resend_after=0.5), context=ctx).start()
    try:
        time.sleep(1.0)
        assert spool.depth() == 300  # nobody acknowledged: nothing left the spool
        fixed = CollectorConfig(f"tcp://127.0.0.1:{port}", tmp_path / "q")
        second = Collector(fixed, spec_source(store), None, ctx).start()
        assert wait_for(lambda: spool.depth() == 0, 30)
        second.stop()
    finally:
        up.stop()
        spool.close()
        ctx.term()
    assert quarantine_size(tmp_path / "q", "default", 1) == 300


def test_service_pushes_publishes_and_serves_resumable_downloads(
    store: ModelStore, predeployed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from edge_agent.updates import download_bundle

    server = start_service(store, tmp_path, chunk=4096)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = ms_grpc.ModelServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        check = health.Check(health_pb2.HealthCheckRequest(service="nnoc.v1.ModelService"), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        stream = stub.Subscribe(ms.SubscribeRequest(fleet="default", device_id="cam-1", current_version=1))
        notices = iter(stream)
        first = next(notices)
        assert (first.version, first.rollback) == (1, False) and len(first.manifest.artifacts) == 3
        store.add("default", make_version(predeployed[0], tmp_path / "v2", 2))
        store.publish("default", 2)
        second = next(notices)  # pushed by the store watcher
        assert (second.version, second.rollback) == (2, False)
        reply = stub.Rollback(ms.RollbackRequest(fleet="default"), timeout=5)
        assert reply.current_version == 1 and next(notices).rollback
        assert "cam-1" in [d.device_id for d in reply.devices]
        assert stub.ListFleets(ms.ListFleetsRequest(), timeout=5).fleets == ["default"]
        stream.cancel()

        # Download: a dropped connection leaves a partial file; the next request resumes at its size.
        art = next(a for a in second.manifest.artifacts if a.role == "primary")
        staged = tmp_path / "staged"
        staged.mkdir()
        chunks = stub.Download(ms.DownloadRequest(fleet="default", version=2, name=art.name, offset=0))
        with (staged / art.name).open("wb") as f:
            for i, chunk in enumerate(chunks):
                assert len(chunk.data) <= 4096 and chunk.total_size == art.size
                f.write(chunk.data)
                if i == 3:
                    chunks.cancel()  # the connection drops mid-artifact
                    break
        assert (staged / art.name).stat().st_size == 4 * 4096
        download_bundle(stub, second, staged)
        assert verify_bundle(staged).version == 2
        for bad, code in (
            (ms.DownloadRequest(fleet="default", version=2, name="../fleet.json"), grpc.StatusCode.NOT_FOUND),
            (ms.DownloadRequest(fleet="default", version=9, name=art.name), grpc.StatusCode.NOT_FOUND),
            (ms.DownloadRequest(fleet="default", version=2, name=art.name, offset=10**9), grpc.StatusCode.OUT_OF_RANGE),
        ):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Download(bad, timeout=5))
            assert e.value.code() == code and e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            next(iter(stub.Subscribe(ms.SubscribeRequest(fleet="nope", device_id="x"), timeout=5)))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop()
        channel.close()


def test_service_holds_hundreds_of_subscriptions_and_tells_each_one(tmp_path: Path) -> None:
    """More open Subscribe streams than the thread-per-stream server had workers (64): each gets the publish, and
    the streams its agents close leave the service's subscriber sets."""
    from conftest import tiny_store

    store = tiny_store(tmp_path / "exports", versions=(1, 2))
    server = start_service(store, tmp_path)
    channels = [grpc.insecure_channel(f"127.0.0.1:{server.port}") for _ in range(4)]
    try:
        streams = []
        for i in range(300):
            stub = ms_grpc.ModelServiceStub(channels[i % 4])
            stream = stub.Subscribe(ms.SubscribeRequest(fleet="default", device_id=f"cam-{i}", current_version=1))
            assert next(stream).version == 1  # answered while the 299 others stay open
            streams.append(stream)
        assert server.servicer.subscriptions() == 300
        store.publish("default", 2)
        assert all(next(stream).version == 2 for stream in streams)
        for stream in streams[:100]:
            stream.cancel()
        assert wait_for(lambda: server.servicer.subscriptions() == 200, 10)
        registry = Registry(tmp_path / "registry.sqlite")
        assert wait_for(lambda: sum(d["subscribed"] for d in registry.devices("default")) == 200, 10)
        registry.close()
    finally:
        server.stop()
        for c in channels:
            c.close()


def test_serve_cli_reads_toml_and_stops_cleanly_on_sigterm(store: ModelStore, tmp_path: Path) -> None:
    from conftest import free_port

    config = tmp_path / "serve.toml"
    metrics_port = free_port()
    config.write_text(
        f'store = "{store.root}"\nstate-dir = "{tmp_path / "state"}"\ncollector = "tcp://127.0.0.1:0"\n'
        'listen = "127.0.0.1:0"\nmin-quarantine = 5\nno-jobs = true\ninsecure = true\ninsecure-operators = true\n'
        f"metrics-port = {metrics_port}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", "serve", "--config", str(config), "--json"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # up, or exited (then its one-line error is the failure); 120 s: a start on 2 busy cores took over 60 once
        wait_for(lambda: (tmp_path / "state" / "serve.json").is_file() or proc.poll() is not None, 120)
        assert proc.poll() is None, proc.communicate(timeout=30)[1][-2000:]
        assert (tmp_path / "state" / "serve.json").is_file(), "serve.json not written in 120 s"
        info = json.loads((tmp_path / "state" / "serve.json").read_text())
        code, st, _ = run_cli("trainer", "fleet", "status", "default", "--store", str(store.root), "--state-dir",
                              str(tmp_path / "state"))  # fmt: skip
        assert code == 0 and st is not None and st["current"] == 1
        with grpc.insecure_channel(info["model_service"]) as ch:
            assert ms_grpc.ModelServiceStub(ch).ListFleets(ms.ListFleetsRequest(), timeout=5).fleets == ["default"]
        import urllib.request

        with zmq.Context() as zctx, zctx.socket(zmq.DEALER) as sock:  # one refused message shows on /metrics
            sock.setsockopt(zmq.IDENTITY, b"cam-1")
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(info["collector"])
            sock.send_multipart(_message(0, fleet="nowhere"))
            assert sock.poll(10_000)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'nnoc_collector_refused_total{reason="unknown-fleet"} 1.0' in text
        assert "nnoc_collector_received_total 1.0" in text
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["received"] == 1
        assert not (tmp_path / "state" / "serve.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
    config.write_text("colour = 'red'\n")
    code, _, err = run_cli("trainer", "serve", "--config", str(config), check=False)
    assert code == 2 and "unknown keys ['colour']" in err


@pytest.mark.slow
def test_demo_tiny_runs_the_whole_loop(tmp_path: Path) -> None:
    code, report, err = run_cli("trainer", "demo", "--profile", "tiny", "--out", str(tmp_path / "demo"), "--quiet")
    assert code == 0 and report is not None, err[-3000:]
    assert set(report["agents"]) == {"cam-0", "cam-1"}
    assert all(v == report["repaired_version"] == 2 for v in report["agents"].values())
    for when in ("before", "after"):
        assert {"clean_accuracy", "attack_success_rate"} <= set(report[when])
    assert report["after"]["answered_by_versions"] == [2]
    # The repaired primary model has unlearned most of the backdoor the BadNet carried.
    assert report["after"]["primary"]["attack_success_rate"] < report["before"]["primary"]["attack_success_rate"]
    assert (tmp_path / "demo" / "report.json").is_file() and report["pictures"]
    assert not list((tmp_path / "demo" / "state").glob("serve.json"))  # serve stopped


def test_job_policy_starts_repairs_on_size_or_rate_and_retries_after_growth(store: ModelStore, tmp_path: Path) -> None:
    from trainer.service.jobs import JobPolicy, JobRunner
    from trainer.service.quarantine import QuarantineStore

    registry = Registry(tmp_path / "registry.sqlite")
    qroot = tmp_path / "q"
    runner = JobRunner(store, registry, qroot, tmp_path / "jobs", JobPolicy(min_quarantine=50, min_for_rate=10))

    def quarantine(n: int, start: int = 0) -> None:
        with QuarantineStore(qroot / "default" / "1") as q:
            msgs = [_message(seq) for seq in range(start, start + n)]
            q.add_many([(quarantine_pb2.QuarantineHeader.FromString(h), t) for h, t in msgs])

    def stats(rate: float) -> None:
        s = quarantine_pb2.AgentStats(device_id="cam-1", fleet="default", bundle_version=1, requests=100)
        s.window_reject_rate, s.window_size = rate, 100
        registry.record_stats(s)

    assert runner.due("default") == ""
    quarantine(12)
    stats(0.02)
    assert runner.due("default") == ""  # 12 < 50 and the agents' reject rates are low
    stats(0.2)
    assert runner.due("default").startswith("reject rate 0.200 > 0.05 with 12 quarantined")
    job = registry.add_job("default", 1, "test", quarantine=12)
    assert runner.due("default") == ""  # one job at a time per fleet
    registry.update_job(job.id, "gate-rejected", "{}")
    assert runner.due("default") == ""  # this version was tried: wait until its quarantine doubles
    quarantine(50, start=100)
    assert runner.due("default") == "quarantine 62 >= 50"
    registry.update_job(job.id, "published", "{}", version=2)
    capped = JobRunner(store, registry, qroot, tmp_path / "jobs", JobPolicy(min_quarantine=50, max_rounds=1))
    assert capped.due("default") == ""  # one published round is the cap
    registry.close()


@pytest.mark.slow
def test_demo_tiny_with_its_repair_on_ray(tmp_path: Path) -> None:
    """The whole loop with serve's repair job as a task on a Ray cluster serve starts (--jobs-backend ray)."""
    code, report, err = run_cli(
        "trainer", "demo", "--profile", "tiny", "--out", str(tmp_path / "demo"), "--jobs-backend", "ray", "--quiet"
    )
    assert code == 0 and report is not None, err[-3000:]
    assert report["jobs_backend"] == "ray" and report["repaired_version"] == 2
    assert all(v == 2 for v in report["agents"].values())
    assert "repair jobs go to the Ray cluster" in (tmp_path / "demo" / "logs" / "serve.log").read_text()


def test_demo_names_the_child_that_ended_and_its_last_log_line(tmp_path: Path) -> None:
    """A child of the demo that exits early is reported with its exit code and its log's last line, not 'see logs'."""
    from trainer.demo import _exited

    (tmp_path / "cam-1.log").write_text("starting\nboom: the model service refused this agent\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)", "--device-id", "cam-1"])
    proc.wait()
    message = str(_exited(proc, tmp_path))
    assert "exited early with 3" in message and "boom: the model service refused this agent" in message
    assert str(tmp_path / "cam-1.log") in message
