"""Property-based tests (hypothesis) on every decoder at a trust boundary: each bad input gets a clear error
and the process keeps serving. ``NNOC_FUZZ_EXAMPLES`` sets the examples per decoder (CI: 150; the
reliability benchmark runs 10,000); ``NNOC_FUZZ_REPORT`` names a JSON file for the counts."""

from __future__ import annotations

import atexit
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.formats.bundle import BundleError, verify_bundle
from protos.nnoc.v1 import bundle_pb2, model_service_pb2, quarantine_pb2

EXAMPLES = int(os.environ.get("NNOC_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
TRIED: Counter[str] = Counter()
CRASHES: Counter[str] = Counter()


@atexit.register
def _report() -> None:
    path = os.environ.get("NNOC_FUZZ_REPORT")
    if path and TRIED:
        Path(path).write_text(json.dumps({"examples": dict(TRIED), "crashes": dict(CRASHES)}, indent=2) + "\n")


SPEC = bundle_pb2.InputSpec(shape=[1, 28, 28], dtype="float32", min_value=0.0, max_value=1.0, scale=1 / 255)

dtypes = st.sampled_from(["float32", "float64", "uint8", "int64", "float16", "bool", "", "complex64", "<U3", "x"])
shapes = st.lists(st.integers(-3, 40), max_size=5)
headers = st.builds(
    quarantine_pb2.QuarantineHeader,
    device_id=st.sampled_from(["cam-1", "", "cam-2", "ü" * 3]),
    fleet=st.sampled_from(["f", "", "other"]),
    bundle_version=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    shape=shapes,
    dtype=dtypes,
    primary_label=st.integers(-(2**63), 2**63 - 1),
    monitor_label=st.integers(-(2**63), 2**63 - 1),
)
float_tensors = st.builds(
    lambda shape, fill: np.full(shape, fill, np.float32).tobytes(),
    st.sampled_from([(1, 28, 28), (1, 28, 27), (784,), (2, 1, 28, 28)]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
frames = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=4),
    st.tuples(headers.map(lambda h: h.SerializeToString()), st.one_of(float_tensors, st.binary(max_size=4000))).map(
        list
    ),
)


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from trainer.service.collector import Collector, CollectorConfig, fixed_spec

    # handle() is the collector's whole decode/validate/store path for one batch; no socket needed to call it.
    c = Collector(
        CollectorConfig(root=tmp_path_factory.mktemp("fuzzq"), max_tensor_bytes=8192),
        fixed_spec("f", SPEC),
    )
    return c


@FUZZ
@given(batch=st.lists(frames, min_size=1, max_size=8))
def test_collector_answers_every_quarantine_message(collector: Any, batch: list[list[bytes]]) -> None:
    TRIED["collector: quarantine frames"] += 1
    try:
        replies = collector.handle([[b"cam-1", *f] for f in batch])
    except Exception:
        CRASHES["collector: quarantine frames"] += 1
        raise
    # Every multi-frame message gets exactly one reply; a REJECTED one says why.
    assert len(replies) == sum(1 for f in batch if len(f) != 1)
    for _, reply in replies:
        assert reply.status != quarantine_pb2.QuarantineReply.REJECTED or reply.error


@FUZZ
@given(body=st.one_of(st.binary(max_size=200), st.builds(
    lambda r, w: quarantine_pb2.AgentStats(device_id="cam-1", requests=r, window_reject_rate=w).SerializeToString(),
    st.integers(0, 2**64 - 1), st.floats(allow_nan=True),
)))  # fmt: skip
def test_collector_survives_any_stats_frame(collector: Any, body: bytes) -> None:
    TRIED["collector: stats frames"] += 1
    try:
        assert collector.handle([[b"cam-1", body]]) == []  # stats are never answered
    except AssertionError:
        raise
    except Exception:
        CRASHES["collector: stats frames"] += 1
        raise


@FUZZ
@given(frames=st.lists(st.binary(max_size=80), max_size=3))
def test_uplink_ignores_malformed_replies(frames: list[bytes]) -> None:
    from edge_agent.uplink import Uplink, UplinkConfig

    TRIED["uplink: collector replies"] += 1
    up = Uplink.__new__(Uplink)  # the parser only needs the counters
    from edge_agent.uplink import UplinkCounters

    up.counters, up.cfg = UplinkCounters(), UplinkConfig("tcp://127.0.0.1:1", "x")
    reply = up._parse_reply(frames)
    assert reply is None or isinstance(reply, quarantine_pb2.QuarantineReply)


@pytest.fixture(scope="module")
def bundle_copy(predeployed: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("fuzzbundle") / "b"
    shutil.copytree(predeployed[0] / "bundle", dest)
    return dest


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda v, names, sizes, fmt: bundle_pb2.Manifest(
                format=fmt,
                version=v,
                artifacts=[
                    bundle_pb2.Artifact(name=n, role=r, size=s, sha256="0" * 64)
                    for n, r, s in zip(names, ["primary", "monitor", "primary"], sizes, strict=False)
                ],
                input_spec=SPEC,
            ).SerializeToString(),
            st.integers(0, 2**64 - 1),
            st.lists(st.sampled_from(["primary.onnx", "../x", "", ".", "monitor.onnx", "a/b"]), max_size=3),
            st.lists(st.integers(-5, 10**12), min_size=3, max_size=3),
            st.integers(0, 5),
        ),
    )
)
def test_manifest_decoder_refuses_with_a_message(bundle_copy: Path, data: bytes) -> None:
    TRIED["bundle: manifest.pb"] += 1
    original = (bundle_copy / "manifest.pb").read_bytes()
    (bundle_copy / "manifest.pb").write_bytes(data)
    try:
        verify_bundle(bundle_copy)
    except BundleError as e:
        assert str(e)
    except Exception:
        CRASHES["bundle: manifest.pb"] += 1
        raise
    finally:
        (bundle_copy / "manifest.pb").write_bytes(original)


