"""t-SNE of penultimate features, clean against triggered inputs, before and after a defense (the paper's Fig. 10
analogue): the input of each model's last linear layer on 500 clean test inputs (coloured by true class) and 500
triggered ones (black crosses, true class other than the target), embedded with scikit-learn's t-SNE.

    python -m bench.bench_tsne --trigger SPEC --target T --model NAME=PATH.pt [--model NAME=PATH.pt ...] --out PNG

Default: each trigger of bench_field (seed 0) with its BadNet, θ_repair, clean fine-tuning, fine-pruning and Neural
Cleanse, where they exist.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import RESULTS
from trainer.science.data import DataConfig, SplitConfig, load_splits
from trainer.science.metrics import poisoned_copy
from trainer.science.models import Checkpoint
from trainer.science.training import to_input
from trainer.science.triggers import parse_trigger

N = 500


@torch.no_grad()
def penultimate(ckpt: Checkpoint, images: np.ndarray) -> np.ndarray:
    """The input of the model's last nn.Linear for ``images``."""
    model = ckpt.build()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    feats: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].flatten(1)))
    try:
        for start in range(0, len(images), 500):
            model(to_input(images[start : start + 500], torch.device("cpu")))
    finally:
        handle.remove()
    return torch.cat(feats).numpy()


def figure(trigger: str, target: int, models: list[tuple[str, Path]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    first = Checkpoint.load(models[0][1])
    splits = load_splits(DataConfig(), SplitConfig()).in_image_space(first.input_spec.preprocess)
    test = splits.test
    rng = np.random.default_rng(0)
    clean_idx = rng.choice(len(test), N, replace=False)
    poisoned = splits.to_image(poisoned_copy(splits.raw_part("test"), parse_trigger(trigger), 1234))
    attack_idx = rng.choice(np.flatnonzero(test.labels != target), N, replace=False)
    images = np.concatenate([test.images[clean_idx], poisoned[attack_idx]])
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2))
    for ax, (name, path) in zip(np.atleast_1d(axes), models, strict=True):
        feats = penultimate(Checkpoint.load(path), images)
        emb = TSNE(2, perplexity=30, init="pca", random_state=0).fit_transform(feats)
        ax.scatter(emb[:N, 0], emb[:N, 1], c=test.labels[clean_idx], cmap="tab10", s=5, alpha=0.7)
        ax.scatter(emb[N:, 0], emb[N:, 1], c="black", marker="x", s=8, linewidths=0.7, label="triggered")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    np.atleast_1d(axes)[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"penultimate features, {trigger.split('/')[-1]} (target {target}): clean by class, triggered ×",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trigger")
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.trigger:
        models = [(m.split("=", 1)[0], Path(m.split("=", 1)[1])) for m in args.model]
        figure(args.trigger, args.target, models, args.out or RESULTS / "tsne.png")
        return
    from bench.bench_field import WORK, trigger_pictures

    for name, spec in trigger_pictures(WORK / "triggers").items():
        w = WORK / name / "seed0"
        candidates = [("BadNet", w / "badnet" / "model.pt"), ("θ_repair", w / "repair" / "primary.pt"),
                      ("clean fine-tuning", w / "clean-ft" / "primary.pt"),
                      ("fine-pruning", w / "fine-pruning" / "model.pt"),
                      ("Neural Cleanse", w / "neural-cleanse" / "model.pt")]  # fmt: skip
        models = [(n, p) for n, p in candidates if p.is_file()]
        if len(models) > 1:
            figure(spec, 0, models, RESULTS / f"tsne-{name.replace(':', '-')}.png")


if __name__ == "__main__":
    main()
