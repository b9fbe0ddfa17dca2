"""How many photos a defender needs: θ_aug and the repair against the size of the defender's own set, on a foreign
model, through the product's path.

The model is an outsider's BadNet (bench/outsider_badnet.py: a residual net with BatchNorm, 3x32x32 normalised RGB,
its own glyph trigger, target 7, trained on the end of Fashion-MNIST's training file). The defender's photos are
the first N pictures of that file, written as a folder per class (PNG, 28x28: another size than the model's) and
given as ``--data`` with the model's class names (``--class-names``); nothing of the harness' splits is used by
predeploy or repair. Then, for evaluation only: θ_aug's and θ_repair's test CA/ASR (``evaluate``, 5,000 test
images, the glyph), the quarantine from a stream at CPD 0.1, N = 1,000 (``stream``, the harness' stream split).

The grid is smaller than predeploy's default (``--max-rounds 1 --epochs 2``, the six γ), the same at every N,
so the columns compare sizes, not grids. Repair: the quick profile.

    python -m bench.bench_smallest [--sizes 300 1000 3000 5000] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.bench_field import stage
from bench.common import ROOT, run_cli, save

OUT = ROOT / "runs" / "bench-smallest"
TARGET = "7"
HARNESS = ["--dataset", "fashion-mnist"]


def outsider(out: Path) -> dict[str, Any]:
    """The foreign BadNet (made once) and its report."""
    if not (out / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "bench.outsider_badnet", "--arch", "resnet-small", "--out", str(out)],
                       check=True, cwd=ROOT)  # fmt: skip
    return dict(json.loads((out / "report.json").read_text()))


def photos(n: int, out: Path) -> Path:
    """The first ``n`` pictures of the training file as ``out/<class>/*.png`` (names a folder can take)."""
    from PIL import Image

    from trainer.science.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx

    if out.is_dir():
        return out
    images = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")[:n]
    labels = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")[:n]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, (picture, label) in enumerate(zip(images, labels, strict=True)):
        folder = tmp / FASHION_MNIST_CLASSES[int(label)].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(folder / f"{i}.png")
    tmp.rename(out)
    return out


def evaluate(model: Path, reference: Path, trigger: str, *door: str) -> dict[str, Any]:
    """Test CA and ASR (5,000 test images; the BadNet's eligible set); ``door``: the model's --preprocess."""
    rep = run_cli("evaluate", "--model", str(model), *door, "--reference", str(reference), "--trigger", trigger,
                  "--target", TARGET, *HARNESS, "--test-size", "5000", "--valid-size", "1000", "--stream-size",
                  "1000")  # fmt: skip
    return {k: rep.get(k) for k in ("clean_accuracy", "attack_success_rate", "error")}


def size_row(n: int, made: Path, trigger: str, names: list[str]) -> dict[str, Any]:
    """Predeploy on N photos, θ_aug's numbers, a stream, the repair on the same N photos, θ_repair's numbers."""
    w = OUT / f"n{n}"
    data = photos(n, OUT / "photos" / f"n{n}")
    door = ["--model", str(made / "model.onnx"), "--preprocess", str(made / "preprocess.json"), "--class-names",
            *names]  # fmt: skip
    own = ["--data", str(data)]
    row: dict[str, Any] = {"photos": n}
    pd = stage(w / "predeploy.json", lambda: run_cli("predeploy", *door, *own, "--max-rounds", "1", "--epochs", "2",
                                                     "--out", str(w / "predeploy")))  # fmt: skip
    row["predeploy_seconds"] = pd.get("seconds")
    if pd.get("exit_code", 0) != 0:
        row["error"] = pd.get("error")
        return row
    bundle = w / "predeploy" / "bundle"
    row["split"] = pd.get("split_sizes") or {}
    row["theta_aug"] = stage(w / "aug.json", lambda: evaluate(bundle / "monitor.onnx", bundle / "primary.onnx",
                                                              trigger))  # fmt: skip
    row["theta_aug"] |= {"alpha": pd["selected"]["alpha"], "gamma": pd["selected"]["gamma"],
                         "eval_ca": pd["selected"]["eval_ca"], "threshold": pd["threshold"]}  # fmt: skip
    row["served_eval"] = pd.get("served_eval")
    st = stage(w / "stream.json", lambda: run_cli("stream", "--bundle", str(bundle), "--trigger", trigger, "--target",
                                                  TARGET, "--cpd", "0.1", "--n", "1000", "--out", str(w / "quarantine"),
                                                  *HARNESS))  # fmt: skip
    row["stream"] = {k: st.get(k) for k in ("rejected", "precision", "recall", "clean_reject_rate")}
    rep = stage(w / "repair.json", lambda: run_cli("repair", "--bundle", str(bundle), "--quarantine",
                                                   str(w / "quarantine"), *own, "--profile", "quick", "--out",
                                                   str(w / "repair")))  # fmt: skip
    row["repair_seconds"] = rep.get("seconds")
    row["repair_published"] = rep.get("exit_code") == 0
    row["repair_error"] = rep.get("error")
    if row["repair_published"]:
        row["theta_repair"] = stage(w / "repaired.json", lambda: evaluate(
            w / "repair" / "bundle" / "primary.onnx", bundle / "primary.onnx", trigger))  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 3000, 5000])
    ap.add_argument("--reuse", action="store_true", help="keep the stages already under runs/bench-smallest")
    args = ap.parse_args()
    from trainer.science.data import FASHION_MNIST_CLASSES

    if not args.reuse:
        for n in args.sizes:
            shutil.rmtree(OUT / f"n{n}", ignore_errors=True)
    made = OUT / "outsider"
    t = time.monotonic()
    report = outsider(made)
    trigger = (made / "trigger.txt").read_text().strip()
    names = [c.replace("/", "-") for c in FASHION_MNIST_CLASSES]
    badnet = evaluate(made / "model.onnx", made / "model.onnx", trigger, "--preprocess", str(made / "preprocess.json"))
    rows = []
    for n in args.sizes:
        row = size_row(n, made, trigger, names)
        print(json.dumps(row), flush=True)
        rows.append(row)
    save("smallest", {"badnet": badnet, "outsider": report, "trigger": trigger, "rows": rows,
                      "grid": "--max-rounds 1 --epochs 2", "repair_profile": "quick",
                      "seconds": round(time.monotonic() - t, 1)})  # fmt: skip


if __name__ == "__main__":
    main()
