"""The suspect model, whichever door it comes in by, checked before any treatment (paper §4.1: the defender
receives a model it did not train).

``--model FILE`` takes an ``.onnx`` (any exporter), a ``.pt2`` (torch.export) or one of our ``.pt`` checkpoints;
``--arch torchvision:NAME --weights FILE`` builds an architecture by name. ``--preprocess FILE.json`` says how the
data becomes the model's input (else the ONNX file's own ``nnoc.preprocess``, else divide by 255).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from edge_agent.formats.preprocess import META_KEY as PREPROCESS_KEY
from edge_agent.formats.preprocess import Preprocess
from edge_agent.formats.spec import InputSpec
from edge_agent.options import flag, positive
from trainer.science.data import Splits
from trainer.science.importers import (
    PARITY_INPUTS,
    ModelImportError,
    arch_module,
    check_backward,
    check_parity,
    load_weights,
    onnx_module,
    onnxruntime_logits,
    pt2_module,
    read_onnx,
    read_weights,
)
from trainer.science.models import Checkpoint, eval_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where the suspect model comes from (``--model`` and its companions on every command that takes one)."""

    model: Path | None = flag(
        None,
        "the suspect model: .onnx (any exporter, opset 13+), .pt2 (torch.export), or .pt (nnoc checkpoint)",
        type=Path,
    )
    arch: str | None = flag(None, "instead of --model: torchvision:NAME or timm:NAME, with --weights")
    weights: Path | None = flag(None, "--arch's weights: .safetensors or a state-dict .pth", type=Path)
    num_classes: int | None = flag(None, "--arch's classes (default: the dataset's)", type=positive)
    preprocess: Path | None = flag(
        None,
        "JSON preprocessing block (color, size, resize, interpolation, scale, mean, std, layout); default: the "
        "model file's own, else the data's size and colour divided by 255",
        type=Path,
    )
    train_norm: bool = flag(False, "fine-tune an outside model with BatchNorm/Dropout in train mode (default: frozen)")

    @property
    def path(self) -> Path:
        """The file the model came in (the weights for --arch)."""
        path = self.model if self.arch is None else self.weights
        assert path is not None
        return path

    def block(self) -> Preprocess | None:
        """The ``--preprocess`` block, read and checked (None without the flag)."""
        return Preprocess.load(self.preprocess) if self.preprocess is not None else None

    def declared_block(self) -> Preprocess | None:
        """The preprocessing block the model comes with: ``--preprocess``, else an ONNX file's own
        ``nnoc.preprocess`` or a project checkpoint's (None when it declares none). For loading data of mixed sizes
        before the model itself is imported."""
        block = self.block()
        if block is not None or self.arch is not None or self.model is None or not self.model.is_file():
            return block
        try:  # an unreadable file is reported when the model itself is loaded, as every command does
            if self.model.suffix == ".onnx":
                meta = onnx_metadata(read_onnx(self.model.read_bytes(), str(self.model)))
                text = meta.get(PREPROCESS_KEY)
                return None if text is None else Preprocess.from_json(text, f"{self.model}: {PREPROCESS_KEY}")
            if self.model.suffix == ".pt":
                return Checkpoint.load(self.model).input_spec.preprocess
        except (ModelImportError, OSError, ValueError, RuntimeError):
            return None
        return None

    def check(self) -> None:
        """A complete source and a readable preprocessing block, or a one-line error saying what to fix (before
        any data is loaded)."""
        if self.arch is not None:
            if self.model is not None:
                raise ModelImportError("give --model FILE or --arch NAME with --weights FILE, not both")
            if self.weights is None:
                raise ModelImportError(f"--arch {self.arch} needs --weights FILE (.safetensors or .pth)")
        elif self.model is None:
            raise ModelImportError("no model: pass --model FILE (.onnx, .pt2, .pt) or --arch NAME --weights FILE")
        elif self.model.suffix not in (".onnx", ".pt2", ".pt"):
            raise ModelImportError(
                f"--model {self.model}: expected .onnx, .pt2 or .pt; for a state dict use --arch NAME --weights FILE"
            )
        if not self.path.is_file():
            raise ModelImportError(f"model file {self.path} does not exist")
        self.block()