@pytest.fixture(scope="module")
def model_service(predeployed: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import start_service
    from protos.nnoc.v1 import model_service_pb2_grpc
    from trainer.service.store import ModelStore

    tmp = tmp_path_factory.mktemp("fuzzsvc")
    store = ModelStore(tmp / "exports")
    store.create("default")
    store.publish("default", store.add("default", predeployed[0]))
    server = start_service(store, tmp)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield model_service_pb2_grpc.ModelServiceStub(channel)
    channel.close()
    server.stop()


@FUZZ
@given(
    fleet=st.sampled_from(["default", "", "../..", "x" * 100, "nope"]),
    version=st.integers(0, 2**64 - 1),
    name=st.sampled_from(["primary.onnx", "monitor.onnx", "manifest.pb", "../../fleet.json", "", "/etc/passwd"]),
    offset=st.integers(-(2**63), 2**63 - 1),
)
def test_model_service_download_requests(model_service: Any, fleet: str, version: int, name: str, offset: int) -> None:
    TRIED["model service: Download"] += 1
    req = model_service_pb2.DownloadRequest(fleet=fleet, version=version, name=name, offset=offset)
    try:
        for chunk in model_service.Download(req, timeout=10):
            assert len(chunk.data) <= 1 << 20
    except grpc.RpcError as e:
        if e.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE):
            CRASHES["model service: Download"] += 1
        assert e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE), e
        assert e.details()


