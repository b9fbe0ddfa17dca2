"""Operators see what the fleet refused: `nnoc-trainer quarantine show` (a captioned contact sheet) and
`quarantine export` (PNGs + index.csv), on a collector-layout quarantine with frames from named sources."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import rgb_bundle, run_cli
from edge_agent.formats.preprocess import Preprocess
from edge_agent.formats.wire import build_header


def test_show_and_export_a_fleets_quarantine(tmp_path: Path) -> None:
    from edge_agent.formats.bundle import read_manifest
    from trainer.service.quarantine import QuarantineStore
    from trainer.service.store import ModelStore

    block = Preprocess(color="rgb", size=(32, 32), mean=(0.5,), std=(0.25,))
    bundle = rgb_bundle(tmp_path / "made", block)
    store = ModelStore(tmp_path / "exports")
    store.create("cams")
    store.add("cams", bundle.parent)
    spec = read_manifest(bundle).input_spec
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    gate_frames = dict(source_id="gate", captured_at=1_790_000_000.0)
    messages = [
        (
            build_header("edge-1", "cams", 1, (3, 32, 32), "uint8", 3, 7, seq=i, position=100 + i, **gate_frames),
            images[i].tobytes(),
        )
        for i in range(4)
    ]
    # and one from an older agent that sent the float tensor, through the endpoint
    old = build_header("edge-2", "cams", 1, (3, 32, 32), "float32", 1, 2, seq=9)
    messages.append((old, block.model_input(images[4:5]).tobytes()))
    state = tmp_path / "state"
    with QuarantineStore(state / "quarantine" / "cams" / "1") as q:
        q.describe("cams", 1, spec)
        assert q.add_many(messages) == 5

    common = ["--fleet", "cams", "--state-dir", str(state), "--store", str(tmp_path / "exports")]
    _, out, _ = run_cli("trainer", "quarantine", "show", *common, "--out", str(tmp_path / "sheet.png"),
                        "--columns", "3")  # fmt: skip
    assert out is not None and out["stored"] == 5 and out["shown"] == 5 and out["version"] == 1
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.width == 3 * 150 and sheet.height > 2 * 112
    _, out, _ = run_cli("trainer", "quarantine", "export", *common, "--out", str(tmp_path / "x"))
    assert out is not None and out["exported"] == 5
    with (tmp_path / "x" / "index.csv").open() as f:
        rows = list(csv.DictReader(f))
    by_seq = {(r["device_id"], int(r["seq"])): r for r in rows}
    gate = by_seq[("edge-1", 2)]
    assert (gate["source_id"], gate["position"], gate["primary_class"], gate["monitor_class"]) == (
        "gate",
        "102",
        "3",
        "7",
    )
    assert by_seq[("edge-2", 9)]["source_id"] == "" and by_seq[("edge-2", 9)]["position"] == ""
    for key, i in ((("edge-1", 2), 2), (("edge-2", 9), 4)):  # the stored image, exactly (the float one too)
        with Image.open(tmp_path / "x" / by_seq[key]["file"]) as png:
            assert np.array_equal(np.asarray(png).transpose(2, 0, 1), images[i])
    # A fleet without a quarantine, or no fleet at all: one line, exit 2.
    for args, says in ((["--fleet", "nowhere", "--state-dir", str(state)], "has no quarantine"),
                       ([], "pass --fleet")):  # fmt: skip
        code, _, err = run_cli("trainer", "quarantine", "show", *args, "--out", str(tmp_path / "s.png"), check=False)
        assert code == 2 and says in err and "Traceback" not in err
