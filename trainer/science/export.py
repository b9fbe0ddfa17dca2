"""ONNX export: dynamic batch, opset 18, the input spec and class names in ``metadata_props``."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import onnx
import torch
from torch import nn

from edge_agent.formats.preprocess import META_KEY as PREPROCESS_KEY
from edge_agent.formats.spec import InputSpec
from trainer.science.models import Checkpoint, eval_mode

log = logging.getLogger(__name__)

OPSET = 18
META_INPUT_SPEC = "nnoc.input_spec"
META_CLASS_NAMES = "nnoc.class_names"
META_VERSION = "nnoc.version"
META_PREPROCESS = PREPROCESS_KEY  # the preprocessing block's JSON (edge_agent/formats/preprocess.py)


def export_onnx(
    model: nn.Module,
    input_spec: InputSpec,
    class_names: tuple[str, ...],
    path: Path,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``model`` (the bare network: it takes the preprocessed tensor) as ONNX with a dynamic batch axis;
    metadata_props carry the input spec, the preprocessing block and the class names.

    The file is checked with ``onnx.checker`` (full shape inference) and written atomically.
    """
    model = eval_mode(model.to("cpu"))
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
        META_PREPROCESS: input_spec.preprocess.to_json(),
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
    """Export a checkpoint's network with its input spec, preprocessing and class names."""
    meta = {META_VERSION: version} if version else {}
    export_onnx(ckpt.network(), ckpt.input_spec, ckpt.class_names, path, meta)