@pytest.fixture(scope="module")
def inference(predeployed: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from edge_agent.agent import Agent
    from edge_agent.ensemble import Ensemble
    from edge_agent.inference import serve
    from edge_agent.monitor import RejectMonitor
    from edge_agent.spool import Spool, SpoolConfig
    from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    tmp = tmp_path_factory.mktemp("fuzzinf")
    spool = Spool(SpoolConfig(tmp / "spool.sqlite", durability="power"))
    agent = Agent(Ensemble(verify_bundle(predeployed[0] / "bundle")), spool, RejectMonitor(), "fuzz")
    server, port = serve(agent, "default", "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 256 << 20)])
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()
    server.stop(0)
    spool.close()


@FUZZ
@given(
    model=st.sampled_from(["default", "other", ""]),
    name=st.sampled_from(["input", "x", ""]),
    datatype=st.sampled_from(["FP32", "FP64", "UINT8", "INT64", "BOOL", "BYTES", "FP16", ""]),
    shape=st.one_of(
        st.lists(st.integers(-2, 3000), max_size=5),
        st.sampled_from([[1, 1, 28, 28], [0, 1, 28, 28], [3, 1, 28, 28], [512, 1, 28, 28]]),
    ),
    fill=st.floats(allow_nan=True, allow_infinity=True, width=32),
    raw_len=st.one_of(st.none(), st.integers(0, 20000)),
    n_inputs=st.integers(0, 2),
)
def test_inference_requests_get_invalid_argument_or_an_answer(
    inference: Any,
    model: str,
    name: str,
    datatype: str,
    shape: list[int],
    fill: float,
    raw_len: int | None,
    n_inputs: int,
) -> None:
    from protos.inference import grpc_predict_v2_pb2 as pb

    TRIED["inference: ModelInfer"] += 1
    req = pb.ModelInferRequest(model_name=model)
    for _ in range(n_inputs):
        req.inputs.add(name=name, datatype=datatype, shape=shape)
    count = int(np.prod(shape)) if shape and all(d >= 0 for d in shape) and np.prod(shape) < 2e7 else 0
    if raw_len is None and count:
        req.raw_input_contents.append(np.full(count, fill, np.float32).tobytes())
    elif raw_len is not None:
        req.raw_input_contents.append(bytes(raw_len))
    try:
        resp = inference.ModelInfer(req, timeout=60)
        assert resp.outputs[0].name == "label" and resp.parameters["bundle_version"].int64_param >= 1
    except grpc.RpcError as e:
        ok = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED)
        if e.code() not in ok:
            CRASHES["inference: ModelInfer"] += 1
        assert e.code() in ok, e
        assert e.details()


def test_a_batch_over_the_message_limit_is_refused_and_serving_goes_on(inference: Any) -> None:
    from protos.inference import grpc_predict_v2_pb2 as pb

    def request(n: int) -> Any:
        req = pb.ModelInferRequest(model_name="default")
        req.inputs.add(name="input", datatype="FP32", shape=[n, 1, 28, 28])
        req.raw_input_contents.append(bytes(n * 784 * 4))
        return req

    with pytest.raises(grpc.RpcError) as e:
        inference.ModelInfer(request(30000), timeout=60)  # 94 MB: over the endpoint's 64 MiB message limit
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.details()
    assert len(inference.ModelInfer(request(2), timeout=10).raw_output_contents[0]) == 16  # still serving


def test_corrupt_or_unexpected_onnx_is_refused_at_load(
    predeployed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    from edge_agent.ensemble import Ensemble
    from edge_agent.formats.bundle import read_manifest, write_bundle

    src = predeployed[0] / "bundle"
    manifest = read_manifest(src)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 this is not a model" * 10)
    write_bundle(tmp_path / "b1", {"primary": garbage, "monitor": src / "monitor.onnx"}, manifest)
    with pytest.raises(ValueError, match="cannot load ONNX model"):
        Ensemble(verify_bundle(tmp_path / "b1"))
    # A well-formed model whose input is not the manifest's.
    import onnx

    m = onnx.load(src / "monitor.onnx")
    old = m.graph.input[0].name
    m.graph.input[0].name = "pixels"
    for node in m.graph.node:
        node.input[:] = ["pixels" if i == old else i for i in node.input]
    onnx.save(m, tmp_path / "renamed.onnx")
    write_bundle(tmp_path / "b2", {"primary": src / "primary.onnx", "monitor": tmp_path / "renamed.onnx"}, manifest)
    with pytest.raises(ValueError, match="takes inputs"):
        Ensemble(verify_bundle(tmp_path / "b2"))
    # A model with a second output.
    m = onnx.load(src / "monitor.onnx")
    extra = onnx.helper.make_tensor_value_info(m.graph.node[0].output[0], onnx.TensorProto.FLOAT, None)
    m.graph.output.append(extra)
    onnx.save(m, tmp_path / "two_outputs.onnx")
    write_bundle(tmp_path / "b3", {"primary": src / "primary.onnx", "monitor": tmp_path / "two_outputs.onnx"}, manifest)
    with pytest.raises(ValueError, match="expected one"):
        Ensemble(verify_bundle(tmp_path / "b3"))
