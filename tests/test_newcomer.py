"""A newcomer follows the README: its "Defend your own model" commands run as written, in a fresh folder holding
what the README says the defender brings (a vendor's ONNX file without our metadata, its preprocessing block, its
class names, a folder of photos per class, and a folder of camera pictures). Lines ending in ``&`` are the two
services; the test waits for each to be up before the next line, as a newcomer would wait for the log.

The README's and the docs' relative links are checked here too (the docs site's own are checked by
``mkdocs build --strict`` in ``make lint``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from conftest import ROOT, log_tails, read_json, stop_all, wait_while_running

MARK = "<!-- tests/test_newcomer.py runs the block below as written, on a small folder -->"


def readme_commands() -> list[str]:
    """The marked block's commands, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    assert MARK in text, "the README lost its newcomer block's marker"
    block = text.split(MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def _photo(picture: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(picture[0]).save(path)


def test_the_readme_defender_commands_run_as_written(
    badnet: tuple[Path, dict[str, Any]], splits: Any, tmp_path: Path
) -> None:
    import onnx

    from trainer.science.data import FASHION_MNIST_CLASSES

    # What the defender brings: the vendor's model as sent (no nnoc metadata), its block, its classes, photos.
    model = onnx.load(badnet[0] / "model.onnx")
    kept = [p for p in model.metadata_props if not p.key.startswith("nnoc.")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, tmp_path / "vendor.onnx")
    (tmp_path / "vendor.json").write_text(json.dumps({"color": "gray", "size": [28, 28], "scale": 1 / 255}))
    names = [n.replace("/", "-") for n in FASHION_MNIST_CLASSES]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    pictures, labels = splits.test.images, splits.test.labels
    for i in range(500):
        (tmp_path / "myphotos" / names[labels[i]]).mkdir(parents=True, exist_ok=True)
        _photo(pictures[i], tmp_path / "myphotos" / names[labels[i]] / f"{i}.png")
    (tmp_path / "door-photos").mkdir()
    for i in range(500, 540):
        _photo(pictures[i], tmp_path / "door-photos" / f"{i}.png")

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    services: list[subprocess.Popen[str]] = []
    ready = {  # how a newcomer knows each service is up
        "nnoc-trainer serve": lambda: read_json(tmp_path / "nnoc-trainer-state" / "serve.json"),
        "nnoc-edge run": lambda: (
            (read_json(tmp_path / "nnoc-edge-state" / "agent.json") or {}).get("bundle_version") == 1
        ),
    }
    commands = readme_commands()
    assert [c.split()[1] for c in commands][:4] == ["init", "predeploy", "keys", "fleet"]
    last = ""
    try:
        for k, command in enumerate(commands):
            if command.split("#", 1)[0].rstrip().endswith("&"):
                line = command.split("#", 1)[0].rstrip()[:-1]
                kind = next(name for name in ready if line.startswith(name))
                log = (logs / f"{k}.log").open("w")
                services.append(subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=tmp_path, env=env, stdout=log,
                                                 stderr=subprocess.STDOUT, text=True))  # fmt: skip
                wait_while_running(ready[kind], 180, services, logs)
                continue
            proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=900)  # fmt: skip
            assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-3000:])
            assert "Traceback" not in proc.stderr, (command, proc.stderr[-3000:])
            last = proc.stdout
        assert "door-1" in last, last[-2000:]  # the agent is listed in `fleet status`, on v1
    finally:
        stop_all(services)
    assert [p.returncode for p in services] == [0, 0], log_tails(logs)
    assert (tmp_path / "runs" / "cams-pd" / "bundle" / "manifest.pb").is_file()


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """A Markdown heading's anchor as GitHub and MkDocs' default slugify make it (for the headings used here)."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return re.sub(r"\s+", "-", text)


def test_the_readme_and_top_level_pages_link_to_what_exists() -> None:
    for page in (ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "bench" / "NOTES.md"):
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # http(s), mailto
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: link to {target}: no such file"
            if anchor and dest.suffix == ".md":
                heads = [_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)]
                assert anchor in heads, f"{page.name}: link to {target}: no such heading in {dest.name}"
