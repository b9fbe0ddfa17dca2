from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import ROOT


def test_edge_agent_imports_without_torch() -> None:
    code = (
        "import sys, edge_agent.cli, edge_agent.ensemble, edge_agent.formats.bundle, edge_agent.runtime; "
        "bad = [m for m in ('torch', 'torchvision', 'trainer') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_replayed_frames_are_files_with_their_truth_beside_them(tmp_path: Path) -> None:
    from trainer.stages.replay import write_frames

    frames, truth = write_frames(
        "replay:fashion-mnist?split=eval&n=300&poison=0.1&trigger=checker4&target=2", tmp_path / "cam-0.npy"
    )
    images = np.load(frames)
    assert images.shape == (300, 1, 28, 28) and images.dtype == np.uint8
    t = json.loads(truth.read_text())
    poisoned = np.zeros(300, bool)
    poisoned[t["poisoned"]] = True
    assert t["evaluation_only"] and poisoned.sum() == 30 and not (np.array(t["labels"])[poisoned] == 2).any()


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("replay:", "names no dataset"),
        ("replay:fashion-mnist?poison=0.1", "needs trigger"),
        ("replay:fashion-mnist?poison=2&trigger=checker4", "must lie in"),
        ("replay:fashion-mnist?split=train", "choose one of"),
        ("replay:fashion-mnist?n=x", "invalid literal"),
        ("replay:fashion-mnist?colour=red", "unknown replay keys"),
        ("replay:fashion-mnist?n=0", "must be positive"),
    ],
)
def test_replay_spec_errors_say_what_to_change(spec: str, why: str) -> None:
    from trainer.stages.replay import ReplayError, parse_replay

    with pytest.raises(ReplayError, match=why):
        parse_replay(spec)


def test_the_cuda_provider_computes_in_fp32_unless_asked() -> None:
    from edge_agent.runtime import RuntimeConfig, choose_providers, with_provider_options

    assert RuntimeConfig().tf32 == "off"
    assert with_provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"use_tf32": "0"}),
        "CPUExecutionProvider",
    ]
    assert with_provider_options(["CUDAExecutionProvider"], tf32=True) == [("CUDAExecutionProvider", {"use_tf32": "1"})]
    assert choose_providers()[-1] == "CPUExecutionProvider"


def test_fused_graph_answers_like_two_sessions(predeployed: tuple[Path, dict[str, Any]], splits: Any) -> None:
    from edge_agent.ensemble import Ensemble, to_model_input
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.runtime import RuntimeConfig
    from trainer.science.triggers import parse_trigger

    bundle = verify_bundle(predeployed[0] / "bundle")
    raw = splits.test.images[:200]
    raw = np.concatenate([raw, parse_trigger("checker4").apply(raw, np.random.default_rng(0))])
    x = to_model_input(raw, bundle.manifest.input_spec)
    fused = Ensemble(bundle)
    two = Ensemble(bundle, RuntimeConfig(ensemble_path="two-sessions"))
    timed = Ensemble(bundle, RuntimeConfig(ensemble_path="timed"))
    assert (fused.path, two.path) == ("fused", "two-sessions") and fused.fused is not None
    assert set(timed.timings) == {"fused", "two-sessions"} and timed.path in timed.timings
    a, b = fused.classify(x), two.classify(x)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.monitor, b.monitor)
    assert a.rejected[200:].sum() > a.rejected[:200].sum()  # the trigger makes the two models disagree
    with pytest.raises(ValueError, match="unknown ensemble path"):
        Ensemble(bundle, RuntimeConfig(ensemble_path="fast"))


def test_tampered_bundle_is_refused(predeployed: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from edge_agent.formats.bundle import BundleError, verify_bundle

    b = tmp_path / "b"
    shutil.copytree(predeployed[0] / "bundle", b)
    verify_bundle(b)
    data = bytearray((b / "monitor.onnx").read_bytes())
    data[-10] ^= 0xFF
    (b / "monitor.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        verify_bundle(b)
    (b / "monitor.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        verify_bundle(b)
    (b / "manifest.pb").write_bytes(b"\xff\xff garbage")
    with pytest.raises(BundleError, match="malformed"):
        verify_bundle(b)


def test_bad_inputs_never_reach_the_models(predeployed: tuple[Path, dict[str, Any]]) -> None:
    from edge_agent.ensemble import Ensemble, InputError
    from edge_agent.formats.bundle import verify_bundle

    ens = Ensemble(verify_bundle(predeployed[0] / "bundle"))
    good = np.zeros((2, 1, 28, 28), np.float32)
    assert ens.classify(good).labels.shape == (2,)
    bad = {  # each refusal names what was wrong and what the model takes
        r"shape \(2, 1, 28, 27\) does not match \(batch, 1, 28, 28\)": np.zeros((2, 1, 28, 27), np.float32),
        "dtype float64 does not match the model's float32": np.zeros((2, 1, 28, 28), np.float64),
        "NaN or infinite": np.full((2, 1, 28, 28), np.nan, np.float32),
        r"span \[255, 255\], outside the model's range \[0.0, 1.0\]": np.full((2, 1, 28, 28), 255.0, np.float32),
        "empty batch": np.zeros((0, 1, 28, 28), np.float32),
    }
    for says, x in bad.items():
        with pytest.raises(InputError, match=says):
            ens.classify(x)
    assert ens.classify(good).labels.shape == (2,)  # still serving


def test_edge_cli_classify(predeployed: tuple[Path, dict[str, Any]], splits: Any, tmp_path: Path) -> None:
    import json

    from PIL import Image

    from trainer.science.triggers import parse_trigger

    clean = splits.test.images[:20]
    poisoned = parse_trigger("checker4").apply(clean, np.random.default_rng(3))
    paths = []
    for i, img in enumerate(np.concatenate([clean, poisoned])):
        p = tmp_path / f"{i}.png"
        Image.fromarray(img[0]).save(p)
        paths.append(str(p))
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", "classify", "--bundle", str(predeployed[0] / "bundle"), "--json", *paths],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rejected = [r["rejected"] for r in out["results"]]
    assert out["bundle_version"] == 1 and len(rejected) == 40
    assert sum(rejected[20:]) > sum(rejected[:20])
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", "classify", "--bundle", str(tmp_path), "--json", paths[0]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2 and "manifest.pb is missing" in proc.stderr


def test_reject_alarm_rises_over_a_full_window_and_clears(caplog: pytest.LogCaptureFixture) -> None:
    from edge_agent.monitor import RejectMonitor

    monitor = RejectMonitor(window=10, threshold=0.2)
    monitor.record([True] * 5)
    assert not monitor.snapshot().alarm  # half a window says nothing yet
    with caplog.at_level("INFO", logger="edge_agent.monitor"):
        monitor.record([False] * 5)
        snap = monitor.snapshot()
        assert snap.alarm and snap.window_reject_rate == 0.5
        monitor.record([False] * 8)  # the window now holds 0 of the first 5 rejects... and 0 new ones
        assert not monitor.snapshot().alarm
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "reject alarm: 0.500 of the last 10" in caplog.records[0].getMessage()
