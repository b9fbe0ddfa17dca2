"""The agent's inference endpoint: the Open Inference Protocol (KServe v2) gRPC API.

The model is served under the fleet's name. Its one input is the bundle's input spec (name, shape with a
variable batch axis, FP32); its outputs are ``label`` (INT64, -1 when rejected) and ``rejected`` (BOOL); the
response parameters carry ``bundle_version``. Bad requests get INVALID_ARGUMENT with a message; a batch over
``max_batch`` inputs gets RESOURCE_EXHAUSTED before it is decoded (and the server's message limit is sized to
the largest allowed batch, so a larger one is refused by gRPC before it is read whole); the server keeps
serving. Requests, refusals and latency go to the agent's metrics when it has them.

Note: ``protos.inference`` and Triton's client both define the protocol's ``inference.*`` messages, so the two
cannot be imported into one process (protobuf refuses duplicate symbols); clients run elsewhere anyway.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from edge_agent.agent import Agent
from edge_agent.ensemble import InputError
from edge_agent.metrics import AgentMetrics
from edge_agent.ports import GRPC_EXCLUSIVE, PortError
from protos.inference import grpc_predict_v2_pb2 as pb
from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVER_NAME = "nnoc-edge"
SERVER_VERSION = "0.1.0"
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "UINT8": np.uint8, "INT64": np.int64}
DEFAULT_MAX_BATCH = 256  # inputs per ModelInfer request; a camera batch is far smaller, a flood far larger


class BatchTooLarge(InputError):
    """A request over the endpoint's batch limit (RESOURCE_EXHAUSTED)."""


def _contents(tensor: pb.ModelInferRequest.InferInputTensor, dtype: type) -> np.ndarray:
    """Typed (non-raw) tensor contents as an array of ``dtype``."""
    c = tensor.contents
    fields: dict[str, Any] = {
        "float32": c.fp32_contents,
        "float64": c.fp64_contents,
        "uint8": c.uint_contents,
        "int64": c.int64_contents,
    }
    return np.asarray(fields[np.dtype(dtype).name], dtype=dtype)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol over an :class:`~edge_agent.agent.Agent`."""

    def __init__(
        self, agent: Agent, model_name: str, max_batch: int = DEFAULT_MAX_BATCH, metrics: AgentMetrics | None = None
    ) -> None:
        self.agent = agent
        self.model_name = model_name
        self.max_batch = max_batch
        self.metrics = metrics

    def _check_model(self, name: str, context: grpc.ServicerContext) -> None:
        if name != self.model_name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; this agent serves {self.model_name!r}")

    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        """Always live while the process answers."""
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        """Ready once a verified bundle is loaded (the agent is constructed with one)."""
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        """The fleet's model is ready; any other name is not."""
        return pb.ModelReadyResponse(ready=request.name == self.model_name)

    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """Name and version of this server."""
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """The input the manifest specifies and the two outputs."""
        self._check_model(request.name, context)
        spec = self.agent.ensemble.spec
        return pb.ModelMetadataResponse(
            name=self.model_name,
            versions=[str(self.agent.ensemble.bundle.version)],
            platform="onnxruntime_onnx",
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=spec.input_name, datatype="FP32", shape=[-1, *[int(d) for d in spec.shape]]
                )
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(name="label", datatype="INT64", shape=[-1]),
                pb.ModelMetadataResponse.TensorMetadata(name="rejected", datatype="BOOL", shape=[-1]),
            ],
        )

    def _decode(self, request: pb.ModelInferRequest) -> np.ndarray:
        spec = self.agent.ensemble.spec
        if len(request.inputs) != 1:
            raise InputError(f"expected one input tensor {spec.input_name!r}, got {len(request.inputs)}")
        tensor = request.inputs[0]
        if tensor.name != spec.input_name:
            raise InputError(f"unknown input {tensor.name!r}; the model's input is {spec.input_name!r}")
        dtype = DATATYPES.get(tensor.datatype)
        if dtype is None:
            raise InputError(f"datatype {tensor.datatype!r} is not supported; send FP32")
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape):
            raise InputError(f"negative dimension in shape {list(shape)}")
        if shape and shape[0] > self.max_batch:
            raise BatchTooLarge(f"batch of {shape[0]} inputs; this agent takes at most {self.max_batch} per request")
        if math.prod(shape) > self.max_batch * math.prod(int(d) for d in spec.shape):
            raise BatchTooLarge(f"shape {list(shape)} holds more values than {self.max_batch} inputs")
        if request.raw_input_contents:
            raw = request.raw_input_contents[0]
            itemsize = np.dtype(dtype).itemsize
            if len(raw) != math.prod(shape) * itemsize:
                raise InputError(
                    f"raw input has {len(raw)} bytes; shape {list(shape)} {tensor.datatype} needs "
                    f"{math.prod(shape) * itemsize}"
                )
            x = np.frombuffer(raw, dtype=dtype)
        else:
            x = _contents(tensor, dtype)
            if x.size != math.prod(shape):
                raise InputError(f"{x.size} values for shape {list(shape)}")
        x = x.reshape(shape)
        return x.astype(np.float32) if dtype is not np.float32 else x

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        """Classify the batch; rejected inputs come back with label -1 and rejected=true."""
        self._check_model(request.model_name, context)
        t0 = time.perf_counter()
        code, why = grpc.StatusCode.OK, ""
        try:
            x = self._decode(request)
            decision, version = self.agent.classify(x)
        except BatchTooLarge as e:
            code, why = grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}: split it into smaller requests"
        except InputError as e:
            code, why = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except ValueError as e:  # numpy reshape and friends
            code, why = grpc.StatusCode.INVALID_ARGUMENT, f"malformed input: {e}"
        if self.metrics is not None:
            self.metrics.observe("endpoint", time.perf_counter() - t0, code == grpc.StatusCode.OK)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.metrics.oversized.inc()
        if code != grpc.StatusCode.OK:
            context.abort(code, why)
        n = len(decision.labels)
        resp = pb.ModelInferResponse(model_name=self.model_name, model_version=str(version), id=request.id)
        resp.parameters["bundle_version"].int64_param = version
        resp.outputs.add(name="label", datatype="INT64", shape=[n])
        resp.outputs.add(name="rejected", datatype="BOOL", shape=[n])
        resp.raw_output_contents.append(decision.labels.astype("<i8").tobytes())
        resp.raw_output_contents.append(decision.rejected.astype(np.bool_).tobytes())
        return resp


def serve(
    agent: Agent,
    model_name: str,
    address: str,
    workers: int = 4,
    credentials: grpc.ServerCredentials | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    metrics: AgentMetrics | None = None,
) -> tuple[grpc.Server, int]:
    """Start the endpoint on ``address`` (e.g. "127.0.0.1:0"); returns the server and the bound port.

    ``credentials``: TLS (see :mod:`edge_agent.formats.tls`); None serves plaintext. A taken port is a PortError.
    """
    spec = agent.ensemble.spec
    # The largest allowed batch in the widest datatype (FP64), plus room for the request's other fields.
    limit = max(4 << 20, max_batch * math.prod(int(d) for d in spec.shape) * 8 + (1 << 16))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(4 << 20, max_batch * 16 + (1 << 16))),
            *GRPC_EXCLUSIVE,
        ],
    )
    servicer = InferenceServicer(agent, model_name, max_batch, metrics)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise PortError(f"--infer-port: cannot listen on {address} (is the port taken?)")
    server.start()
    log.info("Open Inference Protocol endpoint on port %d (model %r)", port, model_name)
    return server, port
