"""ONNX files as classifiers for trainer-side evaluation (uint8 images in, labels out), on onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_agent.formats.preprocess import Preprocess
from edge_agent.formats.spec import InputSpec
from edge_agent.formats.untrusted import self_contained_onnx
from trainer.science.export import META_CLASS_NAMES, META_INPUT_SPEC, META_PREPROCESS


def cpu_or_cuda_providers() -> list[str | tuple[str, dict[str, str]]]:
    """onnxruntime providers for trainer-side evaluation: CUDA (fp32, as on the edge) only when torch sees a GPU,
    then the CPU."""
    import onnxruntime as ort

    from edge_agent.runtime import with_provider_options

    available = ort.get_available_providers()
    want = ["CUDAExecutionProvider"] if torch.cuda.is_available() else []
    return with_provider_options([p for p in want if p in available] + ["CPUExecutionProvider"])


class OnnxClassifier:
    """An ONNX classifier as a :data:`trainer.science.metrics.Classifier`: the model's images (uint8) in, labels
    out, through its preprocessing block (given, else the file's ``nnoc.preprocess``/input spec, else divide by
    255)."""

    def __init__(
        self,
        path: Path,
        expected_shape: tuple[int, int, int] | None = None,
        batch_size: int = 1024,
        preprocess: Preprocess | None = None,
        providers: list[str | tuple[str, dict[str, str]]] | None = None,
    ) -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise ValueError(f"model file {path} does not exist")
        data = self_contained_onnx(path.read_bytes(), str(path))  # external data is refused: no path is followed
        try:
            self.session = ort.InferenceSession(data, providers=providers or cpu_or_cuda_providers())
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ValueError(f"{path} is not a loadable ONNX model: {e}") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ValueError(f"{path}: expected one input and a logits output, found {len(inputs)} inputs")
        self.input_spec = spec_of_onnx(path, inputs[0].name, inputs[0].shape, meta, preprocess)
        self.described = META_INPUT_SPEC in meta or META_PREPROCESS in meta  # it carries its own preprocessing
        if expected_shape is not None and tuple(self.input_spec.image_shape) != tuple(expected_shape):
            raise ValueError(
                f"{path}: model expects images of shape {self.input_spec.image_shape}, the data has {expected_shape}"
                " (a --preprocess block can convert colour and size)"
            )
        self.class_names = tuple(json.loads(meta[META_CLASS_NAMES])) if META_CLASS_NAMES in meta else ()
        self.input_name = inputs[0].name
        self.batch_size = batch_size

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(N, num_classes) float32 logits for the model's uint8 ``images`` (N, C, H, W)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            x = self.input_spec.preprocess.model_input(images[start : start + self.batch_size])
            out.append(self.session.run(None, {self.input_name: x})[0])
        return np.concatenate(out)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Predicted labels (N,) int64."""
        return self.logits(images).argmax(1).astype(np.int64)


def spec_of_onnx(
    path: Path, input_name: str, shape: list[Any], meta: dict[str, str], preprocess: Preprocess | None
) -> InputSpec:
    """The input spec of an ONNX classifier: ``preprocess`` when given (the user's word wins), else the file's
    ``nnoc.preprocess`` or nnoc input spec, else its graph input (batch, C, H, W) divided by 255."""
    if preprocess is None and META_PREPROCESS in meta:
        preprocess = Preprocess.from_json(meta[META_PREPROCESS], f"{path}: {META_PREPROCESS}")
    if META_INPUT_SPEC in meta:
        spec = InputSpec.from_dict(json.loads(meta[META_INPUT_SPEC]))
        if preprocess is None:
            return spec
        return InputSpec.for_image(spec.image_shape, preprocess, spec.input_name, spec.output_name)
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise ValueError(f"{path}: input shape {shape} is not (batch, C, H, W) and no nnoc input spec is attached")
    p = preprocess or Preprocess()
    dims = tuple(int(d) for d in shape[1:])
    image_shape = (dims[2], dims[0], dims[1]) if p.layout == "NHWC" else dims
    return InputSpec.for_image(image_shape, p, input_name)  # type: ignore[arg-type]
