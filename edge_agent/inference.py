"""The agent's inference endpoint: the Open Inference Protocol (KServe v2) gRPC API.

The model is served under the fleet's name. A request sends one of three inputs: the bundle's input tensor
(its name, the spec's shape with a variable batch axis, FP32, already preprocessed), ``raw_image`` (UINT8
pictures (N, H, W, C) or one (H, W, C), any size, C 1 or 3: the agent preprocesses them per the manifest), or
``encoded_image`` (BYTES: PNG/JPEG files, decoded and preprocessed). Its outputs are ``label`` (INT64, -1 when
rejected) and ``rejected`` (BOOL); the response parameters carry ``bundle_version``. Bad requests get
INVALID_ARGUMENT with a message (an undecodable image, a wrong shape); a batch over ``max_batch`` inputs gets
RESOURCE_EXHAUSTED before it is decoded (and the server's message limit is sized to the largest allowed batch,
so a larger one is refused by gRPC before it is read whole); the server keeps serving. Requests, refusals and
latency go to the agent's metrics when it has them.

Note: ``protos.inference`` and Triton's client both define the protocol's ``inference.*`` messages, so the two
cannot be imported into one process (protobuf refuses duplicate symbols); clients run elsewhere anyway.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from edge_agent.agent import Agent
from edge_agent.batcher import Batcher
from edge_agent.ensemble import InputError, image_to_input, to_model_image
from edge_agent.metrics import AgentMetrics
from edge_agent.ports import GRPC_EXCLUSIVE, PortError
from protos.inference import grpc_predict_v2_pb2 as pb
from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVER_NAME = "nnoc-edge"
SERVER_VERSION = "0.1.0"
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "UINT8": np.uint8, "INT64": np.int64}
DEFAULT_MAX_BATCH = 256  # inputs per ModelInfer request; a camera batch is far smaller, a flood far larger
RAW_IMAGE, ENCODED_IMAGE = "raw_image", "encoded_image"
MAX_PICTURE_BYTES = 16 << 20  # raw pictures per request (two 1080p RGB frames; JPEGs are far smaller)
MAX_PIXELS = 4096 * 4096  # a decoded picture at most (refused before decoding: no decompression bombs)
# Decoded pixels per request, and in all requests decoding at once: read from the files' headers before anything is
# decoded. A camera batch of eight 1080p frames is 16.6 million; a flood of large images is refused with
# RESOURCE_EXHAUSTED instead of holding every worker thread and gigabytes of memory while small requests wait.
MAX_REQUEST_PIXELS = 32 << 20
MAX_DECODING_PIXELS = 64 << 20
SMALL_REQUEST_PIXELS = 4 << 20  # up to this (two 1080p frames) a request decodes without the shared budget:
# a camera's frame is answered while large requests hold the budget (the worker threads bound these)


class PixelBudget:
    """Pixels being decoded now, across requests: a request takes its share before decoding, or is refused."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Reserve ``n`` pixels when they fit; False when they do not (the caller refuses its request)."""
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        """Release what :meth:`take` reserved."""
        with self._lock:
            self.used -= n


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
        self,
        agent: Agent,
        model_name: str,
        max_batch: int = DEFAULT_MAX_BATCH,
        metrics: AgentMetrics | None = None,
        batcher: Batcher | None = None,
    ) -> None:
        self.agent = agent
        self.model_name = model_name
        self.max_batch = max_batch
        self.decoding = PixelBudget(MAX_DECODING_PIXELS)
        self.metrics = metrics
        # With camera sources, requests join their frames in one batch; otherwise they go straight to the agent.
        self.classify = batcher.classify if batcher is not None else agent.classify

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
                ),
                pb.ModelMetadataResponse.TensorMetadata(name=RAW_IMAGE, datatype="UINT8", shape=[-1, -1, -1, -1]),
                pb.ModelMetadataResponse.TensorMetadata(name=ENCODED_IMAGE, datatype="BYTES", shape=[-1]),
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(name="label", datatype="INT64", shape=[-1]),
                pb.ModelMetadataResponse.TensorMetadata(name="rejected", datatype="BOOL", shape=[-1]),
                # the bundle's reject score: rejected where above the manifest's reject_rule.threshold
                pb.ModelMetadataResponse.TensorMetadata(name="score", datatype="FP32", shape=[-1]),
            ],
        )

    def _decode(self, request: pb.ModelInferRequest) -> tuple[np.ndarray, np.ndarray | None]:
        """(model input, the model's uint8 images when the request sent pictures) from one request."""
        spec = self.agent.ensemble.spec
        names = (spec.input_name, RAW_IMAGE, ENCODED_IMAGE)
        if len(request.inputs) != 1:
            raise InputError(f"expected one input tensor (one of {', '.join(names)}), got {len(request.inputs)}")
        tensor = request.inputs[0]
        if tensor.name in (RAW_IMAGE, ENCODED_IMAGE):
            if tensor.name == RAW_IMAGE:
                images = to_model_image(self._raw_pictures(request, tensor), spec)
            else:
                images = self._encoded_pictures(request, tensor)
            return image_to_input(images, spec), images
        if tensor.name != spec.input_name:
            raise InputError(f"unknown input {tensor.name!r}; send one of {', '.join(names)}")
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
        return (x.astype(np.float32) if dtype is not np.float32 else x), None

    def _raw_pictures(self, request: pb.ModelInferRequest, tensor: Any) -> np.ndarray:
        """``raw_image``: UINT8 (N, H, W, C) or (H, W, C) -> pictures (N, C, H, W)."""
        if tensor.datatype != "UINT8":
            raise InputError(f"{RAW_IMAGE} must be UINT8, got {tensor.datatype}")
        shape = tuple(int(d) for d in tensor.shape)
        if len(shape) == 3:
            shape = (1, *shape)
        if len(shape) != 4 or shape[3] not in (1, 3) or min(shape) < 1:
            raise InputError(f"{RAW_IMAGE} shape {list(tensor.shape)}: expected (N, H, W, C) or (H, W, C), C 1 or 3")
        if shape[0] > self.max_batch:
            raise BatchTooLarge(f"batch of {shape[0]} pictures; this agent takes at most {self.max_batch} per request")
        if math.prod(shape) > MAX_PICTURE_BYTES:
            raise BatchTooLarge(f"{math.prod(shape)} bytes of pictures; at most {MAX_PICTURE_BYTES} per request")
        data = request.raw_input_contents[0] if request.raw_input_contents else bytes(tensor.contents.uint_contents)
        if len(data) != math.prod(shape):
            raise InputError(f"{RAW_IMAGE} holds {len(data)} bytes; shape {list(shape)} needs {math.prod(shape)}")
        return np.frombuffer(data, np.uint8).reshape(shape).transpose(0, 3, 1, 2)

    def _encoded_pictures(self, request: pb.ModelInferRequest, tensor: Any) -> np.ndarray:
        """``encoded_image``: PNG/JPEG files -> the model's images (each resized from its own size)."""
        if tensor.datatype != "BYTES":
            raise InputError(f"{ENCODED_IMAGE} must be BYTES, got {tensor.datatype}")
        files = (
            _split_bytes(request.raw_input_contents[0])
            if request.raw_input_contents
            else list(tensor.contents.bytes_contents)
        )
        if not files:
            raise InputError("empty batch: send at least one image")
        if len(files) > self.max_batch:
            raise BatchTooLarge(f"batch of {len(files)} images; this agent takes at most {self.max_batch} per request")
        total = sum(w * h for w, h in (picture_size(f, i) for i, f in enumerate(files)))  # headers only
        if total > MAX_REQUEST_PIXELS:
            raise BatchTooLarge(f"{len(files)} images of {total} pixels in all; at most {MAX_REQUEST_PIXELS} a request")
        budget = total if total > SMALL_REQUEST_PIXELS else 0
        if budget and not self.decoding.take(budget):
            raise BatchTooLarge(f"the agent is decoding other large requests ({total} pixels asked); retry")
        try:
            spec = self.agent.ensemble.spec
            return np.concatenate([to_model_image(decode_picture(f, i), spec) for i, f in enumerate(files)])
        finally:
            if budget:
                self.decoding.give(budget)

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        """Classify the batch; rejected inputs come back with label -1 and rejected=true."""
        self._check_model(request.model_name, context)
        t0 = time.perf_counter()
        code, why = grpc.StatusCode.OK, ""
        try:
            x, images = self._decode(request)
            decision, version = self.classify(x, images)
        except BatchTooLarge as e:
            code, why = grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}: split it into smaller requests"
        except InputError as e:
            code, why = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except ValueError as e:  # numpy reshape and friends
            code, why = grpc.StatusCode.INVALID_ARGUMENT, f"malformed input: {e}"
        except (RuntimeError, TimeoutError) as e:  # the batcher is stopping or its batch failed: try again
            code, why = grpc.StatusCode.UNAVAILABLE, f"could not classify now ({e}); retry"
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
        resp.outputs.add(name="score", datatype="FP32", shape=[n])
        resp.raw_output_contents.append(decision.labels.astype("<i8").tobytes())
        resp.raw_output_contents.append(decision.rejected.astype(np.bool_).tobytes())
        resp.raw_output_contents.append(decision.score.astype("<f4").tobytes())
        return resp


