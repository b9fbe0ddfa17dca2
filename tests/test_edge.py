from __future__ import annotations

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
        "import sys, edge_agent.cli, edge_agent.ensemble, edge_agent.bundle, edge_agent.runtime; "
        "bad = [m for m in ('torch', 'torchvision', 'trainer') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_tampered_bundle_is_refused(predeployed: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from edge_agent.bundle import BundleError, verify_bundle

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
    from edge_agent.bundle import verify_bundle
    from edge_agent.ensemble import Ensemble, InputError

    ens = Ensemble(verify_bundle(predeployed[0] / "bundle"))
    good = np.zeros((2, 1, 28, 28), np.float32)
    assert ens.classify(good).labels.shape == (2,)
    bad = {
        "shape": np.zeros((2, 1, 28, 27), np.float32),
        "dtype": np.zeros((2, 1, 28, 28), np.float64),
        "NaN": np.full((2, 1, 28, 28), np.nan, np.float32),
        "range": np.full((2, 1, 28, 28), 255.0, np.float32),
        "empty": np.zeros((0, 1, 28, 28), np.float32),
    }
    for what, x in bad.items():
        with pytest.raises(InputError) as e:
            ens.classify(x)
        assert str(e.value), what
    assert ens.provider == "CPUExecutionProvider" or "CUDA" in ens.provider or "Tensorrt" in ens.provider


def test_edge_cli_classify(predeployed: tuple[Path, dict[str, Any]], splits: Any, tmp_path: Path) -> None:
    import json

    from PIL import Image

    from trainer.triggers import parse_trigger

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
