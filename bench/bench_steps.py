"""What one training step costs per architecture and arithmetic: fp32, channels-last, bf16 autocast, both, and
torch.compile, side by side in one process (the fine-tuning step of Algorithm 1 and the repair: Adam, batch 128).

Architectures: the project's cnn3 and cnn6 (1x28x28) and the foreign bench's small residual net and torchvision's
resnet18 (3x32x32). Each variant: 3 warm-up steps, then the median of 5 timings of 4 steps.

    python -m bench.bench_steps
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from bench.common import save
from bench.outsider_badnet import ResNetSmall
from trainer.science.models import build_model

VARIANTS = ("fp32", "channels-last", "bf16", "channels-last + bf16", "compile")
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "cnn3": (lambda: build_model("cnn3", (1, 28, 28), 10), (1, 28, 28)),
    "cnn6": (lambda: build_model("cnn6", (1, 28, 28), 10), (1, 28, 28)),
    "resnet-small": (ResNetSmall, (3, 32, 32)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
}


def ms_per_step(make: Callable[[], nn.Module], shape: tuple[int, int, int], variant: str, batch: int = 128) -> float:
    torch.manual_seed(0)
    model = make().train()
    last = "channels-last" in variant
    x = torch.rand(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    if last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    net: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model) if variant == "compile" else model

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in variant):
            loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(4):
            step()
        times.append((time.perf_counter() - t0) / 4 * 1000)
    return statistics.median(times)


def main() -> None:
    rows = []
    for name, (make, shape) in MODELS.items():
        row: dict[str, object] = {"model": name, "input": "x".join(map(str, shape))}
        for variant in VARIANTS:
            row[variant] = round(ms_per_step(make, shape, variant), 1)
        print(row, flush=True)
        rows.append(row)
    save("steps", {"threads": torch.get_num_threads(), "batch": 128, "variants": list(VARIANTS), "rows": rows})


if __name__ == "__main__":
    main()
