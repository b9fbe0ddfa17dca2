"""Replayed streams for demos, tests and benchmarks: a dataset split with a poisoned share, as frame files.

Spec: ``replay:DATASET[?key=value&...]``, e.g. ``replay:fashion-mnist?n=1000&poison=0.1&trigger=checker4``.
Keys: ``split`` (stream, test, treat, eval; default stream), ``n`` (inputs, default the whole split),
``poison`` (share in [0, 1], default 0), ``trigger`` (the trainer's trigger grammar, needed when poison > 0),
``target`` (the attack's target class, never poisoned; default 0), ``seed`` (default 0), ``data_dir`` (where
the dataset lies).

:func:`write_frames` writes the frames as ``NAME.npy`` (uint8 (N, C, H, W), play order) for an agent's
``--source npy:PATH`` and the ground truth (labels, which inputs carry the trigger) as ``NAME.truth.json`` beside
it, for evaluation only: the agent plays ordinary files and never sees which were poisoned. This is trainer
code (the edge never imports the trainer's data and trigger modules).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np

from trainer.science.data import DataConfig, DatasetError, SplitConfig, load_splits
from trainer.science.triggers import TriggerError, parse_trigger, poison_fraction

SPLITS = ("stream", "test", "treat", "eval")
KEYS = ("split", "n", "poison", "trigger", "target", "seed", "data_dir")


class ReplayError(ValueError):
    """A replay spec that cannot be played; the message says what to change."""


@dataclass(frozen=True)
class ReplaySpec:
    """A parsed ``replay:`` spec."""

    dataset: str
    split: str = "stream"
    n: int | None = None
    poison: float = 0.0
    trigger: str | None = None
    target: int = 0
    seed: int = 0
    data_dir: Path | None = None


def parse_replay(spec: str) -> ReplaySpec:
    """``replay:DATASET?k=v&...`` (the ``replay:`` prefix optional) -> :class:`ReplaySpec`."""
    body = spec.removeprefix("replay:")
    dataset, _, query = body.partition("?")
    if not dataset:
        raise ReplayError(f"replay source {spec!r} names no dataset: use replay:fashion-mnist?n=1000&poison=0.1&...")
    params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    unknown = sorted(set(params) - set(KEYS))
    if unknown:
        raise ReplayError(f"unknown replay keys {unknown}; known: {', '.join(KEYS)}")
    try:
        out = ReplaySpec(
            dataset=dataset,
            split=params.get("split", "stream"),
            n=int(params["n"]) if "n" in params else None,
            poison=float(params.get("poison", 0.0)),
            trigger=params.get("trigger") or None,
            target=int(params.get("target", 0)),
            seed=int(params.get("seed", 0)),
            data_dir=Path(params["data_dir"]) if params.get("data_dir") else None,
        )
    except ValueError as e:
        raise ReplayError(f"replay source {spec!r}: {e}") from e
    if out.split not in SPLITS:
        raise ReplayError(f"replay split {out.split!r}; choose one of {', '.join(SPLITS)}")
    if not 0.0 <= out.poison <= 1.0:
        raise ReplayError(f"replay poison share {out.poison} must lie in [0, 1]")
    if out.poison > 0 and out.trigger is None:
        raise ReplayError("replay with poison > 0 needs trigger=SPEC (e.g. trigger=checker4)")
    if out.n is not None and out.n <= 0:
        raise ReplayError(f"replay n={out.n} must be positive")
    return out


class Replay:
    """The raw uint8 images of one replayed stream and which of them were poisoned."""

    def __init__(self, spec: ReplaySpec) -> None:
        self.spec = spec
        try:
            splits = load_splits(DataConfig(spec.dataset, spec.data_dir), SplitConfig())
            trigger = parse_trigger(spec.trigger) if spec.trigger else None
        except (DatasetError, TriggerError) as e:
            raise ReplayError(str(e)) from e
        part = getattr(splits, spec.split)
        rng = np.random.default_rng(spec.seed)
        n = min(spec.n or len(part), len(part))
        idx = rng.choice(len(part), n, replace=False)
        self.images, self.labels = part.images[idx], part.labels[idx]
        self.poisoned = np.zeros(n, dtype=bool)
        if trigger is not None and spec.poison > 0:
            self.images, self.poisoned = poison_fraction(
                self.images, self.labels, trigger, spec.poison, spec.target, rng
            )

    def write_truth(self, path: Path) -> None:
        """Ground truth for evaluation (labels and poisoned positions in play order); never read by the agent."""
        path.write_text(
            json.dumps(
                {
                    "evaluation_only": True,
                    "spec": {k: str(v) for k, v in self.spec.__dict__.items()},
                    "labels": self.labels.tolist(),
                    "poisoned": np.flatnonzero(self.poisoned).tolist(),
                }
            )
        )


def write_frames(spec: str | ReplaySpec, path: Path) -> tuple[Path, Path]:
    """Write a replayed stream to ``path`` (.npy, uint8 frames) and its truth beside it; returns both paths."""
    replay = Replay(parse_replay(spec) if isinstance(spec, str) else spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(replay.images))
    truth = path.with_suffix(".truth.json")
    replay.write_truth(truth)
    return path, truth
