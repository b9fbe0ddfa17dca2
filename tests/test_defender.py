"""The defender's path, walked as a new user would: a vendor's model, their own photos, a model card, a fleet, the
service and its own repair job, an agent fed the photos. Two fleets with different models and data share one
``serve``; each fleet's repair reads its own card's photos."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tomllib

from conftest import ROOT, SMALL_SPLIT, read_json, run_cli, stop_all, wait_while_running

BLOCK = {"color": "rgb", "size": [32, 32], "mean": [0.286, 0.286, 0.286], "std": [0.353, 0.353, 0.353]}
GRID = ["--gammas", "0.3", "0.6", "--epochs", "1", "--max-rounds", "2"]


def _strip_nnoc(src: Path, dst: Path) -> None:
    """The model as a vendor would send it: no nnoc metadata (no class names, no preprocessing block)."""
    model = onnx.load(src)
    kept = [p for p in model.metadata_props if not p.key.startswith("nnoc.")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, dst)


def _photo(picture: np.ndarray, path: Path, size: int) -> None:
    from PIL import Image

    img = Image.fromarray(picture[0]).convert("RGB" if path.suffix == ".jpg" else "L")
    img.resize((size, size), Image.Resampling.BILINEAR).save(path)


def _cli(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    return run_cli("trainer", *args, check=False)


def test_a_defender_walks_from_vendor_model_and_photos_to_a_repaired_fleet(
    badnet: tuple[Path, dict[str, Any]], splits: Any, tmp_path: Path
) -> None:
    from trainer.science.data import FASHION_MNIST_CLASSES
    from trainer.science.triggers import parse_trigger
    from trainer.service.store import ModelStore

    work = tmp_path
    logs = work / "logs"
    logs.mkdir()
    # The vendor's model: 3x32x32 normalised RGB, sent without its class names or preprocessing.
    (work / "vendor.json").write_text(json.dumps(BLOCK))
    run_cli("trainer", "attack", *SMALL_SPLIT, "--trigger", "square:4", "--target", "0", "--epochs", "4",
            "--clean-epochs", "1", "--preprocess", str(work / "vendor.json"), "--out", str(work / "bd"),
            "--quiet")  # fmt: skip
    _strip_nnoc(work / "bd" / "model.onnx", work / "vendor.onnx")
    names = [n.replace("/", "-") for n in FASHION_MNIST_CLASSES]  # names a folder can take, in the model's order
    (work / "classes.txt").write_text("\n".join(names) + "\n")
    # Their photos: 64x64 JPEGs in a folder per class, which sort in another order than the model's.
    photos = work / "myphotos"
    pictures, labels = splits.test.images, splits.test.labels
    for i in range(1000):
        (photos / names[labels[i]]).mkdir(parents=True, exist_ok=True)
        _photo(pictures[i], photos / names[labels[i]] / f"{i}.jpg", 64)
    assert sorted(names) != names
    model = ["--model", str(work / "vendor.onnx"), "--preprocess", str(work / "vendor.json")]

    # Point 3: no data named is not Fashion-MNIST by default.
    code, out, err = _cli("predeploy", *model, "--out", str(work / "x"))
    assert code == 2 and out is not None and "--data DIR" in out["error"] and "Traceback" not in err
    # Point 1: the harness' splits on one's own photos say to give them as --data.
    code, out, _ = _cli("predeploy", *model, "--dataset", "imagefolder", "--data-dir", str(photos), "--out",
                        str(work / "x"))  # fmt: skip
    assert code == 2 and out is not None and "--data DIR instead of --dataset" in out["error"]
    # Point 2: the folders' sorted order is not the model's: refused before any treatment, the order named.
    code, out, _ = _cli("predeploy", *model, "--data", str(photos), "--out", str(work / "x"))
    assert code == 2 and out is not None and "Give --classes FILE" in out["error"]
    assert ", ".join(names) in out["error"] and not (work / "x" / "candidates.csv").exists()

    # The product's path: a card, the treatment, a fleet.
    card = work / "cams.toml"
    _, made, _ = run_cli("trainer", "init", *model, "--classes", str(work / "classes.txt"), "--data", str(photos),
                         "--fleet", "cams", "--out", str(card))  # fmt: skip
    assert made is not None and made["classes"] == names and made["photos"] == 1000
    text = card.read_text().replace("min_quarantine = 200", "min_quarantine = 40")
    card.write_text(text)
    assert tomllib.loads(text)["model"]["classes"] == names
    _, pd, _ = run_cli("trainer", "predeploy", "--card", str(card), *GRID, "--out", str(work / "pd-cams"), "--quiet")
    assert pd is not None and pd["served_eval"]["served_clean_accuracy"] > 0.7  # right labels: the vendor's CA
    assert "served_test" not in pd and pd["selected"]["test_asr"] is None  # no harness split on this path

    # A second fleet: another model (gray 28x28, its own names and block) and other photos, as a CSV of index labels.
    doors = work / "door-photos"
    doors.mkdir()
    with (doors / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i, (picture, label) in enumerate(zip(splits.valid.images, splits.valid.labels, strict=True)):
            _photo(picture, doors / f"{i}.png", 28)
            w.writerow([f"{i}.png", int(label)])
    door_card = work / "doors.toml"
    door_card.write_text(
        f'fleet = "doors"\n[model]\nfile = "{badnet[0] / "model.onnx"}"\n[data]\ndir = "door-photos/labels.csv"\n'
        '[repair]\nmin_quarantine = 40\nprofile = "quick"\n'
    )
    _, pd2, _ = run_cli("trainer", "predeploy", "--card", str(door_card), *GRID, "--out", str(work / "pd-doors"),
                        "--quiet")  # fmt: skip
    assert pd2 is not None and pd2["served_eval"]["served_clean_accuracy"] > 0.7
    store = work / "exports"
    for fleet in ("cams", "doors"):
        run_cli("trainer", "fleet", "create", fleet, "--from", str(work / f"pd-{fleet}"), "--store", str(store))
    assert ModelStore(store).state("doors").card["data"]["dir"] == str((doors / "labels.csv").resolve())

    # The service (no data flags of its own), an agent per fleet fed photos with some triggered.
    streams = {"cams": (work / "cam-stream", "square:4", ".jpg", 64), "doors": (work / "door-stream", "checker4",
                                                                                 ".png", 28)}  # fmt: skip
    rng = np.random.default_rng(0)
    for i, (folder, trig, suffix, size) in enumerate(streams.values()):
        folder.mkdir()
        raw = pictures[1000 + 400 * i : 1400 + 400 * i]
        poisoned = parse_trigger(trig).apply(raw, rng)
        for k in range(len(raw)):
            _photo(poisoned[k] if k % 3 == 0 else raw[k], folder / f"{k:04d}{suffix}", size)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (logs / "serve.log").open("wb") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "trainer", "serve", "--insecure", "--store", str(store), "--state-dir",
                 str(work / "state"), "--collector", "tcp://127.0.0.1:0", "--listen", "127.0.0.1:0", "--max-rounds",
                 "1"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))  # fmt: skip
        info = wait_while_running(lambda: read_json(work / "state" / "serve.json"), 60, procs, logs)
        for fleet, (folder, *_) in streams.items():
            with (logs / f"{fleet}.log").open("wb") as f:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "edge_agent", "run", "--insecure", "--device-id", f"{fleet}-1", "--fleet",
                     fleet, "--model-service", info["model_service"], "--collector", info["collector"], "--infer-port",
                     "0", "--state-dir", str(work / f"agent-{fleet}"), "--source", f"dir:{folder}", "--stats-interval",
                     "1"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))  # fmt: skip

        def both_repaired() -> bool:
            return all(ModelStore(store).state(f).current == 2 for f in streams)

        wait_while_running(both_repaired, 600, procs, logs)

        def both_serve_v2() -> bool:
            return all(
                (read_json(work / f"agent-{f}" / "agent.json") or {}).get("bundle_version") == 2 for f in streams
            )

        wait_while_running(both_serve_v2, 60, procs, logs)
    finally:
        stop_all(procs)
    # Each fleet's job read its own card's photos, not the other's, and scored on them.
    for fleet, data in (("cams", photos), ("doors", doors / "labels.csv")):
        (job,) = [d for d in (work / "state" / "jobs").iterdir() if (d / "job.toml").is_file()
                  and f"/{fleet}/" in tomllib.loads((d / "job.toml").read_text())["bundle"]]  # fmt: skip
        spec = tomllib.loads((job / "job.toml").read_text())  # the job's repair spec, tables by part
        assert spec["data"]["path"] == str(data.resolve()) and spec["profile"] == "quick"
        report = json.loads((job / "run" / "report.json").read_text())
        assert report["published"] and report["served_eval"]["served_clean_accuracy"] > 0.6
        assert report["quarantine_size"] >= 40


@pytest.mark.parametrize("rows", [["a.png,3", "../x.png,1"], ["a.png"]])
def test_a_csv_of_photos_keeps_its_paths_inside_its_folder(tmp_path: Path, rows: list[str]) -> None:
    from trainer.science.data import DatasetError, load_defender

    _photo(np.zeros((1, 8, 8), np.uint8), tmp_path / "a.png", 8)
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match=r"x.csv:\d: "):
        load_defender(tmp_path / "x.csv", 0.2, 0)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[model]\nfile = 3\n", r"\[model\] file = 3: expected a path"),
        ('[model]\nclasses = "a,b"\n', "expected a list of class names"),
        ('[model]\nclasses = ["a", "a"]\n', "the class names repeat"),
        ('[data]\ndir = "x"\nshell = "rm -rf /"\n', r"\[data\] has unknown key\(s\) \['shell'\]"),
        ('[hooks]\nrun = "x"\n', r"unknown section\(s\) \['hooks'\]"),
        ("[reject]\nclean_reject_budget = [1]\n", "expected a string or a number"),
        ("fleet = \n", "cannot read the model card"),
    ],
)
def test_a_model_card_is_data_checked_key_by_key(tmp_path: Path, text: str, error: str) -> None:
    from trainer.card import CardError, ModelCard

    (tmp_path / "card.toml").write_text(text)
    with pytest.raises(CardError, match=error):
        ModelCard.load(tmp_path / "card.toml")


def test_a_card_names_paths_beside_it_and_its_values_are_checked_as_flags(tmp_path: Path) -> None:
    from trainer.cli import build_parser, parse_args

    (tmp_path / "card.toml").write_text(
        'fleet = "cams"\n[model]\nfile = "m.onnx"\nclasses = ["b", "a"]\n[data]\ndir = "photos"\neval_fraction = 0.3\n'
        "[reject]\nclean_reject_budget = 0.02\n"
    )
    args = parse_args(build_parser(only="predeploy"), ["predeploy", "--card", str(tmp_path / "card.toml"), "--out",
                                                       str(tmp_path / "o"), "--eval-fraction", "0.25"])  # fmt: skip
    assert (args.model, args.data, args.class_names, args.fleet) == (
        tmp_path / "m.onnx", tmp_path / "photos", ["b", "a"], "cams",
    )  # fmt: skip
    assert (args.eval_fraction, args.clean_reject_budget) == (0.25, 0.02)  # the flag given wins over the card
    (tmp_path / "bad.toml").write_text("[reject]\nclean_reject_budget = 7\n")
    with pytest.raises(ValueError, match=r"bad.toml: clean-reject-budget = 7: expected a number in \[0, 1\]"):
        parse_args(build_parser(only="predeploy"), ["predeploy", "--card", str(tmp_path / "bad.toml"), "--out", "o"])
