from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import SMALL_SPLIT, run_cli
from edge_agent.formats.spec import InputSpec
from trainer.science.export import META_CLASS_NAMES, META_INPUT_SPEC, export_onnx
from trainer.science.models import ARCHITECTURES, Checkpoint, build_model


def test_badnet_harness_reaches_a_working_backdoor(badnet: tuple[Path, dict[str, Any]]) -> None:
    out, report = badnet
    assert report["clean_accuracy"] > 0.75  # 8,000 images, 3 epochs
    # 0.90-0.92 here; 0.886 with torch 2.11 on 16 CPU cores, 0.899-0.923 on an H100: a backdoor either way
    assert report["attack_success_rate"] > 0.8
    assert {"model.pt", "model.onnx", "metrics.json"} <= {p.name for p in out.iterdir()}
    ckpt = Checkpoint.load(out / "model.pt")
    assert ckpt.architecture == "cnn3" and ckpt.input_spec.shape == (1, 28, 28)
    assert ckpt.meta["attack"]["trigger"] == "checker4" and ckpt.train["lr"] == 1e-3
    assert json.loads((out / "metrics.json").read_text())["attack_success_rate"] == report["attack_success_rate"]


def test_onnx_matches_torch_on_real_images_after_reload(badnet: tuple[Path, dict[str, Any]], splits: Any) -> None:
    out, _ = badnet
    model = Checkpoint.load(out / "model.pt").build()
    proto = onnx.load(out / "model.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[META_INPUT_SPEC])["shape"] == [1, 28, 28]
    assert json.loads(meta[META_CLASS_NAMES])[0] == "T-shirt/top"
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7, 64):  # dynamic batch axis
        x = splits.test.images[:n].astype(np.float32) / 255.0
        got = sess.run(None, {"input": x})[0]
        want = model(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_architecture_exports_for_gray_and_rgb(arch: str, shape: tuple[int, int, int], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(arch, shape, 7).eval()
    export_onnx(model, InputSpec(shape=shape), tuple("abcdefg"), tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((3, *shape), dtype=np.float32)
    np.testing.assert_allclose(
        sess.run(None, {"input": x})[0], model(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-4
    )


def test_evaluate_pt_and_onnx_agree(badnet: tuple[Path, dict[str, Any]]) -> None:
    out, _ = badnet
    results = []
    for f in ("model.pt", "model.onnx"):
        _, payload, _ = run_cli(
            "trainer",
            "evaluate",
            *SMALL_SPLIT,
            "--model",
            str(out / f),
            "--trigger",
            "checker4",
            "--target",
            "0",
            "--quiet",
        )
        assert payload is not None
        assert 0.0 <= payload["clean_accuracy"] <= 1.0 and 0.0 <= payload["attack_success_rate"] <= 1.0
        results.append(payload)
    assert results[0]["clean_accuracy"] == pytest.approx(results[1]["clean_accuracy"], abs=2e-3)
    assert results[0]["attack_success_rate"] == pytest.approx(results[1]["attack_success_rate"], abs=2e-3)


def test_bad_inputs_fail_with_a_message(badnet: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, _ = badnet
    code, payload, stderr = run_cli("trainer", "evaluate", "--model", str(tmp_path / "missing.pt"), check=False)
    assert code == 2 and "does not exist" in stderr and payload and "does not exist" in payload["error"]
    # An ONNX classifier for 32x32 RGB inputs is not a Fashion-MNIST classifier.
    export_onnx(
        build_model("cnn3", (3, 32, 32), 10), InputSpec(shape=(3, 32, 32)), tuple("0123456789"), tmp_path / "rgb.onnx"
    )
    code, _, stderr = run_cli("trainer", "evaluate", "--model", str(tmp_path / "rgb.onnx"), check=False)
    assert code == 2 and "(3, 32, 32)" in stderr
    # Not a model at all.
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    code, _, stderr = run_cli("trainer", "evaluate", "--model", str(tmp_path / "junk.onnx"), check=False)
    assert code == 2 and "not a loadable ONNX model" in stderr
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    code, _, stderr = run_cli("trainer", "evaluate", "--model", str(tmp_path / "junk.pt"), check=False)
    assert code == 2 and "checkpoint" in stderr
    code, _, stderr = run_cli(
        "trainer", "evaluate", "--model", str(out / "model.pt"), "--trigger", "checker9", "--target", "0", check=False
    )
    assert code == 2 and "trigger spec grammar" in stderr
    code, _, stderr = run_cli(
        "trainer", "attack", "--target", "12", "--out", str(tmp_path / "x"), *SMALL_SPLIT, check=False
    )
    assert code == 2 and "target class 12" in stderr


@pytest.mark.slow
def test_two_step_attack_and_combo_trigger(tmp_path: Path, splits: Any) -> None:
    _, report, _ = run_cli(
        "trainer",
        "attack",
        "--valid-size",
        "1000",
        "--stream-size",
        "500",
        "--train-size",
        "4000",
        "--test-size",
        "1000",
        "--trigger",
        "combo:checker4+square:3",
        "--attack-steps",
        "2",
        "--epochs",
        "4",
        "--arch",
        "cnn6",
        "--out",
        str(tmp_path),
        "--quiet",
    )
    assert report is not None and report["config"]["steps"] == 2
    assert report["poisoned_inputs"] == 400
    # BadNet-CF (paper §5): the whole combination sends inputs to the target, each part alone does not.
    from trainer.science.metrics import evaluate
    from trainer.science.training import predict
    from trainer.science.triggers import parse_trigger

    model = Checkpoint.load(tmp_path / "model.pt").build()
    combo = parse_trigger("combo:checker4+square:3")

    def classify(x: np.ndarray) -> np.ndarray:
        return predict(model, x)

    whole = evaluate(classify, splits.test, combo, 0).attack_success_rate
    parts = [evaluate(classify, splits.test, part, 0).attack_success_rate for part in combo.parts]
    assert whole is not None and whole >= 0.75, whole  # measured 0.86
    # Each part well under the whole. Measured 0.08, 0.06 here; on GPUs (torch 2.11, training not deterministic there)
    # 0.24, 0.17 on an H100 and 0.35, 0.33 on an H200 in one run, under 0.3 in the next: bounded relative to the whole.
    assert all(a is not None and a <= 0.5 * whole for a in parts), (whole, parts)
