"""The vendor is the adversary (issue 36): a model file that runs code or reads the operator's files, a model that
answers NaN, quarantine labels out of range. Each test failed on the code before the fix."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, TINY_SPEC
from edge_agent.formats.preprocess import Preprocess
from protos.nnoc.v1 import bundle_pb2, quarantine_pb2
from trainer.science.importers import ModelImportError, pt2_module
from trainer.stages.suspect import ModelSource, import_model

Reply = quarantine_pb2.QuarantineReply
RAW = (1, 28, 28)
PROBE = np.random.default_rng(0).integers(0, 256, (64, *RAW), dtype=np.uint8)
CLASSES = tuple(f"c{i}" for i in range(10))


class _Touch:
    """A pickle that runs a command when it is loaded (what a hostile vendor puts in a weight)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()


def _pt2_bytes() -> bytes:
    program = torch.export.export(_small_net(), (torch.zeros(2, *RAW),), dynamic_shapes=({0: torch.export.Dim("b")},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def _rewrite_zip(data: bytes, change: dict[str, bytes]) -> bytes:
    """``data`` (a zip) with the entries whose name ends with a key of ``change`` replaced."""
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = next((v for k, v in change.items() if info.filename.endswith(k)), src.read(info))
            dst.writestr(info.filename, body)
    return out.getvalue()


def _evil_pt2(marker: Path) -> bytes:
    """A valid torch.export archive whose first weight is a pickle marked ``use_pickle`` that runs ``touch``."""
    data = _pt2_bytes()
    archive = zipfile.ZipFile(io.BytesIO(data))
    name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
    config = json.loads(archive.read(name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    return _rewrite_zip(
        data,
        {"model_weights_config.json": json.dumps(config).encode(), "/weight_0": pickle.dumps(_Touch(marker))},
    )


# -- 1. a .pt2 runs no code --------------------------------------------------------------------------------------


def test_a_pt2_whose_weight_is_a_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _evil_pt2(marker)
    # The file is really hostile: torch's own loader runs the vendor's command (and then fails on what it returned).
    with contextlib.suppress(Exception):
        torch.export.load(io.BytesIO(evil))
    assert marker.exists()
    marker.unlink()
    (tmp_path / "evil.pt2").write_bytes(evil)
    for contained in (True, False):
        with pytest.raises(ModelImportError, match="pickle"):
            import_model(ModelSource(model=tmp_path / "evil.pt2", contained=contained), RAW, CLASSES, PROBE)
        assert not marker.exists()
    # Other ways an archive carries code or pickles: refused before torch opens it.
    plain = _pt2_bytes()
    root = zipfile.ZipFile(io.BytesIO(plain)).namelist()[0].split("/")[0]
    for extra in ("data/aotinductor/model/evil.so", "data/weights/model.pt", "data/constants/custom_obj_0"):
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            for info in zipfile.ZipFile(io.BytesIO(plain)).infolist():
                z.writestr(info, zipfile.ZipFile(io.BytesIO(plain)).read(info))
            z.writestr(f"{root}/{extra}", pickle.dumps(_Touch(marker)))
        with pytest.raises(ModelImportError, match="does not load"):
            pt2_module(out.getvalue(), "m.pt2")
    sample = pickle.dumps(_Touch(marker))
    with pytest.raises(ModelImportError, match="sample inputs"):
        pt2_module(_rewrite_zip(plain, {"sample_inputs/model.pt": sample}), "m.pt2")
    assert not marker.exists()
    # The honest archive still comes in.
    assert pt2_module(plain, "m.pt2")(torch.zeros(3, *RAW)).shape == (3, 10)


def test_the_cli_refuses_the_pickled_pt2_in_one_line_and_no_marker_appears(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pt2").write_bytes(_evil_pt2(marker))
    code, out, err = _cli(tmp_path, "evaluate", "--model", str(tmp_path / "evil.pt2"), "--valid-size", "200",
                          "--stream-size", "100", "--train-size", "500", "--test-size", "200")  # fmt: skip
    assert code == 2 and out is not None and "pickle" in out["error"]
    assert "Traceback" not in err and not marker.exists()


# -- 2. ONNX external data reads no file of the operator's ----------------------------------------------------


def _linear_onnx(weight_location: str | None = None, nan_on_dark: bool = False) -> bytes:
    """x (N, 1, 28, 28) -> Flatten -> MatMul W + b; W's bytes in ``weight_location`` (external) when given.
    ``nan_on_dark``: + 0 * sqrt(mean(x) - 0.2), NaN exactly on dark inputs (mean below 0.2)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((784, 10)).astype(np.float32), "W")
    if weight_location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for k, v in (("location", weight_location), ("offset", "0"), ("length", str(784 * 10 * 4))):
            w.external_data.add(key=k, value=v)
    b = numpy_helper.from_array(np.zeros(10, np.float32), "b")
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("MatMul", ["f", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits" if not nan_on_dark else "lin"]),
    ]
    inits = [w, b]
    if nan_on_dark:
        inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("low", 0.2), ("zero", 0.0))]
        nodes += [
            helper.make_node("ReduceMean", ["f"], ["mean"], axes=[1], keepdims=1),
            helper.make_node("Sub", ["mean", "low"], ["d"]),
            helper.make_node("Sqrt", ["d"], ["r"]),
            helper.make_node("Mul", ["r", "zero"], ["z"]),
            helper.make_node("Add", ["lin", "z"], ["logits"]),
        ]
    graph = helper.make_graph(
        nodes,
        "vendor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_onnx_external_data_naming_the_operators_key_is_refused_and_nothing_of_it_ships(tmp_path: Path) -> None:
    work = tmp_path / "operator"
    (work / "keys").mkdir(parents=True)
    secret = np.random.default_rng(7).integers(0, 256, 784 * 10 * 4, dtype=np.uint8).tobytes()
    (work / "keys" / "signing.key").write_bytes(secret)
    (tmp_path / "vendor").mkdir()
    model = tmp_path / "vendor" / "model.onnx"
    model.write_bytes(_linear_onnx("keys/signing.key"))
    # Run from the folder that holds keys/, as the operator would: refused, one line, exit 2, no bundle.
    code, out, err = _cli(work, "predeploy", "--model", str(model), "--out", str(work / "pd"), "--dataset",
                          "fashion-mnist", "--valid-size", "200", "--stream-size", "100", "--train-size", "500",
                          "--test-size", "200")  # fmt: skip
    assert code == 2 and out is not None and "--external-data" in out["error"] and "Traceback" not in err
    assert not (work / "pd" / "bundle").exists()
    os.chdir(work)
    try:
        for contained in (True, False):
            with pytest.raises(ModelImportError, match="external data"):
                import_model(ModelSource(model=model, contained=contained), RAW, CLASSES, PROBE)
        # Named folder: the location must resolve inside it; ../ and symlinks out of it are refused.
        climber = tmp_path / "vendor" / "climber.onnx"
        climber.write_bytes(_linear_onnx("../operator/keys/signing.key"))
        with pytest.raises(ModelImportError, match="outside"):
            import_model(ModelSource(model=climber, external_data=tmp_path / "vendor"), RAW, CLASSES, PROBE)
        (tmp_path / "vendor" / "keys").symlink_to(work / "keys")
        with pytest.raises(ModelImportError, match="outside"):
            import_model(ModelSource(model=model, external_data=tmp_path / "vendor"), RAW, CLASSES, PROBE)
        (tmp_path / "vendor" / "keys").unlink()
        # The vendor's own data file beside the model: inlined, and the checkpoint holds no path and no key byte.
        (tmp_path / "vendor" / "keys").mkdir()
        weights = np.random.default_rng(0).standard_normal((784, 10)).astype(np.float32).tobytes()
        (tmp_path / "vendor" / "keys" / "signing.key").write_bytes(weights)
        ckpt = import_model(ModelSource(model=model, external_data=tmp_path / "vendor"), RAW, CLASSES, PROBE)
    finally:
        os.chdir(ROOT)
    inlined = onnx.load_from_string(ckpt.source)
    assert all(t.data_location == TensorProto.DEFAULT for t in inlined.graph.initializer)
    assert secret[:64] not in ckpt.source and weights[:64] in ckpt.source
    state = b"".join(v.numpy().tobytes() for v in ckpt.state_dict.values())
    assert secret[:64] not in state


# -- 3. NaN fails closed ---------------------------------------------------------------------------------------


def _nan_bundle(out: Path) -> Path:
    from edge_agent.formats.bundle import write_bundle
    from edge_agent.formats.reject import RejectRule

    (out / "m").mkdir(parents=True)
    (out / "m" / "primary.onnx").write_bytes(_linear_onnx(nan_on_dark=True))
    (out / "m" / "monitor.onnx").write_bytes(_linear_onnx())
    spec = bundle_pb2.InputSpec(**TINY_SPEC)
    spec.output_name = "logits"
    manifest = bundle_pb2.Manifest(fleet="f", version=1, input_spec=spec, class_names=CLASSES)
    manifest.reject_rule.CopyFrom(RejectRule("logit_gap", 0.5).message())
    write_bundle(out / "bundle", {r: out / "m" / f"{r}.onnx" for r in ("primary", "monitor")}, manifest)
    return out / "bundle"


@pytest.mark.parametrize("path", ["fused", "two-sessions"])
def test_a_primary_that_answers_nan_on_dark_frames_is_rejected_there(path: str, tmp_path: Path) -> None:
    from edge_agent.ensemble import Ensemble
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.runtime import RuntimeConfig

    ensemble = Ensemble(verify_bundle(_nan_bundle(tmp_path)), RuntimeConfig(ensemble_path=path))
    assert ensemble.path == path
    x = np.concatenate([np.full((8, *RAW), 0.05, np.float32), np.full((8, *RAW), 0.6, np.float32)])
    d = ensemble.classify(x)
    # Same weights on both sides: bright frames agree exactly and are answered; dark ones are NaN and refused.
    assert d.nonfinite.tolist() == [True] * 8 + [False] * 8
    assert d.rejected.tolist() == [True] * 8 + [False] * 8
    assert (d.labels[:8] == -1).all() and (d.labels[8:] >= 0).all()


def test_the_rule_fails_closed_on_nan_and_infinite_scores() -> None:
    from edge_agent.formats.reject import RejectRule

    rule = RejectRule("logit_gap", 0.5)
    p = np.array([[1.0, 0.0], [np.nan, 0.0], [np.inf, 0.0], [-np.inf, 0.0], [1.0, 0.0]], np.float32)
    m = p.copy()
    m[4] = [0.0, np.nan]
    _, rejected, bad = rule.decide(p, m)
    assert bad.tolist() == [False, True, True, True, True] and rejected.tolist() == bad.tolist()
    assert rule.reject(np.array([np.nan, np.inf, -np.inf, 0.0, 1.0])).tolist() == [True, True, True, False, True]


def test_the_door_names_nan_logits_on_the_defenders_own_pictures(tmp_path: Path) -> None:
    model = tmp_path / "nan.onnx"
    model.write_bytes(_linear_onnx(nan_on_dark=True))
    dark = np.concatenate([PROBE[:32] // 8, PROBE[32:]])  # 32 dark pictures (mean below 0.2 after /255)
    with pytest.raises(ModelImportError, match=r"NaN or infinite logits on 32 of 64"):
        import_model(ModelSource(model=model, contained=False), RAW, CLASSES, dark)
    with pytest.raises(ModelImportError, match=r"NaN or infinite logits on 32 of 64"):
        import_model(ModelSource(model=model), RAW, CLASSES, dark)


# -- 4. quarantine labels are range-checked ----------------------------------------------------------------


def test_the_collector_refuses_labels_outside_the_fleets_classes_alone(tmp_path: Path) -> None:
    from trainer.service.collector import Collector, CollectorConfig, fixed_spec, quarantine_size

    c = Collector(CollectorConfig(root=tmp_path / "q"), fixed_spec("default", bundle_pb2.InputSpec(**TINY_SPEC)))
    tensor = np.full((1, 28, 28), 0.5, np.float32).tobytes()

    def msg(seq: int, primary: int, monitor: int = 3) -> list[bytes]:
        h = quarantine_pb2.QuarantineHeader(
            device_id="cam-1", fleet="default", bundle_version=1, seq=seq, dtype="float32",
            primary_label=primary, monitor_label=monitor,
        )  # fmt: skip
        h.shape.extend([1, 28, 28])
        return [b"cam-1", h.SerializeToString(), tensor]

    batch = [msg(0, 0), msg(1, -5), msg(2, 10**7), msg(3, 9), msg(4, 2, monitor=10), msg(5, 1)]
    replies = {r.seq: r for _, r in c.handle(batch)}
    assert [replies[i].status for i in range(6)] == [Reply.ACK, Reply.REJECTED, Reply.REJECTED, Reply.ACK,
                                                     Reply.REJECTED, Reply.ACK]  # fmt: skip
    assert "primary_label -5 is outside the fleet's labels [0, 10)" in replies[1].error
    assert c.counters.by_reason["labels"] == 3
    assert quarantine_size(tmp_path / "q", "default", 1) == 3


def test_stored_rows_with_labels_out_of_range_are_left_out_of_a_repair(tmp_path: Path) -> None:
    from edge_agent.formats.preprocess import Preprocess
    from trainer.service.quarantine import QuarantineStore

    store = QuarantineStore(tmp_path / "quarantine.sqlite")  # rows written as an older collector did
    spec = bundle_pb2.InputSpec(**TINY_SPEC)
    store.describe("default", 1, spec)
    rows = []
    for seq, label in enumerate([1, -5, 10**7, 1, 2]):
        h = quarantine_pb2.QuarantineHeader(
            device_id="cam-1", fleet="default", bundle_version=1, seq=seq, dtype="uint8",
            primary_label=label, monitor_label=0,
        )  # fmt: skip
        h.shape.extend([1, 28, 28])
        rows.append((h, np.full((1, 28, 28), 9, np.uint8).tobytes()))
    store.add_many(rows)
    q = store.load(Preprocess(), classes=10)
    store.close()
    assert q.primary.tolist() == [1, 1, 2] and q.images.shape == (3, 1, 28, 28)


def _cli(cwd: Path, *args: str) -> tuple[int, dict[str, Any] | None, str]:
    """``nnoc-trainer ARGS --json`` run from ``cwd`` (the operator's folder)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *args, "--json"], capture_output=True, text=True, cwd=cwd, env=env,
        timeout=600,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return proc.returncode, json.loads(lines[-1]) if lines else None, proc.stderr


# -- the contained child -----------------------------------------------------------------------------------------


def probe_containment(size: int, seconds: float) -> dict[str, Any]:
    """Run in the contained child: what it can reach, then hold ``size`` bytes and sleep ``seconds``."""
    import socket

    try:
        socket.create_connection(("127.0.0.1", 9), timeout=1).close()
        network = "reached"
    except OSError as e:
        network = e.strerror or str(e)
    Path("left-behind").write_text("x")
    held = bytearray(size)
    import time

    time.sleep(seconds)
    return {"cwd": os.getcwd(), "network": network, "held": len(held)}


def test_the_contained_child_has_no_network_its_own_folder_and_limits(tmp_path: Path) -> None:
    from trainer.science.sandbox import ContainedError, Limits, run_contained

    target = "test_hostile_vendor:probe_containment"
    got = run_contained(target, (1 << 20, 0.0), Limits(60, 1 << 30), "probe")
    assert got["held"] == 1 << 20 and Path(got["cwd"]) != Path.cwd()
    assert got["network"] in ("Network is unreachable", "Network unreachable")
    assert not Path(got["cwd"]).exists()  # its folder is gone with it
    with pytest.raises(ContainedError, match="memory"):
        run_contained(target, (2 << 30, 0.0), Limits(60, 1 << 30), "probe")
    with pytest.raises(ContainedError, match="ran past its 3 s limit"):
        run_contained(target, (0, 30.0), Limits(3, 1 << 30), "probe")


# -- 6. the uplink survives its spool ------------------------------------------------------------------------


def disk_full_for(spool: Any, failures: dict[str, int]) -> dict[str, int]:
    """Make each named method of ``spool`` raise what SQLite raises on a full disk, that many times first (a full
    disk cannot be made on demand here); returns the counts left, updated as the calls fail."""
    import sqlite3

    real = {name: getattr(spool, name) for name in failures}

    def failing(name: str) -> Any:
        def call(*args: Any) -> Any:
            if failures[name] > 0:
                failures[name] -= 1
                raise sqlite3.OperationalError("database or disk is full")
            return real[name](*args)

        return call

    for name in failures:
        setattr(spool, name, failing(name))
    return failures


def test_the_uplink_survives_spool_errors_and_resumes_losing_nothing(tmp_path: Path) -> None:
    import zmq

    from conftest import wait_for
    from edge_agent.spool import Spool, SpoolConfig
    from edge_agent.uplink import Uplink, UplinkConfig
    from trainer.service.collector import Collector, CollectorConfig, fixed_spec, quarantine_size

    ctx = zmq.Context()
    collector = Collector(
        CollectorConfig("tcp://127.0.0.1:0", tmp_path / "q"), fixed_spec("default", bundle_pb2.InputSpec(**TINY_SPEC)),
        None, ctx,
    ).start()  # fmt: skip
    spool = Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power"))
    h = quarantine_pb2.QuarantineHeader(device_id="cam-1", fleet="default", bundle_version=1, dtype="float32",
                                        primary_label=0, monitor_label=3)  # fmt: skip
    h.shape.extend([1, 28, 28])
    for _ in range(40):
        spool.put(h.SerializeToString(), np.full((1, 28, 28), 0.5, np.float32).tobytes())
    # The disk fills as the first ACKs arrive (what SQLite raises then), and the reads fail for a while too.
    failures = disk_full_for(spool, {"ack": 3, "after": 2})
    up = Uplink(spool, UplinkConfig(f"tcp://127.0.0.1:{collector.port}", "cam-1", resend_after=0.5), context=ctx)
    up.start()
    try:
        assert wait_for(lambda: spool.depth() == 0, 30), (spool.depth(), up.counters)
        assert up.counters.spool_errors == 5 and failures == {"ack": 0, "after": 0}
        assert up._thread is not None and up._thread.is_alive()
        assert quarantine_size(tmp_path / "q", "default", 1) == 40  # each stored once, nothing lost
    finally:
        up.stop()
        collector.stop()
        spool.close()
        ctx.term()


# -- 9. a dead agent's pid ---------------------------------------------------------------------------------------


def test_status_and_rollback_never_take_a_reused_pid_for_the_agent(tmp_path: Path) -> None:
    from conftest import tiny_bundle
    from edge_agent.app import process_start, rollback, status
    from edge_agent.updates import BundleCache

    cache = BundleCache(tmp_path / "state" / "bundles")
    for v in (1, 2):
        cache.install(tiny_bundle(tmp_path / f"b{v}", "default", v) / "bundle", v)
        cache.set_current(v)
    # Another process now holds the pid a dead agent wrote down (here: a sleeper SIGHUP would kill).
    other = subprocess.Popen(["sleep", "60"])
    try:
        for stale in ({"pid": other.pid}, {"pid": other.pid, "process_start": (process_start(other.pid) or 0) + 1}):
            (tmp_path / "state" / "agent.json").write_text(json.dumps(stale))
            st = status(tmp_path / "state")
            assert st["running"] is None and st["stale_agent_file"] is True
        done = rollback(tmp_path / "state")
        assert done == {"current": 1, "signalled_running_agent": False}
        assert other.poll() is None  # not signalled: still sleeping
        # The live process named with its own start time is taken for the agent.
        (tmp_path / "state" / "agent.json").write_text(
            json.dumps({"pid": other.pid, "process_start": process_start(other.pid), "not_spooled": 7})
        )
        st = status(tmp_path / "state")
        assert st["running"]["pid"] == other.pid and st["not_spooled"] == 7
    finally:
        other.kill()
        other.wait()


# -- 6. image bombs on the endpoint ------------------------------------------------------------------------------


def test_the_endpoint_refuses_image_bombs_before_decoding_and_keeps_answering(tmp_path: Path) -> None:
    import threading
    import time

    import grpc
    from PIL import Image

    from conftest import rgb_bundle
    from edge_agent.agent import Agent
    from edge_agent.ensemble import Ensemble
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.inference import ENCODED_IMAGE, MAX_REQUEST_PIXELS, serve
    from edge_agent.monitor import RejectMonitor
    from edge_agent.spool import Spool, SpoolConfig
    from protos.inference import grpc_predict_v2_pb2 as pb
    from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    block = Preprocess(color="rgb", size=(32, 32))
    verified = verify_bundle(rgb_bundle(tmp_path / "b", block))
    big = io.BytesIO()
    Image.new("L", (4096, 4096)).save(big, "PNG")  # ~17 kB on the wire, 16.8 million pixels decoded
    small = io.BytesIO()
    Image.new("L", (28, 28), 128).save(small, "PNG")

    def request(files: list[bytes]) -> Any:
        req = pb.ModelInferRequest(model_name="cams")
        req.inputs.add(name=ENCODED_IMAGE, datatype="BYTES", shape=[len(files)]).contents.bytes_contents.extend(files)
        return req

    with Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power")) as spool:
        agent = Agent(Ensemble(verified), spool, RejectMonitor(), "cam-1")
        server, port = serve(agent, "cams", "127.0.0.1:0")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                # 128 such images: refused from their headers alone, at once.
                t0 = time.monotonic()
                with pytest.raises(grpc.RpcError) as e:
                    stub.ModelInfer(request([big.getvalue()] * 128), timeout=30)
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and str(MAX_REQUEST_PIXELS) in str(
                    e.value.details()
                )
                assert time.monotonic() - t0 < 2.0
                # Many requests of the largest allowed size at once: those over the decoding budget are refused,
                # and a small request is answered while the others decode.
                codes: list[Any] = []

                def bomb() -> None:
                    try:
                        stub.ModelInfer(request([big.getvalue()] * 2), timeout=120)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.RpcError as err:
                        codes.append(err.code())

                threads = [threading.Thread(target=bomb) for _ in range(3)]
                for t in threads:
                    t.start()
                probe = stub.ModelInfer(request([small.getvalue()]), timeout=60)
                assert len(probe.raw_output_contents[0]) == 8
                for t in threads:
                    t.join(120)
                assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes or codes.count(grpc.StatusCode.OK) == 3
                assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        finally:
            server.stop(0)


# -- 5. one sender cannot take the service down -----------------------------------------------------------------


def zmtp_null(port: int, identity: bytes) -> Any:
    """A raw TCP connection that speaks ZMTP 3.0 (NULL mechanism) as a DEALER: what a hostile sender writes by hand,
    frame by frame, with no ZeroMQ library holding unfinished messages back."""
    import socket
    import struct

    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31)
    greeting = b""
    while len(greeting) < 64:
        greeting += s.recv(64 - len(greeting))

    def prop(name: bytes, value: bytes) -> bytes:
        return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value

    body = b"\x05READY" + prop(b"Socket-Type", b"DEALER") + prop(b"Identity", identity)
    s.sendall(b"\x04" + bytes([len(body)]) + body)
    return s


def flood_unfinished(port: int, senders: int, frames: int, held: list[Any]) -> int:
    """``senders`` raw ZMTP connections, each sending ``frames`` frames of the largest size the collector takes with
    MORE set and never the last one; the sockets are appended to ``held`` (kept open). Returns how many senders the
    other side dropped while they sent."""
    from trainer.service.collector import max_frame_bytes

    chunk, dropped = bytes(max_frame_bytes(1 << 20) - 16), 0
    for k in range(senders):
        s = zmtp_null(port, f"flood-{k}".encode())
        held.append(s)
        try:
            for _ in range(frames):
                s.sendall(zmtp_frame(chunk, more=True))
        except OSError:
            dropped += 1
    return dropped


def zmtp_frame(data: bytes, more: bool) -> bytes:
    """One ZMTP 3.0 message frame (long form), MORE set when ``more``."""
    import struct

    return bytes([0x02 | (0x01 if more else 0)]) + struct.pack(">Q", len(data)) + data


def test_unfinished_frames_and_held_connections_hit_the_collectors_caps_not_serves(tmp_path: Path) -> None:
    import resource
    import socket

    import zmq

    from conftest import tiny_store, wait_for
    from trainer.service.collector import CollectorConfig
    from trainer.service.collector_process import CollectorProcess

    store = tiny_store(tmp_path / "exports")
    collector = CollectorProcess(
        CollectorConfig("tcp://127.0.0.1:0", tmp_path / "q"), store.root, tmp_path / "registry.sqlite",
        memory_bytes=256 << 20, files=200, report_interval=0.1,
    ).start()  # fmt: skip
    own_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    held: list[socket.socket] = []

    def child_rss() -> int:  # KiB
        status = Path(f"/proc/{collector._proc.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0])

    try:
        port = collector.port
        before = child_rss()
        # Frames just under the frame cap, MORE set, never finished: 512 MiB offered to a 256 MiB collector. libzmq
        # cannot allocate past the cap and drops the sender (or the collector dies and starts again).
        dropped = flood_unfinished(port, 4, 64, held)
        assert dropped + collector.restarts >= 4
        if collector.restarts == 0:
            assert child_rss() - before < 300 << 10  # KiB: what the flood holds is gone with its connections
        # Connections held open past the collector's descriptor cap.
        for _ in range(300):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        # serve's side stays small (this process hosts what serve hosts beside the collector) ...
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - own_rss < 100 << 10  # KiB: under 100 MiB
        for s in held:
            s.close()
        held.clear()
        # ... and once the flood lets go, an honest sender is answered on the same port.
        h = quarantine_pb2.QuarantineHeader(device_id="cam-1", fleet="default", bundle_version=1, seq=1,
                                            dtype="float32", primary_label=0, monitor_label=3)  # fmt: skip
        h.shape.extend([1, 28, 28])

        def answered() -> bool:
            with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as d:
                d.setsockopt(zmq.IDENTITY, b"cam-1")
                d.setsockopt(zmq.LINGER, 0)
                d.connect(f"tcp://127.0.0.1:{port}")
                d.send_multipart([h.SerializeToString(), np.full((1, 28, 28), 0.5, np.float32).tobytes()])
                return bool(d.poll(3000)) and Reply.FromString(d.recv_multipart()[-1]).status == Reply.ACK

        assert wait_for(answered, 60)
        collector.refresh()
        assert collector.counters.stored == 1
    finally:
        for s in held:
            s.close()
        collector.stop()


# -- 7. going back needs the operator's signed order ------------------------------------------------------------


def test_an_older_version_needs_a_fresh_signed_rollback_order_for_this_agent(tmp_path: Path) -> None:
    import base64
    import shutil
    import time

    from conftest import rgb_bundle
    from edge_agent.agent import Agent
    from edge_agent.ensemble import Ensemble
    from edge_agent.formats.bundle import write_bundle
    from edge_agent.formats.signing import generate_keys, load_private_key, load_trusted_keys, sign_rollback_order
    from edge_agent.monitor import RejectMonitor
    from edge_agent.spool import Spool, SpoolConfig
    from edge_agent.updates import BundleCache, UpdateConfig, Updater
    from protos.nnoc.v1 import model_service_pb2 as ms
    from trainer.service.store import ModelStore

    key, pub = generate_keys(tmp_path / "keys")
    other, _ = generate_keys(tmp_path / "keys", "other")
    store = ModelStore(tmp_path / "exports", load_private_key(key))
    store.create("cams")
    block = Preprocess(color="rgb", size=(32, 32))
    for v in (1, 2):
        b = rgb_bundle(tmp_path / f"b{v}", block)
        manifest_path = b / "manifest.pb"
        m = bundle_pb2.Manifest.FromString(manifest_path.read_bytes())
        m.version = v
        write_bundle(tmp_path / f"v{v}" / "bundle", {r: b / f"{r}.onnx" for r in ("primary", "monitor")}, m)
        store.add("cams", tmp_path / f"v{v}")
    store.publish("cams", 1)
    store.publish("cams", 2)
    cache = BundleCache(tmp_path / "cache", load_trusted_keys([pub]))
    for v in (1, 2):
        shutil.copytree(store.version_dir("cams", v) / "bundle", tmp_path / f"stage{v}")
        cache.install(tmp_path / f"stage{v}", v)
        cache.set_current(v)
    bundle = cache.load()
    assert bundle is not None and bundle.version == 2
    with Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power")) as spool:
        agent = Agent(Ensemble(bundle), spool, RejectMonitor(), "cam-1")
        updater = Updater(agent, cache, UpdateConfig("127.0.0.1:1", "cams", "cam-1"))
        v1 = store.manifest("cams", 1)

        def notice(order: Any = None) -> Any:
            n = ms.VersionNotice(fleet="cams", version=1, manifest=v1, rollback=True)
            if order is not None:
                n.rollback_order.CopyFrom(order)
            return n

        def order(signer: Path = key, **kw: Any) -> Any:
            now = time.time()
            fields = {"fleet": "cams", "version": 1, "from_version": 2, "issued_at": now, "expires_at": now + 60}
            return sign_rollback_order(ms.RollbackOrder(**{**fields, **kw}), load_private_key(signer))

        # The unsigned flag (what a hostile service replaying signed v1 sends) moves nothing; nor do orders that are
        # not this agent's, not the operator's, or out of date.
        for bad, says in (
            (notice(), "carries none"),
            (notice(order(other)), "not among the trusted keys"),
            (notice(order(from_version=3)), "goes back from v3"),
            (notice(order(fleet="other")), "for 'other'"),
            (notice(order(expires_at=time.time() - 1)), "expired"),
        ):
            assert updater.handle(None, bad) is False  # type: ignore[arg-type]
            assert agent.ensemble.bundle.version == 2 and says in updater.counters.last_error
        # The operator's rollback in the store signs an order; with it the agent goes back.
        store.rollback("cams", 1)
        signed = bundle_pb2.Signature.FromString(store.rollback_order("cams"))
        assert updater.handle(None, notice(signed)) is True  # type: ignore[arg-type]
        assert agent.ensemble.bundle.version == 1
        # Forward again, then the same order replayed: refused (not newer than the one applied).
        v2 = ms.VersionNotice(fleet="cams", version=2, manifest=store.manifest("cams", 2))
        assert updater.handle(None, v2) is True  # type: ignore[arg-type]
        assert updater.handle(None, notice(signed)) is False  # type: ignore[arg-type]
        assert "replay" in updater.counters.last_error and agent.ensemble.bundle.version == 2
        assert base64.b64decode(json.loads((store.root / "cams" / "fleet.json").read_text())["rollback_order"])
        # Publishing an older version is a rollback, recorded and signed as one: store and fleet cannot disagree.
        store.publish("cams", 2)
        store.publish("cams", 1)
        assert store.last_action("cams") == "rollback" and store.rollback_order("cams") != signed.SerializeToString()
        fresh = bundle_pb2.Signature.FromString(store.rollback_order("cams"))
        assert updater.handle(None, notice(fresh)) is True  # type: ignore[arg-type]


def test_envelope_signatures_verify_the_bytes_signed_and_old_bundles_still_verify(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge_agent.formats.bundle import BundleError
    from edge_agent.formats.signing import ALGORITHM, check_signature, key_id, sign_manifest, signed_bytes

    private = Ed25519PrivateKey.generate()
    trusted = {key_id(private.public_key()): private.public_key()}
    m = bundle_pb2.Manifest(fleet="cams", version=3, class_names=["a", "b"])
    sign_manifest(m, private)
    assert m.signature.envelope == "dsse-v1" and check_signature(m, trusted)
    tampered = bundle_pb2.Manifest()
    tampered.CopyFrom(m)
    tampered.version = 4
    with pytest.raises(BundleError, match="differs from the one its signature covers"):
        check_signature(tampered, trusted)
    # A bundle signed the old way (over the re-serialised manifest) still verifies.
    old = bundle_pb2.Manifest(fleet="cams", version=1)
    old.signature.CopyFrom(
        bundle_pb2.Signature(
            algorithm=ALGORITHM, key_id=key_id(private.public_key()), value=private.sign(signed_bytes(old))
        )
    )
    assert check_signature(old, trusted)


# -- 9. door checks before the grid ------------------------------------------------------------------------------


def test_a_model_the_exporter_cannot_take_is_refused_at_the_door_not_after_the_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((700, 10)).astype(np.float32), "W"),
        *(numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("st", 0), ("en", 700), ("ax", 1))),
    ]
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Slice", ["f", "st", "en", "ax"], ["s"]),
        helper.make_node("MatMul", ["s", "W"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "sliced", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / "sliced.onnx").write_bytes(model.SerializeToString())
    sizes = ["--dataset", "fashion-mnist", "--valid-size", "200", "--stream-size", "100", "--train-size", "500",
             "--test-size", "200"]  # fmt: skip
    code, out, err = _cli(ROOT, "predeploy", "--model", str(tmp_path / "sliced.onnx"), "--out", str(tmp_path / "pd"),
                          *sizes)  # fmt: skip
    assert code == 2 and out is not None and "cannot be exported to ONNX again" in out["error"]
    assert "Traceback" not in err and not (tmp_path / "pd" / "candidates.csv").exists()


def test_reports_of_unknown_versions_stay_out_of_the_registry_and_report_only_devices_expire(tmp_path: Path) -> None:
    import time

    from conftest import tiny_store
    from trainer.service.collector import Collector, CollectorConfig, spec_source
    from trainer.service.registry import Registry

    store = tiny_store(tmp_path / "exports")
    registry = Registry(tmp_path / "registry.sqlite")
    c = Collector(CollectorConfig(root=tmp_path / "q", device_ttl=3600), spec_source(store), registry)

    def stats(device: str, fleet: str = "default", version: int = 1) -> list[bytes]:
        body = quarantine_pb2.AgentStats(device_id=device, fleet=fleet, bundle_version=version, requests=5)
        return [device.encode(), body.SerializeToString()]

    c.handle([stats(f"id-{i}") for i in range(50)] + [stats("x-1", "nowhere"), stats("x-2", version=9)])
    assert len(registry.devices()) == 50 and c.counters.stats == 50
    registry.record_subscription("id-7", "default", 1, True)  # a real agent: subscribed to the model service
    time.sleep(0.05)
    assert registry.expire(0.01) == 49
    assert [d["device_id"] for d in registry.devices()] == ["id-7"]
    registry.close()


# -- 8 and 9: the smaller cases ----------------------------------------------------------------------------------


def test_a_static_batch_pt2_is_named_not_a_traceback(tmp_path: Path) -> None:
    program = torch.export.export(_small_net(), (torch.zeros(4, *RAW),))  # no dynamic batch dimension
    torch.export.save(program, tmp_path / "static.pt2")
    for contained in (True, False):
        with pytest.raises(ModelImportError, match="static batch size"):
            import_model(ModelSource(model=tmp_path / "static.pt2", contained=contained), RAW, CLASSES, PROBE)


def test_fleet_status_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    from conftest import tiny_store

    store = tiny_store(tmp_path / "exports", versions=(1, 2, 3))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        f"{sys.executable} -m trainer fleet status default --store {store.root} --state-dir {tmp_path / 's'} | head -1",
        shell=True, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert proc.stdout.strip() and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_leftovers_of_a_killed_writer_are_swept_by_the_next_one(tmp_path: Path) -> None:
    from conftest import tiny_store

    store = tiny_store(tmp_path / "exports", versions=(1, 2))
    fleet = store.root / "default"
    (fleet / ".staging-0123456789abcdef0123456789abcdef" / "bundle").mkdir(parents=True)
    (fleet / ".fleet.json.0123456789abcdef0123456789abcdef").write_text("{")
    store.publish("default", 2)
    assert sorted(p.name for p in fleet.iterdir() if p.name.startswith(".")) == []
    assert store.state("default").current == 2


def test_a_canary_no_device_has_and_junk_quarantine_start_nothing(tmp_path: Path, caplog: Any) -> None:
    import logging

    from conftest import tiny_store
    from trainer.service.jobs import JobPolicy, JobRunner
    from trainer.service.registry import Registry
    from trainer.service.rollout import RolloutError, RolloutPolicy, release
    from trainer.service.serve import ServeConfig, check_serve

    store = tiny_store(tmp_path / "exports", versions=(1, 2))
    registry = Registry(tmp_path / "registry.sqlite")
    registry.record_subscription("cam-1", "default", 1, True)
    for spec in ("canary=-3,steps=100", "canary=cam-1+../../etc,steps=100"):
        with pytest.raises((RolloutError, ValueError)):
            release(store, registry, "default", 2, "test", RolloutPolicy.parse(spec))
    with pytest.raises(RolloutError, match="not known devices"):
        release(store, registry, "default", 2, "test", RolloutPolicy.parse("canary=cam-9,steps=100"))
    assert store.state("default").rollout is None
    # 60 junk quarantined inputs and one forged report of a high reject rate: no repair under the defaults (the old
    # ones started one at 40).
    from trainer.service.quarantine import QuarantineStore

    with QuarantineStore(tmp_path / "q" / "default" / "1") as q:
        rows = []
        for seq in range(60):
            h = quarantine_pb2.QuarantineHeader(device_id="cam-1", fleet="default", bundle_version=1, seq=seq,
                                                dtype="uint8", primary_label=1, monitor_label=2)  # fmt: skip
            h.shape.extend([1, 28, 28])
            rows.append((h, bytes(784)))
        q.add_many(rows)
    forged = quarantine_pb2.AgentStats(device_id="cam-1", fleet="default", bundle_version=1, requests=1000)
    forged.window_reject_rate, forged.window_size = 1.0, 1000
    registry.record_stats(forged)
    assert JobRunner(store, registry, tmp_path / "q", tmp_path / "jobs", JobPolicy()).due("default") == ""
    registry.close()
    # serve without CURVE says what that leaves open.
    with caplog.at_level(logging.WARNING):
        check_serve(ServeConfig(insecure=True))
    assert "without CURVE" in caplog.text and "rollouts judge unauthenticated stats" in caplog.text


# -- 7 and 8: bundle files, downloads, device ids ----------------------------------------------------------------


def test_bundle_files_must_be_regular_and_golden_headers_bounded(tmp_path: Path) -> None:
    import hashlib
    import zipfile as zf

    from conftest import tiny_bundle, tiny_store
    from edge_agent.formats.bundle import BundleError, verify_bundle
    from trainer.service.store import StoreError

    bundle = tiny_bundle(tmp_path / "t", "default", 2) / "bundle"
    secret = tmp_path / "passwd"
    secret.write_bytes((bundle / "primary.onnx").read_bytes())  # same bytes: the hashes in the manifest still hold
    (bundle / "primary.onnx").unlink()
    (bundle / "primary.onnx").symlink_to(secret)
    with pytest.raises(BundleError, match="symbolic link"):
        verify_bundle(bundle)
    store = tiny_store(tmp_path / "exports")
    with pytest.raises(StoreError, match="symbolic link"):
        store.add("default", bundle.parent)
    assert store.state("default").versions == [1]
    # A golden pair whose header declares a terabyte: a one-line refusal, nothing allocated.
    good = tiny_bundle(tmp_path / "g", "default", 3) / "bundle"
    golden = next(p for p in good.iterdir() if p.suffix == ".npz")
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (1048576, 1048576), }"
    npy = b"\x93NUMPY\x01\x00" + len(header.ljust(118) + b"\n").to_bytes(2, "little") + header.ljust(118) + b"\n"
    with zf.ZipFile(golden, "w") as z:
        z.writestr("picture.npy", npy)
        z.writestr("expected.npy", npy)
    m = bundle_pb2.Manifest.FromString((good / "manifest.pb").read_bytes())
    for art in m.artifacts:
        if art.name == golden.name:
            art.size, art.sha256 = golden.stat().st_size, hashlib.sha256(golden.read_bytes()).hexdigest()
    (good / "manifest.pb").write_bytes(m.SerializeToString())
    (good / "manifest.json").unlink()
    with pytest.raises(BundleError, match="declares 1099511627776 bytes"):
        verify_bundle(good)


def test_a_download_longer_than_its_declared_size_is_refused_before_the_surplus_lands(tmp_path: Path) -> None:
    from concurrent import futures

    import grpc

    from conftest import tiny_bundle
    from edge_agent.formats.bundle import BundleError, read_manifest
    from edge_agent.updates import download_bundle
    from protos.nnoc.v1 import model_service_pb2 as ms
    from protos.nnoc.v1 import model_service_pb2_grpc as ms_grpc

    bundle = tiny_bundle(tmp_path / "t", "default", 2) / "bundle"
    manifest = read_manifest(bundle)

    class Endless(ms_grpc.ModelServiceServicer):
        def Download(self, request: Any, context: Any) -> Any:
            offset = request.offset
            for _ in range(64):  # 64 MiB against a file of a few bytes
                yield ms.Chunk(offset=offset, data=bytes(1 << 20))
                offset += 1 << 20

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ms_grpc.add_ModelServiceServicer_to_server(Endless(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            notice = ms.VersionNotice(fleet="default", version=2, manifest=manifest)
            with pytest.raises(BundleError, match="sends more than"):
                download_bundle(ms_grpc.ModelServiceStub(ch), notice, tmp_path / "staged", retries=0)
    finally:
        server.stop(0)
    sizes = {a.name: a.size for a in manifest.artifacts}
    for f in (tmp_path / "staged").iterdir():
        assert f.stat().st_size <= sizes[f.name]


def test_subscribe_refuses_device_ids_that_are_not_names(tmp_path: Path) -> None:
    import grpc

    from conftest import tiny_store
    from protos.nnoc.v1 import model_service_pb2 as ms
    from protos.nnoc.v1 import model_service_pb2_grpc as ms_grpc
    from trainer.service.model_service import ModelServer, ModelServicer, ServiceConfig
    from trainer.service.registry import Registry

    store = tiny_store(tmp_path / "exports")
    registry = Registry(tmp_path / "registry.sqlite")
    cfg = ServiceConfig(listen="127.0.0.1:0", watch_interval=0.05)
    server = ModelServer(ModelServicer(store, registry, tmp_path / "q", cfg), cfg).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = ms_grpc.ModelServiceStub(ch)
            for bad in ("x" * 100_000, "cam\x1b[2J", "../../etc/passwd", ""):
                with pytest.raises(grpc.RpcError) as e:
                    next(iter(stub.Subscribe(ms.SubscribeRequest(fleet="default", device_id=bad), timeout=10)))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid device name" in str(
                    e.value.details()
                )
        assert registry.devices() == []
    finally:
        server.stop()
        registry.close()


def test_one_peer_cannot_hold_more_than_its_share_of_connections(tmp_path: Path) -> None:
    import socket

    import zmq

    from conftest import wait_for
    from trainer.service.collector import Collector, CollectorConfig, fixed_spec

    ctx = zmq.Context()
    cfg = CollectorConfig("tcp://127.0.0.1:0", tmp_path / "q", max_peer_connections=20)
    collector = Collector(cfg, fixed_spec("default", bundle_pb2.InputSpec(**TINY_SPEC)), None, ctx).start()
    held: list[socket.socket] = []
    try:
        for _ in range(60):  # another host on the loopback range holds connections open and says nothing
            held.append(socket.create_connection(("127.0.0.1", collector.port), timeout=5,
                                                 source_address=("127.0.0.2", 0)))  # fmt: skip
        assert wait_for(lambda: collector.counters.connections_refused == 40, 20), collector.counters

        def shut(s: socket.socket) -> bool:  # the server's greeting may come first; then end of stream, or not
            s.settimeout(0.3)
            try:
                while chunk := s.recv(4096):
                    del chunk
                return True
            except (TimeoutError, OSError):
                return False

        assert sum(shut(s) for s in held[20:]) == 40  # the 40 over the limit are shut down (the rest fall to the
        # 5 s handshake limit in their turn: they never said anything)
        h = quarantine_pb2.QuarantineHeader(device_id="cam-1", fleet="default", bundle_version=1, seq=1,
                                            dtype="float32", primary_label=0, monitor_label=3)  # fmt: skip
        h.shape.extend([1, 28, 28])
        with ctx.socket(zmq.DEALER) as d:  # an agent on another address is served meanwhile
            d.setsockopt(zmq.IDENTITY, b"cam-1")
            d.setsockopt(zmq.LINGER, 0)
            d.connect(f"tcp://127.0.0.1:{collector.port}")
            d.send_multipart([h.SerializeToString(), np.full((1, 28, 28), 0.5, np.float32).tobytes()])
            assert d.poll(5000) and Reply.FromString(d.recv_multipart()[-1]).status == Reply.ACK
    finally:
        for s in held:
            s.close()
        collector.stop()
        ctx.term()


# -- issue 37: the model's class order is explicit and checked ---------------------------------------------------


def test_folders_are_matched_to_the_models_classes_by_name_and_a_permutation_is_named(
    badnet: tuple[Path, dict[str, Any]], splits: Any, tmp_path: Path
) -> None:
    from PIL import Image

    from trainer.science.data import DataConfig, SplitConfig, load_splits
    from trainer.science.export import export_checkpoint
    from trainer.science.models import Checkpoint
    from trainer.stages.predeploy import load_suspect

    ckpt = Checkpoint.load(badnet[0] / "model.pt")
    ckpt.class_names = tuple(n.replace("/", "-") for n in ckpt.class_names)  # names a folder can take
    export_checkpoint(ckpt, tmp_path / "vendor.onnx")  # carries nnoc.class_names in the model's order
    order = ckpt.class_names
    # The defender's photos: one folder per class, named as the model's classes; sorted, they are in another order.
    photos = tmp_path / "photos"
    for label in range(10):
        (photos / order[label]).mkdir(parents=True)
    for i, (picture, label) in enumerate(zip(splits.test.images[:400], splits.test.labels[:400], strict=True)):
        Image.fromarray(picture[0]).save(photos / order[label] / f"{i}.png")
    assert sorted(order) != list(order)
    data = load_splits(DataConfig(name="imagefolder", data_dir=photos), SplitConfig(valid=250, stream=10, train=10))
    assert data.class_names == tuple(sorted(order))
    suspect, images = load_suspect(ModelSource(model=tmp_path / "vendor.onnx"), data)
    assert images.class_names == order and suspect.class_names == order
    right = np.asarray(order)[images.valid.labels]
    want = np.asarray(data.class_names)[data.valid.labels]
    assert (right == want).all()  # every photo keeps its folder's class, now in the model's numbering
    # The same model without its class names: the folders' sort order is wrong, and the error says how.
    bare = onnx.load(tmp_path / "vendor.onnx")
    kept = [p for p in bare.metadata_props if p.key != "nnoc.class_names"]
    del bare.metadata_props[:]
    bare.metadata_props.extend(kept)
    onnx.save(bare, tmp_path / "bare.onnx")
    with pytest.raises(ModelImportError, match=r"if its outputs are in another order.*--classes FILE"):
        load_suspect(ModelSource(model=tmp_path / "bare.onnx"), data)
    (tmp_path / "classes.txt").write_text("\n".join(order) + "\n")
    _, images = load_suspect(ModelSource(model=tmp_path / "bare.onnx", classes=tmp_path / "classes.txt"), data)
    assert images.class_names == order
    # Classes the data does not have: exit 2 naming them.
    (tmp_path / "other.txt").write_text("\n".join([*order[:9], "zebra"]) + "\n")
    with pytest.raises(ValueError, match="zebra"):
        load_suspect(ModelSource(model=tmp_path / "bare.onnx", classes=tmp_path / "other.txt"), data)
