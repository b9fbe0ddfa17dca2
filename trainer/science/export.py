"""ONNX export (dynamic batch, opset 18, metadata) and ONNX classifiers for evaluation."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edge_agent.formats.spec import InputSpec
from trainer.science.models import Checkpoint

log = logging.getLogger(__name__)

OPSET = 18
META_INPUT_SPEC = "nnoc.input_spec"
META_CLASS_NAMES = "nnoc.class_names"
META_VERSION = "nnoc.version"


def export_onnx(
    model: nn.Module,
    input_spec: InputSpec,
    class_names: tuple[str, ...],
    path: Path,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``model`` as ONNX with a dynamic batch axis; metadata_props carry input spec and class names.

    The file is checked with ``onnx.checker`` (full shape inference) and written atomically.
    """
    model = model.to("cpu").eval()
    dummy = torch.zeros(2, *input_spec.shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter reports progress on stdout
        program = torch.onnx.export(
            model,
            (dummy,),
            None,
            input_names=[input_spec.input_name],
            output_names=[input_spec.output_name],
            dynamo=True,
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            external_data=False,
        )
    assert program is not None
    proto = program.model_proto
    props = {
        META_INPUT_SPEC: json.dumps(input_spec.to_dict()),
        META_CLASS_NAMES: json.dumps(list(class_names)),
        **(metadata or {}),
    }
    del proto.metadata_props[:]
    for key, value in sorted(props.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "nnoculation-edge"
    onnx.checker.check_model(proto, full_check=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(proto, tmp)
    tmp.replace(path)
    log.info("exported %s (%d bytes, opset %d)", path, path.stat().st_size, OPSET)


def export_checkpoint(ckpt: Checkpoint, path: Path, version: str = "") -> None:
    """Export a checkpoint's network with its input spec and class names."""
    meta = {META_VERSION: version} if version else {}
    export_onnx(ckpt.build(), ckpt.input_spec, ckpt.class_names, path, meta)


def cpu_or_cuda_providers() -> list[str]:
    """onnxruntime providers for trainer-side evaluation: CUDA only when torch sees a GPU, then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    want = ["CUDAExecutionProvider"] if torch.cuda.is_available() else []
    return [p for p in want if p in available] + ["CPUExecutionProvider"]


class OnnxClassifier:
    """An ONNX classifier as a :data:`trainer.science.metrics.Classifier` (uint8 images in, labels out)."""

    def __init__(self, path: Path, expected_shape: tuple[int, int, int] | None = None, batch_size: int = 1024) -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise ValueError(f"model file {path} does not exist")
        try:
            self.session = ort.InferenceSession(str(path), providers=cpu_or_cuda_providers())
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ValueError(f"{path} is not a loadable ONNX model: {e}") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ValueError(f"{path}: expected one input and a logits output, found {len(inputs)} inputs")
        shape = inputs[0].shape  # e.g. ['batch', 1, 28, 28]
        if META_INPUT_SPEC in meta:
            self.input_spec = InputSpec.from_dict(json.loads(meta[META_INPUT_SPEC]))
        elif len(shape) == 4 and all(isinstance(d, int) for d in shape[1:]):
            self.input_spec = InputSpec(shape=(int(shape[1]), int(shape[2]), int(shape[3])))
        else:
            raise ValueError(f"{path}: input shape {shape} is not (batch, C, H, W) and no nnoc input spec is attached")
        if expected_shape is not None and tuple(self.input_spec.shape) != tuple(expected_shape):
            raise ValueError(
                f"{path}: model expects inputs of shape {self.input_spec.shape}, the dataset has {expected_shape}"
            )
        self.class_names = tuple(json.loads(meta[META_CLASS_NAMES])) if META_CLASS_NAMES in meta else ()
        self.input_name = inputs[0].name
        self.batch_size = batch_size

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(N, num_classes) float32 logits for uint8 ``images`` (N, C, H, W)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            x = images[start : start + self.batch_size].astype(np.float32) * np.float32(self.input_spec.scale)
            out.append(self.session.run(None, {self.input_name: x})[0])
        return np.concatenate(out)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Predicted labels (N,) int64."""
        return self.logits(images).argmax(1).astype(np.int64)