def _split_bytes(raw: bytes) -> list[bytes]:
    """The protocol's raw BYTES tensor: each element is a 4-byte little-endian length, then its bytes."""
    out: list[bytes] = []
    i = 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InputError("BYTES tensor ends inside an element's length prefix")
        n = int.from_bytes(raw[i : i + 4], "little")
        if i + 4 + n > len(raw):
            raise InputError(f"BYTES element {len(out)} says {n} bytes; fewer are left")
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def picture_size(data: bytes, index: int = 0) -> tuple[int, int]:
    """(width, height) of an encoded image from its header alone; refused past :data:`MAX_PIXELS`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            w, h = img.size
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InputError(f"image {index} cannot be decoded: {e}") from None
    if w * h > MAX_PIXELS:
        raise InputError(f"image {index} is {w}x{h}; at most {MAX_PIXELS} pixels")
    return int(w), int(h)


def decode_picture(data: bytes, index: int = 0) -> np.ndarray:
    """An encoded image (PNG, JPEG ...) -> one picture (1, C, H, W) uint8, gray or RGB; refused past
    :data:`MAX_PIXELS` before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InputError(f"image {index} cannot be decoded: {e}") from None
    with img:
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise InputError(f"image {index} is {w}x{h}; at most {MAX_PIXELS} pixels")
        try:
            gray = img.mode in ("1", "L", "I;16", "I", "F")
            arr = np.asarray(img.convert("L") if gray else img.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"image {index} cannot be decoded: {e}") from None
    return arr[None, None] if arr.ndim == 2 else arr.transpose(2, 0, 1)[None]


def serve(
    agent: Agent,
    model_name: str,
    address: str,
    workers: int = 4,
    credentials: grpc.ServerCredentials | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    metrics: AgentMetrics | None = None,
    batcher: Batcher | None = None,
) -> tuple[grpc.Server, int]:
    """Start the endpoint on ``address`` (e.g. "127.0.0.1:0"); returns the server and the bound port.

    ``credentials``: TLS (see :mod:`edge_agent.formats.tls`); None serves plaintext. A taken port is a PortError.
    """
    spec = agent.ensemble.spec
    # The largest allowed batch in the widest datatype (FP64), plus room for the request's other fields.
    limit = max(MAX_PICTURE_BYTES, max_batch * math.prod(int(d) for d in spec.shape) * 8) + (1 << 16)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(4 << 20, max_batch * 16 + (1 << 16))),
            *GRPC_EXCLUSIVE,
        ],
    )
    servicer = InferenceServicer(agent, model_name, max_batch, metrics, batcher)
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
