"""Suspect models from outside (trainer/science/importers.py): a torchvision resnet18 through every door, and the
refusals a user gets for what cannot be defended as given."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper

from trainer.science.importers import (
    PARITY_TOLERANCE,
    ModelImportError,
    arch_module,
    check_backward,
    check_parity,
    load_weights,
    onnx_module,
    onnxruntime_logits,
    pt2_module,
    read_weights,
)

SHAPE = (3, 32, 32)
PROBE = np.random.default_rng(0).standard_normal((256, *SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as a trained model has
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export_onnx(model: torch.nn.Module, dynamo: bool) -> bytes:
    """What an outsider's export script does (both of torch's exporters)."""
    x = torch.randn(2, *SHAPE)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(model, (x,), None, dynamo=True, dynamic_shapes=({0: torch.export.Dim("b")},))
            assert program is not None
            return program.model_proto.SerializeToString()
        f = io.BytesIO()
        torch.onnx.export(
            model, (x,), f, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}}, opset_version=17
        )
        return f.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_onnx_from_both_exporters_converts_matches_onnxruntime_and_trains(
    resnet: torch.nn.Module, dynamo: bool
) -> None:
    data = export_onnx(resnet, dynamo)
    module = onnx_module(data, "resnet18.onnx")
    check_backward(module, torch.from_numpy(PROBE[:4]), "resnet18.onnx")
    params = dict(module.named_parameters())
    assert len(params) >= 21  # 20 convolutions and the classifier, whatever the exporter folded
    diff = check_parity(onnxruntime_logits(data), module, PROBE, "resnet18.onnx", "the converted model")
    assert diff <= PARITY_TOLERANCE
    # Trainable for real: one step moves the logits, and every parameter got a gradient on the way.
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    before = module(torch.from_numpy(PROBE[:8])).detach()
    torch.nn.functional.cross_entropy(module(torch.from_numpy(PROBE[:8])), torch.arange(8)).backward()
    assert all(p.grad is not None for p in module.parameters())
    opt.step()
    assert not torch.allclose(module(torch.from_numpy(PROBE[:8])), before)


@pytest.mark.slow
def test_pt2_and_architecture_with_weights_reproduce_the_model(resnet: torch.nn.Module, tmp_path: Path) -> None:
    x = torch.from_numpy(PROBE[:16])
    want = resnet(x).detach()
    program = torch.export.export(resnet, (x[:2],), dynamic_shapes=({0: torch.export.Dim("b")},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    module = pt2_module(buf.getvalue())
    check_backward(module, x[:4], "model.pt2")
    assert torch.allclose(module(x), want, atol=1e-5)

    from safetensors.torch import save_file

    save_file(resnet.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": resnet.state_dict(), "epoch": 3}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        built = arch_module("torchvision:resnet18", 10)
        load_weights(built, read_weights(tmp_path / name), name)
        assert torch.allclose(built.eval()(x), want, atol=1e-5)
    timm_net = arch_module("timm:resnet18", 10)
    assert timm_net(x[:2]).shape == (2, 10)


def test_refusals_name_what_failed(resnet: torch.nn.Module, tmp_path: Path) -> None:
    def model(nodes: list, out_shape: list, opset: int = 17, inits: tuple = ()) -> bytes:  # type: ignore[type-arg]
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
            initializer=list(inits),
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()

    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    for data, says in (
        (model([helper.make_node("Det", ["x"], ["y"])], ["b", 4]), "no converter for the operator(s) Det-v11"),
        (model([helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], ["b", 4, 1, 1], inits=(axes,)), "rank 4"),
        (model([helper.make_node("Relu", ["x"], ["y"])], ["b", 4], opset=11), "opset 11 is older than 13"),
        (b"not onnx at all", "is not a valid ONNX model"),
    ):
        with pytest.raises(ModelImportError, match=re.escape(says)):
            onnx_module(data, "suspect.onnx")
    with pytest.raises(ModelImportError, match=r"suggest|\.pt2"):
        onnx_module(model([helper.make_node("Det", ["x"], ["y"])], ["b", 4]), "suspect.onnx")
    with pytest.raises(ModelImportError, match=r"shape of fc.bias: file \(10,\), architecture \(7,\)"):
        load_weights(arch_module("torchvision:resnet18", 7), resnet.state_dict(), "w.pth")
    with pytest.raises(ModelImportError, match="torchvision has no model 'resnet19'"):
        arch_module("torchvision:resnet18".replace("18", "19"), 10)
    with pytest.raises(ModelImportError, match=r"is not a torch\.export program"):
        pt2_module(b"nope")
    (tmp_path / "bad.pth").write_bytes(b"junk")
    with pytest.raises(ModelImportError, match="not a readable state dict"):
        read_weights(tmp_path / "bad.pth")
    # A model that differs from its file beyond the tolerance is refused with the size of the difference.
    data = export_onnx(resnet, dynamo=False)
    module = onnx_module(data, "resnet18.onnx")
    with torch.no_grad():
        next(module.parameters()).add_(0.05)
    with pytest.raises(ModelImportError, match="differs from the file by up to"):
        check_parity(onnxruntime_logits(data), module, PROBE, "resnet18.onnx", "the converted model")
    assert onnx.load_from_string(data).graph.input[0].name == "x"
