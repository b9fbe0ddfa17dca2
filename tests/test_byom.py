"""Bring your own model: a torchvision resnet18 that someone else exported, defended only through the CLI, with
its own preprocessing (gray 28x28 Fashion-MNIST -> RGB 32x32, normalised)."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from onnx import TensorProto, helper

from conftest import run_cli
from edge_agent.formats.preprocess import Preprocess

TINY = [
    "--dataset",
    "fashion-mnist",
    "--valid-size",
    "200",
    "--stream-size",
    "100",
    "--train-size",
    "500",
    "--test-size",
    "200",
]
UNTRAINED = ["--min-clean-accuracy", "0"]  # these outsider models are untrained: no accuracy to check
BLOCK = {"color": "rgb", "size": [32, 32], "mean": [0.286], "std": [0.353]}


@pytest.fixture(scope="module")
def outsider(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What an outsider hands over: the same resnet18 as ONNX (both exporters), .pt2 and safetensors."""
    out = tmp_path_factory.mktemp("outsider")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        f = io.BytesIO()
        torch.onnx.export(
            model, (x,), f, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}}, opset_version=17
        )
        (out / "legacy.onnx").write_bytes(f.getvalue())
        program = torch.onnx.export(model, (x,), None, dynamo=True, dynamic_shapes=({0: torch.export.Dim("b")},))
        assert program is not None
        (out / "dynamo.onnx").write_bytes(program.model_proto.SerializeToString())
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b")},)), out / "m.pt2")
    from safetensors.torch import save_file

    save_file(model.state_dict(), out / "m.safetensors")
    import timm  # a second model zoo, another residual design (tiered stem), weights as a plain .pth state dict

    torch.save(timm.create_model("resnet10t", num_classes=10).eval().state_dict(), out / "timm.pth")
    (out / "pp.json").write_text(json.dumps(BLOCK))
    return out


