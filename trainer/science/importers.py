"""Suspect models from outside, made trainable: ONNX (any exporter, opset 13+), torch.export ``.pt2``, a
torchvision or timm architecture by name with a weights file, or a checkpoint of ours.

The paper's premise is a model someone else trained; this module is the door it comes in by. Every door ends
in a :class:`~trainer.science.models.Checkpoint` whose ``architecture`` says how to rebuild the network
(``onnx``, ``pt2``, ``torchvision:NAME``, ``timm:NAME``, or one of ours) and, for graph formats, whose
``source`` holds the file itself, so the checkpoint alone reloads, verifies and explains itself.

ONNX goes through onnx2torch after the graph is normalised (Identity nodes that alias initializers removed,
``Reshape(allowzero=1)`` with a constant shape relaxed) and with converters added for the opset-18 Reduce
operators (axes as an input). onnx2torch keeps Conv/Gemm/BatchNorm weights as module parameters but other float
initializers as buffers: those are promoted to parameters, and the ones a backward pass does not reach go back
to constants. Before any treatment the import is checked: (a) every operator has a converter, (b) the module's
logits match onnxruntime's on the user's own inputs, (c) one backward pass reaches every weight tensor.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import defs, numpy_helper
from torch import nn

from edge_agent.formats.untrusted import external_tensors

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max |Δlogit| between the user's file and what we train
PARITY_INPUTS = 256
MIN_OPSET = 13
FOREIGN_KINDS = ("onnx", "pt2")


class ModelImportError(ValueError):
    """A model that cannot be defended as given; the message names what failed and what to do."""


# -- ONNX ----------------------------------------------------------------------------------------------------


def _opset(proto: onnx.ModelProto, domain: str = "") -> int:
    for entry in proto.opset_import:
        if (entry.domain or "") in ("", "ai.onnx") and domain in ("", "ai.onnx"):
            return int(entry.version)
        if entry.domain == domain:
            return int(entry.version)
    return 0


def normalize_onnx(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` that onnx2torch can read: Identity nodes bypassed (their consumers read the source
    directly, which also resolves Identity aliases of initializers) and ``Reshape(allowzero=1)`` relaxed where
    the target shape is a constant without zeros (the two attributes then mean the same)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs and not node.domain:
            alias[node.output[0]] = node.input[0]
        else:
            kept.append(node)

    def source(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = source(name)
    for out in graph.output:  # an output fed by a bypassed Identity keeps its node (see above): nothing to do
        assert out.name not in alias
    del graph.node[:]
    graph.node.extend(kept)
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        for attr in list(node.attribute):
            if attr.name == "allowzero" and attr.i == 1 and node.input[1] in constants:
                shape = numpy_helper.to_array(constants[node.input[1]])
                if 0 not in shape.tolist():
                    node.attribute.remove(attr)
    return model


_REGISTERED = False


def _register_converters() -> None:
    """onnx2torch converters for the opset-18 Reduce operators (axes became an input): constant axes only."""
    global _REGISTERED
    if _REGISTERED:
        return
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

    def reduce_with_axes_input(node: Any, graph: Any) -> Any:
        axes = None
        if len(node.input_values) > 1 and node.input_values[1]:
            try:
                axes = [int(a) for a in get_const_value(node.input_values[1], graph).tolist()]
            except KeyError:
                raise NotImplementedError(f"{node.operation_type} with axes computed at run time") from None
        if not axes and node.attributes.get("noop_with_empty_axes", 0):
            raise NotImplementedError(f"{node.operation_type} with noop_with_empty_axes=1")
        return OperationConverterResult(
            torch_module=OnnxReduceStaticAxes(
                operation_type=node.operation_type, axes=axes, keepdims=node.attributes.get("keepdims", 1)
            ),
            onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
        )

    ops = {
        18: ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin"),
        # ReduceProd and ReduceSumSquare also moved axes to an input at 18; ReduceMax/Min got a version 20.
    }
    for version, names in {**ops, 20: ("ReduceMax", "ReduceMin")}.items():
        for name in names:
            if OperationDescription("", name, version) not in _CONVERTER_REGISTRY:
                add_converter(operation_type=name, version=version)(reduce_with_axes_input)
    for name in ("ReduceProd", "ReduceSumSquare"):
        if OperationDescription("", name, 18) not in _CONVERTER_REGISTRY:
            add_converter(operation_type=name, version=18)(reduce_with_axes_input)
    # Versions that only admit new element types (float8 at 19, int4 at 21): the previous converter is right
    # for a float32 classifier.
    from onnx2torch.node_converters import get_converter

    def delegate(version: int) -> Any:
        def convert(node: Any, graph: Any) -> Any:
            return get_converter(node.operation_type, version - 1, node.domain or "")(node, graph)

        return convert

    # Reshape to a constant shape: a static reshape (onnx2torch's own inspects the shape tensor at run time, which
    # torch.export cannot trace, so the treated model could not be exported again).
    for version in (5, 13, 14):
        fallback = _CONVERTER_REGISTRY[OperationDescription("", "Reshape", version)]
        _CONVERTER_REGISTRY[OperationDescription("", "Reshape", version)] = _static_reshape(fallback)

    for version, names in TYPE_ONLY_BUMPS.items():
        for name in names:
            if OperationDescription("", name, version) not in _CONVERTER_REGISTRY:
                add_converter(operation_type=name, version=version)(delegate(version))
    _REGISTERED = True


class StaticReshape(nn.Module):
    """``Reshape`` to a shape known when the graph is converted (0 copies the input's size there)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` reshaped."""
        return torch.reshape(x, [x.shape[i] if d == 0 else d for i, d in enumerate(self.shape)])


def _static_reshape(fallback: Any) -> Any:
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

    def convert(node: Any, graph: Any) -> Any:
        try:
            shape = tuple(int(d) for d in get_const_value(node.input_values[1], graph).tolist())
        except (KeyError, AttributeError):
            return fallback(node, graph)
        if node.attributes.get("allowzero", 0) == 1 and 0 in shape:
            raise NotImplementedError('Reshape with "allowzero=1" and a zero in the shape')
        return OperationConverterResult(
            torch_module=StaticReshape(shape),
            onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
        )

    return convert


TYPE_ONLY_BUMPS = {
    19: ("Cast", "Constant", "Equal", "Identity", "Reshape", "Shape", "Size"),
    21: ("Cast", "Constant", "ConstantOfShape", "Flatten", "Identity", "Reshape", "Shape", "Size", "Transpose",
         "Unsqueeze"),
}  # fmt: skip


def unsupported_ops(proto: onnx.ModelProto) -> list[str]:
    """The operators of ``proto`` (as ``Name-vVERSION``) that no converter handles, sorted."""
    from onnx2torch.node_converters import get_converter

    _register_converters()
    missing = set()
    for node in proto.graph.node:
        domain = node.domain or ""
        try:
            get_converter(node.op_type, _opset(proto, domain), domain)
        except NotImplementedError:
            try:
                version = defs.get_schema(node.op_type, _opset(proto, domain), domain).since_version
            except Exception:  # an operator ONNX itself does not define (a custom domain)
                version = _opset(proto, domain)
            missing.add(f"{(domain + '.') if domain else ''}{node.op_type}-v{version}")
    return sorted(missing)


def read_onnx(data: bytes, where: str) -> onnx.ModelProto:
    """Parse and check an ONNX model; refuse what this door cannot take, naming why."""
    try:
        proto = onnx.load_from_string(data)
    except Exception as e:  # protobuf's DecodeError and others for a foreign file
        raise ModelImportError(f"{where} is not a valid ONNX model: {e}") from None
    if external_tensors(proto):  # the checker and converters would read the files it names, relative to here
        raise ModelImportError(
            f"{where} keeps tensors in external data files; pass --external-data DIR, the folder that holds them"
        )
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # onnx raises DecodeError, ValidationError and others for a foreign file
        raise ModelImportError(f"{where} is not a valid ONNX model: {e}") from None
    if _opset(proto) < MIN_OPSET:
        raise ModelImportError(f"{where}: opset {_opset(proto)} is older than {MIN_OPSET}; re-export with opset 13+")
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise ModelImportError(
            f"{where}: expected one input and one output (logits), found {len(inputs)} and {len(proto.graph.output)}"
        )
    rank = len(proto.graph.output[0].type.tensor_type.shape.dim)
    if rank not in (0, 2):  # 0: the exporter left the shape unknown; checked on real outputs below
        raise ModelImportError(f"{where}: the output has rank {rank}; a classifier returns (batch, classes) logits")
    missing = unsupported_ops(proto)
    if missing:
        raise ModelImportError(
            f"{where}: no converter for the operator(s) {', '.join(missing)}; export the model with "
            "torch.export (.pt2), or pass its architecture and weights (--arch torchvision:NAME --weights FILE)"
        )
    return proto


def onnx_module(data: bytes, where: str = "model") -> nn.Module:
    """A trainable torch module of the ONNX model ``data`` (float initializers promoted to parameters)."""
    from onnx2torch import convert

    proto = read_onnx(data, where)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            module = convert(normalize_onnx(proto))
    except (NotImplementedError, KeyError, ValueError, RuntimeError) as e:
        raise ModelImportError(
            f"{where}: onnx2torch cannot convert it ({type(e).__name__}: {e}); export the model with "
            "torch.export (.pt2), or pass its architecture and weights (--arch torchvision:NAME --weights FILE)"
        ) from None
    container = getattr(module, "initializers", None)
    if container is not None:
        for name, buf in list(container.named_buffers(recurse=False)):
            if buf.is_floating_point():
                del container._buffers[name]
                container.register_parameter(name, nn.Parameter(buf.clone()))
    return module


# -- torch.export, torchvision, timm -------------------------------------------------------------------------


# What a .pt2 archive may hold, under its one root folder: nothing that torch.export.load would unpickle (a weight,
# constant or custom object marked use_pickle, legacy .pt state dicts), no compiled code (AOTInductor .so files,
# ExecuTorch programs), no old-format archive. Sample inputs are a torch.save file: loaded weights-only here first,
# since torch falls back to a full unpickle when that fails.
PT2_ALLOWED = (
    re.compile(r"(\.data/[A-Za-z0-9_.]+|archive_format|archive_version|byteorder|version|\.format_version)"),
    re.compile(r"models/[A-Za-z0-9_]+\.json"),
    re.compile(r"data/weights/[A-Za-z0-9_]+_weights_config\.json"),
    re.compile(r"data/weights/weight_[0-9]+"),
    re.compile(r"data/constants/[A-Za-z0-9_]+_constants_config\.json"),
    re.compile(r"data/constants/tensor_[0-9]+"),
    re.compile(r"data/sample_inputs/[A-Za-z0-9_]+\.pt"),
    re.compile(r"extra/[A-Za-z0-9_.-]+"),
)
PT2_MAX_ENTRIES = 100_000


def check_pt2_archive(data: bytes, where: str) -> None:
    """Refuse a ``.pt2`` archive that torch.export.load would run code from (see :data:`PT2_ALLOWED`): every entry
    allow-listed, no payload marked ``use_pickle``, sample inputs readable weights-only. Reads only the zip
    directory, the JSON configs and the sample inputs."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ModelImportError(f"{where} is not a torch.export program (.pt2): {e}") from None
    if not names or len(names) > PT2_MAX_ENTRIES:
        raise ModelImportError(f"{where}: a .pt2 archive with {len(names)} entries is not a torch.export program")
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise ModelImportError(f"{where}: not a torch.export archive of this torch's format (entries under one folder)")
    root = roots.pop() + "/"
    rel = [n[len(root) :] for n in names]
    for name in rel:
        if not any(p.fullmatch(name) for p in PT2_ALLOWED):
            raise ModelImportError(
                f"{where}: the archive holds {name[:120]!r}, which this door does not load (pickled objects, compiled "
                "code and old formats are refused); save the program again with torch.export.save, weights as tensors"
            )
    if "archive_format" not in rel or archive.read(root + "archive_format").strip() != b"pt2":
        raise ModelImportError(f"{where}: not a torch.export .pt2 archive (archive_format is missing or not pt2)")
    for name in rel:
        if name.endswith("_config.json"):
            try:
                config = json.loads(archive.read(root + name))
                entries = config["config"].items()
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ModelImportError(f"{where}: {name} is not a payload config") from None
            for fqn, meta in entries:
                plain = isinstance(meta, dict) and not meta.get("use_pickle")
                if not plain or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                    raise ModelImportError(
                        f"{where}: {str(fqn)[:80]!r} is stored as a pickle or custom object in {name}; this door loads "
                        "plain tensors only (a pickle runs the sender's code): save the program with plain weights"
                    )
        elif name.startswith("data/sample_inputs/"):
            try:
                torch.load(io.BytesIO(archive.read(root + name)), map_location="cpu", weights_only=True)
            except Exception as e:  # torch's weights-only unpickler raises UnpicklingError and others
                raise ModelImportError(
                    f"{where}: its sample inputs ({name}) are not plain tensors ({str(e)[:160]}); save the program "
                    "with tensor example inputs"
                ) from None


def pt2_module(data: bytes, where: str = "model") -> nn.Module:
    """The module of a torch.export program (``torch.export.save``), opened only after
    :func:`check_pt2_archive`."""
    check_pt2_archive(data, where)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as e:  # torch raises many types for a foreign or corrupt archive
        raise ModelImportError(f"{where} is not a torch.export program (.pt2): {e}") from None
    return program.module()


def arch_module(architecture: str, num_classes: int) -> nn.Module:
    """``torchvision:NAME`` or ``timm:NAME`` built for ``num_classes`` with random weights (weights come after)."""
    library, _, name = architecture.partition(":")
    if library == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ModelImportError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if library == "timm":
        try:
            import timm
        except ImportError:
            raise ModelImportError("timm is not installed: pip install timm (the trainer extra brings it)") from None
        if not timm.is_model(name):
            raise ModelImportError(f"timm has no model {name!r}; see timm.list_models()")
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    raise ModelImportError(f"--arch {architecture!r}: expected torchvision:NAME or timm:NAME")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt`` file (a bare state dict, or one under
    ``state_dict``/``model``); nothing but tensors is unpickled."""
    if not path.is_file():
        raise ModelImportError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types
            raise ModelImportError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a foreign or corrupt file
        raise ModelImportError(f"{path} is not a readable state dict: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ModelImportError(f"{path}: expected a state dict (names -> tensors)")
    return {k.removeprefix("module."): v for k, v in payload.items()}


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``module`` strictly; a mismatch names the first keys and shapes that differ."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k}: file {tuple(state[k].shape)}, architecture {tuple(own[k].shape)}")
        raise ModelImportError(f"{where} does not fit the architecture: {'; '.join(parts)} (check --num-classes)")
    module.load_state_dict(state)


# -- checks --------------------------------------------------------------------------------------------------


def check_backward(module: nn.Module, probe: torch.Tensor, where: str) -> None:
    """One backward pass must reach every weight tensor. Promoted ONNX constants it does not reach (shapes,
    scales) go back to buffers; any other unreached parameter is an error."""
    module.zero_grad(set_to_none=True)
    out = module(probe)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelImportError(f"{where}: the output is {shape}; a classifier returns (batch, classes) logits")
    out.float().logsumexp(1).sum().backward()
    unreached = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    container = getattr(module, "initializers", None)
    for name in list(unreached):
        if container is not None and name.startswith("initializers."):
            short = name.removeprefix("initializers.")
            value = container._parameters.pop(short)
            assert value is not None
            container.register_buffer(short, value.detach())
            unreached.remove(name)
    module.zero_grad(set_to_none=True)
    if unreached:
        raise ModelImportError(
            f"{where}: a backward pass does not reach {len(unreached)} weight tensor(s) ({', '.join(unreached[:3])}"
            "); the graph detaches them (a frozen or constant-folded export?): export the trainable model"
        )


def check_parity(
    reference: Callable[[np.ndarray], np.ndarray], module: nn.Module, inputs: np.ndarray, where: str, what: str
) -> float:
    """max |Δlogit| between ``reference`` and ``module`` on ``inputs`` (model inputs); above the tolerance is an
    error. Returns the difference."""
    with torch.no_grad():
        got = module(torch.from_numpy(inputs)).float().numpy()
    want = reference(inputs)
    for logits, who in ((want, "the file (onnxruntime)"), (got, what)):
        bad = ~np.isfinite(logits).reshape(len(logits), -1).all(axis=1)
        if bad.any():
            raise ModelImportError(
                f"{where}: {who} gives NaN or infinite logits on {int(bad.sum())} of {len(inputs)} of your inputs "
                f"(the first: #{int(np.flatnonzero(bad)[0])}); a model whose output is not a number on clean inputs "
                "cannot be defended"
            )
    if got.shape != want.shape:
        raise ModelImportError(f"{where}: {what} gives logits of shape {got.shape}, the file {want.shape}")
    diff = float(np.abs(got - want).max())
    if not diff <= PARITY_TOLERANCE:
        raise ModelImportError(
            f"{where}: {what} differs from the file by up to {diff:.3g} in the logits on {len(inputs)} of your "
            f"inputs (tolerance {PARITY_TOLERANCE}); export with opset 17+, or use .pt2 or --arch with --weights"
        )
    return diff


def onnxruntime_logits(data: bytes) -> Callable[[np.ndarray], np.ndarray]:
    """The logits onnxruntime computes for the ONNX model ``data`` (CPU; the reference for parity)."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return np.concatenate([session.run(None, {name: x[i : i + 64]})[0] for i in range(0, len(x), 64)])

    return run
