"""Adversarial cases (issue 10): a hostile sender on the uplink, a hostile caller on the model service and the
inference endpoint, and careless users on the command lines. Each failed on the code before the fix."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from conftest import TINY_SPEC, dealer, run_cli, tiny_bundle, tiny_store, wait_for
from protos.nnoc.v1 import bundle_pb2, quarantine_pb2
from trainer.service.collector import Collector, CollectorConfig, fixed_spec, quarantine_size, spec_source

Reply = quarantine_pb2.QuarantineReply
SPEC = bundle_pb2.InputSpec(**TINY_SPEC)
GOOD_TENSOR = np.full((1, 28, 28), 0.5, np.float32).tobytes()


def header(seq: int, device: str = "cam-1", version: int = 1, **kw: Any) -> quarantine_pb2.QuarantineHeader:
    h = quarantine_pb2.QuarantineHeader(
        device_id=device, fleet="default", bundle_version=version, seq=seq, dtype="float32",
        primary_label=0, monitor_label=3,
    )  # fmt: skip
    h.shape.extend(kw.pop("shape", [1, 28, 28]))
    for k, v in kw.items():
        setattr(h, k, v)
    return h


def message(seq: int, device: str = "cam-1", tensor: bytes = GOOD_TENSOR, **kw: Any) -> list[bytes]:
    return [device.encode(), header(seq, device, **kw).SerializeToString(), tensor]


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- 2. resources: versions that do not exist, open stores, quotas, budget ----------------------------------


def test_collector_refuses_versions_not_in_the_store_and_keeps_files_bounded(tmp_path: Path) -> None:
    store = tiny_store(tmp_path / "exports", versions=(1, 2))
    c = Collector(CollectorConfig(root=tmp_path / "q"), spec_source(store))
    before = open_files()
    replies = c.handle([message(i, version=v) for i, v in enumerate([0, 3, 7, 2**40, *range(100, 400)])])
    assert {r.status for _, r in replies} == {Reply.REJECTED}
    assert {r.error.split(" has no")[0] for _, r in replies if r.seq} == {"fleet 'default'"}
    assert c.counters.by_reason["unknown-version"] == 303 and c.counters.by_reason["malformed"] == 1  # v0
    assert not (tmp_path / "q" / "default").exists()  # not one folder, not one file made for them
    assert open_files() <= before + 1
    ok = c.handle([message(1000, version=1), message(1001, version=2)])
    assert [r.status for _, r in ok] == [Reply.ACK, Reply.ACK]
    assert quarantine_size(tmp_path / "q", "default", 2) == 1
    # A version added to the store after a refusal is accepted a moment later (the refusal is not cached long).
    store.add("default", tiny_bundle(tmp_path / "v3", "default", 3))
    time.sleep(1.1)
    assert c.handle([message(1002, version=3)])[0][1].status == Reply.ACK


def test_collector_keeps_a_bounded_number_of_stores_open(tmp_path: Path) -> None:
    versions = tuple(range(1, 61))
    c = Collector(CollectorConfig(root=tmp_path / "q", max_open_stores=4), fixed_spec("default", SPEC, versions))
    before = open_files()
    for v in versions:
        assert c.handle([message(v, version=v)])[0][1].status == Reply.ACK
    assert c.open_stores == 4
    # each open store: the writer's connection and the checkpointer's, each up to ~3 files in WAL mode
    assert open_files() - before <= 4 * 2 * 4
    assert sum(quarantine_size(tmp_path / "q", "default", v) for v in versions) == 60


def test_device_quota_and_storage_budget_answer_over_quota_and_the_agent_keeps_the_messages(tmp_path: Path) -> None:
    c = Collector(CollectorConfig(root=tmp_path / "q", device_quota=5, retry_after=7.0), fixed_spec("default", SPEC))
    replies = c.handle([message(i) for i in range(8)] + [message(0, device="cam-2")])
    assert [r.status for _, r in replies].count(Reply.ACK) == 6  # 5 of cam-1, 1 of cam-2
    over = [r for _, r in replies if r.status == Reply.OVER_QUOTA]
    assert len(over) == 3 and all(r.retry_after == 7.0 and "quota" in r.error for r in over)
    assert c.handle([message(3)])[0][1].status == Reply.OVER_QUOTA  # even a resend of a stored one: still over

    small = Collector(CollectorConfig(root=tmp_path / "q2", budget_bytes=20_000), fixed_spec("default", SPEC))
    replies = small.handle([message(i) for i in range(40)])
    statuses = [r.status for _, r in replies]
    assert 0 < statuses.count(Reply.ACK) < 40 and statuses.count(Reply.OVER_QUOTA) == 40 - statuses.count(Reply.ACK)
    assert small.counters.budget_full and small.counters.by_reason["budget"] > 0
    # The budget counts what is on disk already when a collector starts.
    again = Collector(CollectorConfig(root=tmp_path / "q2", budget_bytes=20_000), fixed_spec("default", SPEC))
    assert again.counters.bytes_used >= 20_000
    assert again.handle([message(99)])[0][1].status == Reply.OVER_QUOTA


def test_uplink_keeps_what_the_collector_defers(tmp_path: Path) -> None:
    from edge_agent.spool import Spool, SpoolConfig
    from edge_agent.uplink import Uplink, UplinkConfig

    ctx = zmq.Context()
    cfg = CollectorConfig("tcp://127.0.0.1:0", tmp_path / "q", device_quota=10, retry_after=60.0)
    collector = Collector(cfg, fixed_spec("default", SPEC), None, ctx).start()
    spool = Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power"))
    for _ in range(30):
        spool.put(header(0).SerializeToString(), GOOD_TENSOR)
    up = Uplink(spool, UplinkConfig(f"tcp://127.0.0.1:{collector.port}", "cam-1", resend_after=0.3), context=ctx)
    try:
        up.start()
        assert wait_for(lambda: up.counters.deferred >= 1 and up.counters.acked == 10, 20)
        sent = up.counters.sent
        time.sleep(1.0)
        assert up.counters.sent == sent  # paused for the collector's retry_after, not hammering it
    finally:
        up.stop()
        collector.stop()
        ctx.term()
    assert spool.depth() == 20 and quarantine_size(tmp_path / "q", "default", 1) == 10
    spool.close()


# -- 3. one bad message rejects only itself -------------------------------------------------------------------


def test_one_bad_message_rejects_only_itself(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = tiny_store(tmp_path / "exports")
    c = Collector(CollectorConfig(root=tmp_path / "q", max_tensor_bytes=8192), spec_source(store))
    bad = [
        message(100, version=2**64 - 1),  # SQLite OverflowError on the old code
        message(101, shape=[2**62 + 196, 4], tensor=b"\x00" * 3136),  # size product wrapped to 3,136 bytes
        message(2**64 - 1),  # a seq SQLite cannot hold
        message(103, dtype="(2,)f4"),  # a numpy sub-array dtype
        message(104, shape=[1] * 40),
        message(105, fleet="../../etc"),
        [b"cam-1", b"\x0a\xff\xff\xff\xff\x0f", GOOD_TENSOR],  # truncated protobuf
    ]
    stats = quarantine_pb2.AgentStats(device_id="cam-1", fleet="default", bundle_version=2**64 - 1, requests=2**64 - 1)
    batch = [message(i) for i in range(5)] + bad + [[b"cam-1", stats.SerializeToString()]] + [message(5)]
    with caplog.at_level(logging.WARNING, logger="trainer.service.collector"):
        replies = c.handle(batch)
    got = {r.seq: r.status for _, r in replies}
    assert [got[i] for i in range(6)] == [Reply.ACK] * 6  # every good message in the batch is stored
    assert sum(1 for _, r in replies if r.status == Reply.REJECTED) == len(bad)
    assert quarantine_size(tmp_path / "q", "default", 1) == 6
    assert c.counters.malformed_frames == 1 and c.counters.internal_errors == 0
    assert not [r for r in caplog.records if r.exc_info]  # no traceback for anything a sender did


def test_refusals_are_logged_once_per_device_and_reason_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = Collector(CollectorConfig(root=tmp_path / "q", log_interval=60.0), fixed_spec("default", SPEC))
    with caplog.at_level(logging.WARNING, logger="trainer.service.collector"):
        for i in range(300):
            c.handle([message(i, version=9)])
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and c.counters.by_reason["unknown-version"] == 300


def test_valid_messages_are_all_acked_while_an_attacker_sends_malformed_ones(tmp_path: Path) -> None:
    from edge_agent.spool import Spool, SpoolConfig
    from edge_agent.uplink import Uplink, UplinkConfig

    store = tiny_store(tmp_path / "exports")
    ctx = zmq.Context()
    collector = Collector(CollectorConfig("tcp://127.0.0.1:0", tmp_path / "q"), spec_source(store), None, ctx).start()
    stop = threading.Event()
    sent = [0]

    def attack() -> None:
        s = dealer(ctx, collector.port, b"mallory")
        poison = [
            message(1, device="mallory", version=2**64 - 1)[1:],
            message(2, device="mallory", shape=[2**62 + 196, 4], tensor=b"\x00" * 3136)[1:],
        ]
        while not stop.is_set():
            s.send_multipart(poison[sent[0] % 2])
            sent[0] += 1
            time.sleep(0.005)
        s.close()

    spool = Spool(SpoolConfig(tmp_path / "victim.sqlite", durability="power"))
    for _ in range(300):
        spool.put(header(0, device="cam-1").SerializeToString(), GOOD_TENSOR)
    attacker = threading.Thread(target=attack)
    up = Uplink(spool, UplinkConfig(f"tcp://127.0.0.1:{collector.port}", "cam-1", resend_after=30), context=ctx)
    try:
        attacker.start()
        time.sleep(0.3)
        up.start()
        assert wait_for(lambda: up.counters.acked == 300, 30)
    finally:
        stop.set()
        attacker.join()
        up.stop()
        collector.stop()
        ctx.term()
    assert up.counters.sent == 300 and up.counters.resent == 0  # each went once, each was answered at once
    assert sent[0] > 20 and collector.counters.rejected >= sent[0] - 5
    assert quarantine_size(tmp_path / "q", "default", 1) == 300
    spool.close()


# -- 2. a CURVE key speaks for one device only ---------------------------------------------------------------


def test_a_curve_key_is_bound_to_its_device(tmp_path: Path) -> None:
    from edge_agent.formats.curve import configure_client

    keys = tmp_path / "keys"
    for name in ("collector", "cam-0", "cam-1"):
        assert run_cli("trainer", "keys", "curve", "--out", str(keys), "--name", name)[0] == 0
    allow = tmp_path / "allow"
    allow.mkdir()
    for name in ("cam-0", "cam-1"):
        (allow / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    ctx = zmq.Context()
    cfg = CollectorConfig("tcp://127.0.0.1:0", tmp_path / "q", curve_secret=keys / "collector.key_secret",
                          curve_allow=allow)  # fmt: skip
    collector = Collector(cfg, fixed_spec("default", SPEC), None, ctx).start()
    socks = []
    try:
        for identity in (b"cam-0", b"cam-1"):  # both with cam-0's key
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, identity)
            s.setsockopt(zmq.LINGER, 0)
            configure_client(s, keys / "cam-0.key_secret", keys / "collector.key")
            s.connect(f"tcp://127.0.0.1:{collector.port}")
            socks.append(s)
            s.send_multipart(message(1, device=identity.decode())[1:])
            stats = quarantine_pb2.AgentStats(device_id=identity.decode(), fleet="default", bundle_version=1)
            s.send_multipart([stats.SerializeToString()])
        replies = []
        for s in socks:
            assert s.poll(10_000)
            replies.append(Reply.FromString(s.recv()))
        assert replies[0].status == Reply.ACK
        assert replies[1].status == Reply.REJECTED and "key of device 'cam-0'" in replies[1].error
        assert wait_for(lambda: collector.counters.stats == 1 and collector.counters.by_reason["identity"] == 2)
    finally:
        for s in socks:
            s.close()
        collector.stop()
        ctx.term()
    assert quarantine_size(tmp_path / "q", "default", 1) == 1


# -- 1. an agent's certificate cannot publish --------------------------------------------------------------


def test_operator_rpcs_need_an_operator_certificate(tmp_path: Path) -> None:
    import grpc

    from edge_agent.formats.tls import channel, channel_credentials, make_local_ca
    from protos.nnoc.v1 import model_service_pb2 as ms
    from protos.nnoc.v1 import model_service_pb2_grpc as ms_grpc
    from trainer.service.model_service import ModelServer, ModelServicer, ServiceConfig
    from trainer.service.registry import Registry

    store = tiny_store(tmp_path / "exports", versions=(1, 2))
    store.create("other")
    store.add("other", tiny_bundle(tmp_path / "other-1", "other", 1))
    pki = make_local_ca(tmp_path / "pki", ["server", "ops", "cam-0", "cam-9"])
    cfg = ServiceConfig(
        listen="127.0.0.1:0", tls_cert=pki["server"], tls_key=pki["server"].with_suffix(".key"),
        tls_client_ca=pki["ca"], operators=("ops",), agent_fleets=(("cam-[0-8]", "default"),),
    )  # fmt: skip
    servicer = ModelServicer(store, Registry(tmp_path / "r.sqlite"), tmp_path / "q", cfg)
    server = ModelServer(servicer, cfg).start()

    def stub(name: str) -> Any:
        creds = channel_credentials(pki["ca"], pki[name], pki[name].with_suffix(".key"))
        return ms_grpc.ModelServiceStub(channel(f"127.0.0.1:{server.port}", creds))

    try:
        agent, ops, stranger = stub("cam-0"), stub("ops"), stub("cam-9")
        for call, request in (
            (agent.Publish, ms.PublishRequest(fleet="default", version=2)),
            (agent.Rollback, ms.RollbackRequest(fleet="default", version=1)),
            (agent.ListFleets, ms.ListFleetsRequest()),
            (agent.FleetStatus, ms.FleetStatusRequest(fleet="default")),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call(request, timeout=5)
            assert (
                e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                and "'cam-0' is not an operator" in e.value.details()
            )
        assert store.state("default").current == 1  # nothing changed
        assert ops.Publish(ms.PublishRequest(fleet="default", version=2), timeout=5).current_version == 2
        assert store.state("default").history[-1]["by"] == "'ops' over gRPC"
        # Agents read their own fleet only, as themselves only.
        notices = agent.Subscribe(ms.SubscribeRequest(fleet="default", device_id="cam-0"), timeout=5)
        assert next(iter(notices)).version == 2
        notices.cancel()
        for s, request in (
            (agent, ms.SubscribeRequest(fleet="default", device_id="cam-1")),  # another device's name
            (agent, ms.SubscribeRequest(fleet="other", device_id="cam-0")),  # another fleet
            (stranger, ms.SubscribeRequest(fleet="default", device_id="cam-9")),  # not mapped to any fleet
        ):
            with pytest.raises(grpc.RpcError) as e:
                next(iter(s.Subscribe(request, timeout=5)))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            list(agent.Download(ms.DownloadRequest(fleet="other", version=1, name="primary.onnx"), timeout=5))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert servicer.denied == {"Publish": 1, "Rollback": 1, "ListFleets": 1, "FleetStatus": 1, "Subscribe": 3,
                                   "Download": 1}  # fmt: skip
    finally:
        server.stop()


def test_operator_rpcs_without_client_certificates_are_refused_unless_allowed(tmp_path: Path) -> None:
    import grpc

    from protos.nnoc.v1 import model_service_pb2 as ms
    from protos.nnoc.v1 import model_service_pb2_grpc as ms_grpc
    from trainer.service.model_service import ModelServer, ModelServicer, ServiceConfig
    from trainer.service.registry import Registry

    store = tiny_store(tmp_path / "exports", versions=(1, 2))
    for allowed in (False, True):
        cfg = ServiceConfig(listen="127.0.0.1:0", insecure_operators=allowed)
        server = ModelServer(ModelServicer(store, Registry(tmp_path / "r.sqlite"), tmp_path / "q", cfg), cfg).start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                call = ms_grpc.ModelServiceStub(ch).Publish
                if allowed:
                    assert call(ms.PublishRequest(fleet="default", version=2), timeout=5).current_version == 2
                    assert "without a client certificate" in store.state("default").history[-1]["by"]
                else:
                    with pytest.raises(grpc.RpcError) as e:
                        call(ms.PublishRequest(fleet="default", version=2), timeout=5)
                    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert "--insecure-operators" in e.value.details()
        finally:
            server.stop()


# -- 4. ports bind exclusively; a taken or invalid port is one line ---------------------------------------------


def one_line_error(code: int, err: str) -> None:
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert len([ln for ln in err.splitlines() if " ERROR " in ln or ln.startswith("nnoc-")]) == 1, err[-2000:]


def test_a_taken_port_is_refused_not_shared(tmp_path: Path) -> None:
    from conftest import free_port
    from edge_agent.ports import PortError
    from trainer.service.model_service import ModelServer, ModelServicer, ServiceConfig
    from trainer.service.registry import Registry

    store = tiny_store(tmp_path / "exports")
    port = free_port()
    cfg = ServiceConfig(listen=f"127.0.0.1:{port}", insecure_operators=True)
    first = ModelServer(ModelServicer(store, Registry(tmp_path / "r.sqlite"), tmp_path / "q", cfg), cfg).start()
    try:
        with pytest.raises(PortError, match="cannot listen"):
            ModelServer(ModelServicer(store, Registry(tmp_path / "r2.sqlite"), tmp_path / "q", cfg), cfg)
    finally:
        first.stop()
    # serve: a taken collector port and an impossible port are one line and exit 2.
    ctx = zmq.Context()
    taken = ctx.socket(zmq.ROUTER)
    zport = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        common = ["serve", "--store", str(store.root), "--insecure", "--no-jobs", "--listen", "127.0.0.1:0"]
        code, _, err = run_cli("trainer", *common, "--state-dir", str(tmp_path / "s1"),
                               "--collector", f"tcp://127.0.0.1:{zport}", check=False)  # fmt: skip
        one_line_error(code, err)
        assert "collector cannot bind" in err
        assert not (tmp_path / "s1" / "serve.json").exists()
        code, _, err = run_cli("trainer", *common[:-2], "--listen", "127.0.0.1:70000", check=False)
        one_line_error(code, err)
        assert "--listen '127.0.0.1:70000'" in err
    finally:
        taken.close()
        ctx.term()
    code, _, err = run_cli("edge_agent", "run", "--device-id", "cam-1", "--fleet", "f", "--infer-port", "70000",
                           "--insecure", "--state-dir", str(tmp_path / "e"), check=False)  # fmt: skip
    one_line_error(code, err)
    assert "--infer-port" in err and "65535" in err


def test_serve_holds_its_state_folder(tmp_path: Path) -> None:
    from edge_agent.ports import PortError, StateLock

    lock = StateLock(tmp_path / "state", "serve.lock", "another 'nnoc-trainer serve'")
    try:
        store = tiny_store(tmp_path / "exports")
        code, _, err = run_cli("trainer", "serve", "--store", str(store.root), "--state-dir", str(tmp_path / "state"),
                               "--insecure", "--listen", "127.0.0.1:0", "--collector", "tcp://127.0.0.1:0",
                               check=False)  # fmt: skip
        one_line_error(code, err)
        assert f"pid {os.getpid()}" in err
        with pytest.raises(PortError, match="in use"):
            StateLock(tmp_path / "state", "serve.lock", "x")
    finally:
        lock.release()
    StateLock(tmp_path / "state", "serve.lock", "x").release()  # free again once released


# -- 5. one agent per state folder; files removed by their owner only ----------------------------------------


def test_a_second_agent_on_one_state_dir_exits_naming_the_first(
    predeployed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    import json
    import subprocess
    import sys

    from conftest import ROOT

    state = tmp_path / "state"
    args = ["run", "--insecure", "--device-id", "cam-1", "--fleet", "default", "--bundle",
            str(predeployed[0] / "bundle"), "--infer-port", "0", "--state-dir", str(state), "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "edge_agent", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: (state / "agent.json").is_file(), 60)
        code, _, err = run_cli("edge_agent", *args, check=False)
        one_line_error(code, err)
        assert f"pid {first.pid}" in err
        assert json.loads((state / "agent.json").read_text())["pid"] == first.pid  # the second removed nothing
        code, status, _ = run_cli("edge_agent", "status", "--state-dir", str(state))
        assert status is not None and status["running"]["pid"] == first.pid
    finally:
        first.terminate()
        first.wait(30)
    assert not (state / "agent.json").exists()


# -- 6. the inference endpoint: a batch limit, and every request on /metrics ----------------------------------


def test_endpoint_refuses_oversized_batches_and_counts_requests(
    predeployed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    import grpc

    from edge_agent.agent import Agent
    from edge_agent.ensemble import Ensemble
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.inference import serve
    from edge_agent.metrics import AgentMetrics
    from edge_agent.monitor import RejectMonitor
    from edge_agent.spool import Spool, SpoolConfig
    from protos.inference import grpc_predict_v2_pb2 as pb
    from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    bundle = verify_bundle(predeployed[0] / "bundle")
    name = bundle.manifest.input_spec.input_name

    def request(n: int, value: float = 0.5) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name="fleet")
        req.inputs.add(name=name, datatype="FP32", shape=[n, 1, 28, 28])
        req.raw_input_contents.append(np.full((n, 1, 28, 28), value, np.float32).tobytes())
        return req

    with Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power")) as spool:
        agent = Agent(Ensemble(bundle), spool, RejectMonitor(), "cam-1")
        metrics = AgentMetrics(agent)
        server, port = serve(agent, "fleet", "127.0.0.1:0", max_batch=64, metrics=metrics)
        try:
            from edge_agent.ports import PortError

            with pytest.raises(PortError, match="is the port taken"):  # 4: no second endpoint on the same port
                serve(agent, "fleet", f"127.0.0.1:{port}")
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                for _ in range(3):
                    stub.ModelInfer(request(8), timeout=30)
                for n in (65, 20_000):  # over the limit; the second is also far over the message size it implies
                    with pytest.raises(grpc.RpcError) as e:
                        stub.ModelInfer(request(n), timeout=30)
                    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                with pytest.raises(grpc.RpcError) as e:
                    stub.ModelInfer(request(2, float("nan")), timeout=30)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert stub.ModelInfer(request(64), timeout=30).outputs[0].shape == [64]  # the limit itself is fine
        finally:
            server.stop(0)
    sample = metrics.registry.get_sample_value
    assert sample("nnoc_requests_handled_total", {"origin": "endpoint"}) == 4
    assert sample("nnoc_invalid_requests_total", {"origin": "endpoint"}) == 2
    assert sample("nnoc_oversized_requests_total") == 1  # the 20,000 one never reached the servicer
    assert sample("nnoc_request_seconds_count", {"origin": "endpoint"}) == 4


# -- 7. what `verify` says, and `classify --trusted-key` ---------------------------------------------------------


def test_verify_says_what_it_checked_and_catches_an_edited_json_manifest(
    predeployed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    import json
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(predeployed[0] / "bundle", bundle)
    code, out, _ = run_cli("edge_agent", "verify", "--bundle", str(bundle))
    assert code == 0 and out is not None and out["hashes"] == "ok" and out["signature"].startswith("not checked")
    assert "verified" not in out
    assert run_cli("trainer", "keys", "generate", "--out", str(tmp_path / "k"))[0] == 0
    code, _, err = run_cli("edge_agent", "classify", "--bundle", str(bundle), "--trusted-key",
                           str(tmp_path / "k" / "signing.pub"), str(tmp_path / "x.png"), check=False)  # fmt: skip
    one_line_error(code, err)
    assert "not signed" in err
    shown = json.loads((bundle / "manifest.json").read_text())
    shown["version"] = "9"
    (bundle / "manifest.json").write_text(json.dumps(shown))
    code, _, err = run_cli("edge_agent", "verify", "--bundle", str(bundle), check=False)
    one_line_error(code, err)
    assert "manifest.json disagrees with manifest.pb" in err


# -- 8. careless input on the command lines: one line, exit 2, nothing left behind --------------------------------


@pytest.mark.slow
def test_cli_refuses_nonsense_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    small = ["--train-size", "500", "--test-size", "200", "--valid-size", "200", "--stream-size", "100"]
    for args, says in (
        (["attack", "--batch-size", "0", "--out", str(tmp_path / "a")], "at least 1"),
        (["attack", "--epochs", "0", "--out", str(tmp_path / "a")], "at least 1"),
        (["attack", "--out", str(tmp_path / "afile")], "is a file"),
        (["predeploy", "--model", "m.pt", "--out", str(tmp_path / "p"), "--epochs", "0"], "at least 1"),
        (["predeploy", "--model", "m.pt", "--out", str(tmp_path / "p"), "--fleet", "../evil"], "letters, digits"),
        (["stream", "--bundle", "b", "--trigger", "checker4", "--out", str(tmp_path / "s"), "--n", "0"], "at least 1"),
        (["stream", "--bundle", "b", "--trigger", "checker4", "--out", str(tmp_path / "s"), "--target", "10", *small],
         "no target class 10"),
        (["fleet", "status", "f", "--store", str(tmp_path / "nostore")], "no model store"),
        (["fleet", "create", "f", "--store", str(tmp_path / "st"), "--from", str(tmp_path / "missing")],
         "no such folder"),
    ):  # fmt: skip
        code, _, err = run_cli("trainer", *args, check=False)
        assert code == 2 and says in err and "Traceback" not in err, (args, err[-1500:])
    assert not (tmp_path / "nostore").exists()  # a status never creates a store
    assert not (tmp_path / "st" / "f").exists()  # a refused create leaves no empty fleet
    (tmp_path / "serve.toml").write_text('min-quarantine = "lots"\n')
    code, _, err = run_cli("trainer", "serve", "--config", str(tmp_path / "serve.toml"), check=False)
    one_line_error(code, err)
    assert "min-quarantine = 'lots'" in err
    code, _, err = run_cli("edge_agent", "status", "--state-dir", str(tmp_path / "nostate"), check=False)
    one_line_error(code, err)
    assert not (tmp_path / "nostate").exists()
    code, _, err = run_cli("edge_agent", "run", "--device-id", "cam-1", "--fleet", "f", "--insecure", "--state-dir",
                           str(tmp_path / "e"), "--source", "npy:/missing.npy", check=False)  # fmt: skip
    one_line_error(code, err)
    assert "no such file" in err and not (tmp_path / "e" / "agent.json").exists()


def test_toml_values_are_defaults_and_an_explicit_flag_wins(tmp_path: Path) -> None:
    from trainer.cli import _subparser, build_parser, config_defaults

    (tmp_path / "serve.toml").write_text('min-quarantine = 300\nrepair-profile = "standard"\noperators = ["ops"]\n')
    parser = build_parser()
    serve = _subparser(parser, "serve")
    serve.set_defaults(**config_defaults(serve, tmp_path / "serve.toml"))
    args = parser.parse_args(["serve", "--min-quarantine", "50"])
    assert (args.min_quarantine, args.repair_profile, args.operators) == (50, "standard", ["ops"])
    (tmp_path / "bad.toml").write_text('repair-profile = "fast"\n')
    with pytest.raises(ValueError, match="choose from"):
        config_defaults(serve, tmp_path / "bad.toml")


def test_16_bit_images_are_scaled_not_clipped(splits: Any, tmp_path: Path) -> None:
    from PIL import Image

    from edge_agent.formats.preprocess import Preprocess
    from edge_agent.images import load_images

    boot = splits.test.images[splits.test.labels == 9][0, 0]  # (28, 28) uint8
    Image.fromarray(boot).save(tmp_path / "boot8.png")
    Image.fromarray(boot.astype(np.uint16) * 257).save(tmp_path / "boot16.png")  # 0..65535, same picture
    assert Image.open(tmp_path / "boot16.png").mode.startswith("I")
    eight, sixteen = load_images([tmp_path / "boot8.png", tmp_path / "boot16.png"], (1, 28, 28), Preprocess())
    assert np.abs(eight.astype(int) - sixteen.astype(int)).max() <= 1


# -- 9. the demo: a wait that is a flag, a timeout that is one line ---------------------------------------------


def test_demo_timeout_is_one_line_with_what_it_waited_for(badnet: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    code, _, err = run_cli("trainer", "demo", "--profile", "tiny", "--model", str(badnet[0] / "model.pt"), "--out",
                           str(tmp_path / "demo"), "--wait", "0.01", check=False)  # fmt: skip
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert "give it longer with --wait SECONDS" in err and "no repaired version on every agent" in err
    assert not list((tmp_path / "demo" / "state").glob("serve.json"))  # what it started was stopped
