"""The edge takes the camera's own pictures: the inference endpoint's ``raw_image`` (UINT8, any size) and
``encoded_image`` (PNG/JPEG bytes) inputs go through the manifest's preprocessing block and answer as the
preprocessed tensor does; a wrong shape or an undecodable image is INVALID_ARGUMENT and the agent keeps serving."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import rgb_bundle
from edge_agent.formats.preprocess import Preprocess

BLOCK = Preprocess(color="rgb", size=(32, 32), mean=(0.5,), std=(0.25,))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rgb_bundle(tmp_path_factory.mktemp("rgb-bundle"), BLOCK)


def test_raw_and_encoded_pictures_answer_like_the_preprocessed_tensor(bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    from edge_agent.agent import Agent
    from edge_agent.ensemble import Ensemble, to_model_image, to_model_input
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.inference import ENCODED_IMAGE, RAW_IMAGE, serve
    from edge_agent.monitor import RejectMonitor
    from edge_agent.spool import Spool, SpoolConfig
    from protos.inference import grpc_predict_v2_pb2 as pb
    from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
    from protos.nnoc.v1.quarantine_pb2 import QuarantineHeader

    verified = verify_bundle(bundle)
    spec = verified.manifest.input_spec
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 1, 28, 28), dtype=np.uint8)  # the camera's own size and colour
    want_x = to_model_input(gray, spec)
    assert want_x.shape == (6, 3, 32, 32)

    def infer(stub: pb_grpc.GRPCInferenceServiceStub, name: str, datatype: str, shape: list[int], data: bytes) -> list:  # type: ignore[type-arg]
        req = pb.ModelInferRequest(model_name="cams")
        req.inputs.add(name=name, datatype=datatype, shape=shape)
        req.raw_input_contents.append(data)
        resp = stub.ModelInfer(req, timeout=30)
        return np.frombuffer(resp.raw_output_contents[0], "<i8").tolist()

    pngs = []
    for g in gray:
        buf = io.BytesIO()
        Image.fromarray(g[0]).save(buf, "PNG")
        pngs.append(buf.getvalue())
    with Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power")) as spool:
        agent = Agent(Ensemble(verified), spool, RejectMonitor(), "cam-1")
        server, port = serve(agent, "cams", "127.0.0.1:0")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="cams"), timeout=10)
                assert [(i.name, i.datatype) for i in meta.inputs] == [
                    (spec.input_name, "FP32"), (RAW_IMAGE, "UINT8"), (ENCODED_IMAGE, "BYTES"),
                ]  # fmt: skip
                want = infer(stub, spec.input_name, "FP32", [6, 3, 32, 32], want_x.tobytes())
                nhwc = gray.transpose(0, 2, 3, 1)
                assert infer(stub, RAW_IMAGE, "UINT8", [6, 28, 28, 1], nhwc.tobytes()) == want
                assert infer(stub, RAW_IMAGE, "UINT8", [28, 28, 1], nhwc[0].tobytes()) == want[:1]
                framed = b"".join(len(p).to_bytes(4, "little") + p for p in pngs)
                assert infer(stub, ENCODED_IMAGE, "BYTES", [6], framed) == want
                req = pb.ModelInferRequest(model_name="cams")
                req.inputs.add(name=ENCODED_IMAGE, datatype="BYTES", shape=[2]).contents.bytes_contents.extend(pngs[:2])
                assert (
                    np.frombuffer(stub.ModelInfer(req, timeout=30).raw_output_contents[0], "<i8").tolist() == want[:2]
                )
                # A bigger RGB frame is converted and resized like any other picture.
                rgb = rng.integers(0, 256, (1, 120, 90, 3), dtype=np.uint8)
                expected = infer(stub, spec.input_name, "FP32", [1, 3, 32, 32],
                                 to_model_input(rgb.transpose(0, 3, 1, 2), spec).tobytes())  # fmt: skip
                assert infer(stub, RAW_IMAGE, "UINT8", [1, 120, 90, 3], rgb.tobytes()) == expected
                bomb = io.BytesIO()
                Image.new("L", (5000, 5000)).save(bomb, "PNG")  # ~25 kB that would decode to 25 MB
                framed_bomb = len(bomb.getvalue()).to_bytes(4, "little") + bomb.getvalue()
                for name, datatype, shape, data, says in (
                    (ENCODED_IMAGE, "BYTES", [1], framed_bomb, "is 5000x5000; at most"),
                    (RAW_IMAGE, "UINT8", [2, 28, 28, 4], bytes(2 * 28 * 28 * 4), "C 1 or 3"),
                    (RAW_IMAGE, "UINT8", [2, 28, 28, 1], bytes(10), "needs 1568"),
                    (ENCODED_IMAGE, "BYTES", [1], (9).to_bytes(4, "little") + b"not a png", "cannot be decoded"),
                    (ENCODED_IMAGE, "BYTES", [1], (99).to_bytes(4, "little") + b"short", "fewer are left"),
                ):
                    with pytest.raises(grpc.RpcError) as e:
                        infer(stub, name, datatype, shape, data)
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in e.value.details()
                assert infer(stub, RAW_IMAGE, "UINT8", [6, 28, 28, 1], nhwc.tobytes()) == want  # still serving
        finally:
            server.stop(0)
        # What the agent quarantined is the model's image (uint8 3x32x32), the very picture it classified.
        images = {bytes(i) for i in to_model_image(gray, spec)} | {
            bytes(to_model_image(rgb.transpose(0, 3, 1, 2), spec)[0])
        }
        spooled = spool.after(0, 1000)
        assert spooled and spool.depth() == len(spooled)
        for item in spooled:
            header = QuarantineHeader.FromString(item.header)
            assert (header.dtype, list(header.shape)) == ("uint8", [3, 32, 32])
            assert item.tensor in images
