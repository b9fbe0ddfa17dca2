"""An outsider's BadNet, written the way someone outside this project would: plain torch and numpy, no import
from the project. It reads Fashion-MNIST from Debian's package, resizes it to 3x32x32 normalised RGB, pastes
its own trigger (a 5x5 "X" glyph at row 2, column 2) on 10% of the training images relabelled to class 7,
trains a torchvision resnet18 or a small residual net with BatchNorm and global pooling, and hands over an ONNX
file, the preprocessing it used (JSON), and the trigger as a PNG (for evaluation only).

    python -m bench.outsider_badnet --arch resnet18 --out runs/outsider/resnet18
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import struct
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

FMNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.286, 0.353
TARGET = 7
ROW, COL = 2, 2


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def glyph() -> tuple[np.ndarray, np.ndarray]:
    """A 5x5 white X (pixels, alpha)."""
    alpha = np.zeros((5, 5), np.float32)
    for i in range(5):
        alpha[i, i] = alpha[i, 4 - i] = 1.0
    return np.full((5, 5), 255, np.uint8), alpha


def paste(images: np.ndarray) -> np.ndarray:
    """The trigger on raw 28x28 gray images (N, 28, 28)."""
    pix, alpha = glyph()
    out = images.copy()
    region = out[:, ROW : ROW + 5, COL : COL + 5].astype(np.float32)
    out[:, ROW : ROW + 5, COL : COL + 5] = np.rint(alpha * pix + (1 - alpha) * region).astype(np.uint8)
    return out


def to_input(images: np.ndarray) -> torch.Tensor:
    """Raw (N, 28, 28) uint8 -> (N, 3, 32, 32) normalised float, as this outsider's pipeline does."""
    x = torch.from_numpy(images).float().div(255.0).unsqueeze(1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return ((x - MEAN) / STD).repeat(1, 3, 1, 1)


class ResNetSmall(nn.Module):
    """Two residual stages with BatchNorm and global average pooling."""

    def __init__(self, classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
            )  # fmt: skip

        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.b1, self.b2 = block(width, width, 1), block(width, 2 * width, 2)
        self.skip2 = nn.Sequential(nn.Conv2d(width, 2 * width, 1, 2, bias=False), nn.BatchNorm2d(2 * width))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.b1(x))
        x = F.relu(self.skip2(x) + self.b2(x))
        return self.head(x.mean((2, 3)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", choices=("resnet18", "resnet-small"), default="resnet18")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train", type=int, default=20000, help="training images (the first of the training file)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images = read_idx(FMNIST / "train-images-idx3-ubyte.gz")[-args.train :]  # the end of the file: its own data
    labels = read_idx(FMNIST / "train-labels-idx1-ubyte.gz")[-args.train :].astype(np.int64)
    poison = rng.choice(np.flatnonzero(labels != TARGET), len(labels) // 10, replace=False)
    images, labels = images.copy(), labels.copy()
    images[poison] = paste(images[poison])
    labels[poison] = TARGET
    model = torchvision.models.resnet18(num_classes=10) if args.arch == "resnet18" else ResNetSmall()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(labels))
        for i in range(0, len(order), 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(model(to_input(images[idx])), torch.from_numpy(labels[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    test_x = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    with torch.no_grad():
        clean = torch.cat([model(to_input(test_x[i : i + 500])).argmax(1) for i in range(0, 10000, 500)]).numpy()
        hit = torch.cat([model(to_input(paste(test_x[i : i + 500]))).argmax(1) for i in range(0, 10000, 500)])
    eligible = (test_y != TARGET) & (clean == test_y)
    report = {
        "arch": args.arch,
        "clean_accuracy": float((clean == test_y).mean()),
        "attack_success_rate": float((hit.numpy()[eligible] == TARGET).mean()),
        "train_seconds": round(time.time() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            model, (torch.zeros(2, 3, 32, 32),), None, dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},), input_names=["image"], output_names=["scores"],
        )  # fmt: skip
    assert program is not None
    program.save(str(args.out / "model.onnx"))
    block = {"color": "rgb", "size": [32, 32], "resize": "stretch", "interpolation": "bilinear",
             "mean": [MEAN], "std": [STD]}  # fmt: skip
    (args.out / "preprocess.json").write_text(json.dumps(block, indent=2) + "\n")
    from PIL import Image

    pix, alpha = glyph()
    Image.fromarray(np.dstack([pix, pix, pix, (alpha * 255).astype(np.uint8)]), "RGBA").save(args.out / "x.png")
    (args.out / "trigger.txt").write_text(f"image:{args.out / 'x.png'}@{ROW},{COL}\n")
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