def onnx_metadata(proto: onnx.ModelProto) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX model."""
    return {p.key: p.value for p in proto.metadata_props}


def import_model(
    src: ModelSource, raw_shape: tuple[int, int, int], class_names: tuple[str, ...], probe: np.ndarray
) -> Checkpoint:
    """The suspect model as a checkpoint, checked before any treatment.

    ``raw_shape`` (C, H, W) and ``class_names`` are the data's; ``probe`` holds raw pictures of the user's clean
    data (the parity check runs on up to 256 of them). Raises :class:`ModelImportError` naming what failed.
    """
    src.check()
    block = src.block()
    where = str(src.path)
    if src.arch is None and src.path.suffix == ".pt":
        ckpt = Checkpoint.load(src.path)
        if block is not None:
            ckpt.input_spec = InputSpec.for_image(ckpt.input_spec.image_shape, block)
        return ckpt
    data = src.path.read_bytes()
    meta: dict[str, str] = {}
    reference: Callable[[np.ndarray], np.ndarray] | None = None
    if src.arch is not None:
        assert src.weights is not None
        net = arch_module(src.arch, src.num_classes or len(class_names))
        load_weights(net, read_weights(src.weights), where)
        kind, source = src.arch, b""
    elif src.path.suffix == ".onnx":
        proto = read_onnx(data, where)
        meta = onnx_metadata(proto)
        net, kind, source = onnx_module(data, where), "onnx", data
        reference = onnxruntime_logits(data)
    else:
        net, kind, source = pt2_module(data, where), "pt2", data
    if block is None and PREPROCESS_KEY in meta:
        block = Preprocess.from_json(meta[PREPROCESS_KEY], f"{where}: {PREPROCESS_KEY}")
    block = block or Preprocess()
    spec = InputSpec.for_image(block.image_shape(raw_shape), block)
    inputs = block.model_input(block.image(probe[:PARITY_INPUTS]))
    freeze = not src.train_norm
    if freeze:
        net = eval_mode(net)
    try:
        check_backward(net, torch.from_numpy(inputs[:8]), where)
    except RuntimeError as e:  # the network itself refuses the input: wrong channels, size or layout
        raise ModelImportError(
            f"{where} does not take inputs of shape {tuple(inputs.shape[1:])} ({e}); give a --preprocess block "
            "with the colour, size and layout it was trained on"
        ) from None
    with torch.no_grad():
        k = int(eval_mode(net)(torch.from_numpy(inputs[:2])).shape[1])
    if k != len(class_names):
        raise ModelImportError(f"{where}: the model has {k} classes, the data has {len(class_names)}")
    if reference is not None:
        diff = check_parity(reference, eval_mode(net), inputs, where, "the converted model")
        log.info("%s: converted, max |Δlogit| %.2g against onnxruntime on %d inputs", where, diff, len(inputs))
    names = tuple(json.loads(meta["nnoc.class_names"])) if "nnoc.class_names" in meta else class_names
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    info = {"source_file": src.path.name, "source_sha256": hashlib.sha256(data).hexdigest(), "door": kind}
    return Checkpoint(kind, spec, names if len(names) == k else class_names, state, {}, info, source, freeze)


def picture_classifier(
    src: ModelSource, splits: Splits, fallback: Path | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """The model as a classifier of raw pictures (the data's own, triggered or not): each batch goes through the
    model's preprocessing first. ONNX runs on onnxruntime as it is; every other door is imported and checked.
    ``fallback``: a preprocessing block for an ONNX file that carries none of its own (the reference BadNet)."""
    from trainer.science.classifiers import OnnxClassifier
    from trainer.science.training import predict

    src.check()
    raw_shape, k = splits.image_shape, len(splits.class_names)
    if src.arch is None and src.path.suffix == ".onnx":
        block = src.block()
        onnx_model = OnnxClassifier(src.path, preprocess=block)
        if block is None and fallback is not None and not onnx_model.described:
            onnx_model = OnnxClassifier(src.path, preprocess=Preprocess.load(fallback))
        spec = onnx_model.input_spec
        classify: Callable[[np.ndarray], np.ndarray] = onnx_model
        n_out = onnx_model.logits(np.zeros((1, *spec.image_shape), np.uint8)).shape[-1]
    else:
        ckpt = import_model(src, raw_shape, splits.class_names, splits.valid.images)
        spec, model, n_out = ckpt.input_spec, ckpt.build(), len(ckpt.class_names)

        def classify(x: np.ndarray) -> np.ndarray:
            return predict(model, x)

    p = spec.preprocess
    if p.image_shape(raw_shape) != tuple(spec.image_shape):
        raise ModelImportError(
            f"{src.path}: model expects images {tuple(spec.image_shape)}, the data gives {p.image_shape(raw_shape)}; "
            "pass a --preprocess block with the model's colour and size"
        )
    if n_out != k:
        raise ModelImportError(f"{src.path}: model has {n_out} outputs, the dataset has {k} classes")
    return lambda raw: classify(p.image(raw))