def _predeploy(door: list[str], out: Path, pp: Path, check: bool = True) -> tuple[int, dict[str, Any] | None, str]:
    return run_cli(
        "trainer", "predeploy", *door, "--preprocess", str(pp), "--out", str(out), *TINY, *UNTRAINED,
        "--gammas", "0.6", "--max-rounds", "1", "--epochs", "1", "--quiet", check=check,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("door", ["legacy.onnx", "dynamo.onnx", "m.pt2", "arch", "timm"])
def test_every_door_into_predeploy_ships_the_model_unchanged(outsider: Path, door: str, tmp_path: Path) -> None:
    flags = {
        "arch": ["--arch", "torchvision:resnet18", "--weights", str(outsider / "m.safetensors")],
        "timm": ["--arch", "timm:resnet10t", "--weights", str(outsider / "timm.pth")],
    }.get(door, ["--model", str(outsider / door)])
    _, report, _ = _predeploy(flags, tmp_path / "pd", outsider / "pp.json")
    assert report is not None and report["bundle_version"] == 1
    assert report["primary_parity"] <= 1e-4
    bundle = tmp_path / "pd" / "bundle"
    # The preprocessing block travels in the manifest and in both ONNX files.
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input_spec"]["preprocess"]["size"] == ["32", "32"] and manifest["input_spec"]["shape"][0] == "3"
    block = Preprocess.from_dict(BLOCK)
    for role in ("primary", "monitor"):
        props = {p.key: p.value for p in onnx.load(bundle / f"{role}.onnx").metadata_props}
        assert Preprocess.from_json(props["nnoc.preprocess"]) == block
    # Independently of the report: the shipped primary answers like the outsider's file on real pictures.
    from trainer.science.data import DataConfig, SplitConfig, load_splits

    pictures = load_splits(DataConfig(), SplitConfig(valid=200, stream=100, train=500, test=200)).test.images
    x = block.model_input(block.image(pictures))
    shipped = ort.InferenceSession(str(bundle / "primary.onnx"), providers=["CPUExecutionProvider"])
    got = shipped.run(None, {shipped.get_inputs()[0].name: x})[0]
    if door == "timm":
        import timm

        original_net = timm.create_model("resnet10t", num_classes=10).eval()
        original_net.load_state_dict(torch.load(outsider / "timm.pth", weights_only=True))
        with torch.no_grad():
            want = original_net(torch.from_numpy(x)).numpy()
    else:
        original = ort.InferenceSession(str(outsider / "legacy.onnx"), providers=["CPUExecutionProvider"])
        want = original.run(None, {"x": x})[0]
    assert np.abs(got - want).max() <= 1e-4
    # The edge takes the camera's own pictures (gray 28x28 PNGs) and preprocesses them per the manifest.
    from PIL import Image

    for i in range(3):
        Image.fromarray(pictures[i, 0]).save(tmp_path / f"p{i}.png")
    _, out, _ = run_cli(
        "edge_agent", "classify", "--bundle", str(bundle), *[str(tmp_path / f"p{i}.png") for i in range(3)]
    )
    assert out is not None and len(out["results"]) == 3 and out["path"] == "fused"


def test_refusals_are_one_line_and_exit_2(outsider: Path, tmp_path: Path) -> None:
    def one_line(args: list[str], says: str) -> None:
        code, _, err = run_cli("trainer", *args, check=False)
        errors = [ln for ln in err.splitlines() if " ERROR " in ln]
        assert code == 2 and says in err and "Traceback" not in err and len(errors) == 1, (args, err[-2000:])

    (tmp_path / "bad.json").write_text('{"color": "rgb", "size": [32, 32], "stdev": [0.3]}')
    graph = helper.make_graph(
        [helper.make_node("Det", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "det.onnx")
    out = ["--out", str(tmp_path / "o"), *TINY]
    one_line(["predeploy", "--model", str(outsider / "legacy.onnx"), "--preprocess", str(tmp_path / "bad.json"), *out],
             "unknown field(s) ['stdev']")  # fmt: skip
    one_line(["predeploy", "--model", str(tmp_path / "det.onnx"), *out], "no converter for the operator(s) Det-v11")
    one_line(["predeploy", "--model", str(outsider / "legacy.onnx"), *out], "give a --preprocess block")
    one_line(["predeploy", "--arch", "torchvision:resnet18", *out], "needs --weights FILE")
    one_line(["predeploy", "--model", str(tmp_path / "m.bin"), *out], "expected .onnx, .pt2 or .pt")
    one_line(["evaluate", "--model", str(outsider / "legacy.onnx"), *TINY], "pass a --preprocess block")
    assert not (tmp_path / "o" / "bundle").exists()


def test_a_folder_of_mixed_sizes_is_read_through_the_model_files_own_block(tmp_path: Path) -> None:
    """The user's clean data at the camera's many resolutions: `evaluate` reads the block from the ONNX file's
    metadata (no flag), fits every picture with its resize rule, and takes the class names from the model."""
    from PIL import Image

    from edge_agent.formats.spec import InputSpec
    from trainer.science.export import export_onnx
    from trainer.science.models import build_model

    block = Preprocess(color="rgb", size=(24, 24), resize="letterbox", mean=(0.5,), std=(0.25,))
    torch.manual_seed(0)
    export_onnx(build_model("cnn3", (3, 24, 24), 2), InputSpec.for_image((3, 24, 24), block), ("ok", "defect"),
                tmp_path / "m.onnx")  # fmt: skip
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i, (h, w) in enumerate([(48, 64), (30, 30), (100, 40)] * 4):
            mode, shape = ("L", (h, w)) if i % 2 else ("RGB", (h, w, 3))
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(
                tmp_path / "data" / cls / f"{i}.png"
            )
    data = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--valid-size", "4",
            "--stream-size", "2", "--train-size", "2"]  # fmt: skip
    _, out, _ = run_cli("trainer", "evaluate", "--model", str(tmp_path / "m.onnx"), *data)
    assert out is not None and 0.0 <= out["clean_accuracy"] <= 1.0 and out["n_clean"] == 4
    # Without a block that names a size, the folder cannot be stacked: one line, exit 2, what to pass.
    (tmp_path / "plain.json").write_text(json.dumps({"mean": [0.5], "std": [0.25]}))
    code, _, err = run_cli("trainer", "evaluate", "--model", str(tmp_path / "m.onnx"),
                           "--preprocess", str(tmp_path / "plain.json"), *data, check=False)  # fmt: skip
    assert code == 2 and "--preprocess block with the model's size" in err and "Traceback" not in err
