"""TLS and mutual TLS on the model service and the inference endpoint, with the local CA of `keys tls`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import run_cli
from edge_agent.formats.tls import channel, channel_credentials
from protos.nnoc.v1 import model_service_pb2 as ms
from protos.nnoc.v1 import model_service_pb2_grpc as ms_grpc
from trainer.service.store import ModelStore


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pki")
    code, paths, _ = run_cli("trainer", "keys", "tls", "--out", str(out), "--names", "server", "cam-1")
    assert code == 0 and paths is not None
    # A second, unrelated CA: its certificates must not be accepted.
    code, rogue, _ = run_cli("trainer", "keys", "tls", "--out", str(out / "rogue"), "--names", "cam-1")
    assert code == 0 and rogue is not None
    return {**{k: Path(v) for k, v in paths.items()}, "rogue": Path(rogue["cam-1"])}


def _list(target: str, creds: grpc.ChannelCredentials | None) -> list[str]:
    with channel(target, creds) as ch:
        return list(ms_grpc.ModelServiceStub(ch).ListFleets(ms.ListFleetsRequest(), timeout=5).fleets)


def test_model_service_mutual_tls(
    pki: dict[str, Path], predeployed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    from trainer.service.model_service import ModelServer, ModelServicer, ServiceConfig
    from trainer.service.registry import Registry

    store = ModelStore(tmp_path / "exports")
    store.create("default")
    cfg = ServiceConfig(
        listen="127.0.0.1:0",
        tls_cert=pki["server"],
        tls_key=pki["server"].with_suffix(".key"),
        tls_client_ca=pki["ca"],
        operators=("cam-1",),
    )
    server = ModelServer(ModelServicer(store, Registry(tmp_path / "r.sqlite"), tmp_path / "q", cfg), cfg).start()
    target = f"127.0.0.1:{server.port}"
    try:
        good = channel_credentials(pki["ca"], pki["cam-1"], pki["cam-1"].with_suffix(".key"))
        assert _list(target, good) == ["default"]
        rogue = channel_credentials(pki["ca"], pki["rogue"], pki["rogue"].with_suffix(".key"))
        for creds in (None, channel_credentials(pki["ca"]), rogue):  # plaintext, no client cert, foreign CA
            with pytest.raises(grpc.RpcError) as e:
                _list(target, creds)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_agent_endpoint_and_updates_over_mutual_tls(
    pki: dict[str, Path], predeployed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    import numpy as np

    from edge_agent.agent import Agent
    from edge_agent.ensemble import Ensemble
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.formats.tls import server_credentials
    from edge_agent.inference import serve
    from edge_agent.monitor import RejectMonitor
    from edge_agent.spool import Spool, SpoolConfig
    from edge_agent.updates import BundleCache, UpdateConfig, bootstrap
    from protos.inference import grpc_predict_v2_pb2 as pb
    from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
    from trainer.service.model_service import ModelServer, ModelServicer, ServiceConfig
    from trainer.service.registry import Registry

    store = ModelStore(tmp_path / "exports")
    store.create("default")
    store.publish("default", store.add("default", predeployed[0]))
    key = pki["server"].with_suffix(".key")
    cfg = ServiceConfig(listen="127.0.0.1:0", tls_cert=pki["server"], tls_key=key, tls_client_ca=pki["ca"])
    server = ModelServer(ModelServicer(store, Registry(tmp_path / "r.sqlite"), tmp_path / "q", cfg), cfg).start()
    cam_key = pki["cam-1"].with_suffix(".key")
    try:
        # First start over mutual TLS: the agent fetches v1 from the service.
        update = UpdateConfig(
            f"127.0.0.1:{server.port}", "default", "cam-1", tls_ca=pki["ca"], tls_cert=pki["cam-1"], tls_key=cam_key
        )
        bundle = bootstrap(BundleCache(tmp_path / "cache"), update, timeout=20)
        assert bundle.version == 1
    finally:
        server.stop()
    spool = Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power"))
    agent = Agent(Ensemble(verify_bundle(bundle.path)), spool, RejectMonitor(), "cam-1")
    endpoint, port = serve(
        agent, "default", "127.0.0.1:0", credentials=server_credentials(pki["cam-1"], cam_key, pki["ca"])
    )
    req = pb.ModelInferRequest(model_name="default")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    req.raw_input_contents.append(np.zeros((1, 1, 28, 28), np.float32).tobytes())
    try:
        creds = channel_credentials(pki["ca"], pki["server"], key)  # any certificate of the fleet's CA
        with channel(f"127.0.0.1:{port}", creds) as ch:
            assert pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10).outputs[0].name == "label"
        with channel(f"127.0.0.1:{port}", channel_credentials(pki["ca"])) as ch, pytest.raises(grpc.RpcError):
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
    finally:
        endpoint.stop(0)
        spool.close()
