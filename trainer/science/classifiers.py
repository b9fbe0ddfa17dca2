"""ONNX files as classifiers for trainer-side evaluation (uint8 images in, labels out), on onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from edge_agent.formats.spec import InputSpec
from trainer.science.export import META_CLASS_NAMES, META_INPUT_SPEC


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
