"""Pre-deployment treatment (paper §4.2, Algorithm 1): fine-tune the suspect model on noise-augmented
clean data over a (α, γ) grid, pick θ_aug by the heuristic, and write the deployment bundle v1.

The heuristic reads only D_eval clean accuracy: :func:`pick` receives (α, γ, eval CA) triples and nothing
else, so test CA and ASR (measured when an evaluation trigger is given) cannot steer the choice.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from edge_agent.formats.bundle import sha256_file
from edge_agent.options import flag, fraction, out_folder, part, positive, positive_float, safe_name
from protos.nnoc.v1 import bundle_pb2
from trainer.errors import NoCandidateError
from trainer.science.data import DataParts, ImageSet, Splits
from trainer.science.export import export_onnx
from trainer.science.importers import PARITY_TOLERANCE, ModelImportError, onnxruntime_logits
from trainer.science.metrics import Evaluation, evaluate, poisoned_copy
from trainer.science.models import ARCHITECTURES, Checkpoint
from trainer.science.noise import PAPER_GAMMAS, NoiseConfig, augment
from trainer.science.training import PRECISIONS, Run, TrainConfig, default_device, pick_precision, predict, to_input
from trainer.science.triggers import EvalSpec, Trigger
from trainer.stages.detect import RejectConfig, served
from trainer.stages.executors import Executor, ExecutorConfig
from trainer.stages.publish import clean_images, publish_bundle, train_config_of, write_report
from trainer.stages.suspect import (
    ModelSource,
    check_clean_accuracy,
    check_finite,
    declared_classes,
    import_model,
)

log = logging.getLogger(__name__)

# how a round's candidates spend their epochs: ``grid`` trains each to the end (Algorithm 1 as written); ``halving``
# is successive halving (Jamieson & Talwalkar, AISTATS 2016; the rung of Hyperband, Li et al., JMLR 2018) on the
# heuristic's own key: all candidates train 1/η² of the epochs, the 1/η closest to the threshold from above go on to
# 1/η of them, and so on; the last one standing ends where the grid's candidate would (the run continues, it does
# not restart: the same weights as the grid's for that candidate)
STRATEGIES = ("halving", "grid")


def at_least_two(text: str) -> int:
    """argparse type: an integer ≥ 2."""
    value = int(text)
    if value < 2:
        raise ValueError(f"must be at least 2, got {value}")
    return value


@dataclass(frozen=True)
class PredeployConfig:
    """Algorithm 1's knobs. ``alpha0`` None: the BadNet's own learning rate (from its checkpoint)."""

    gammas: tuple[float, ...] = flag(PAPER_GAMMAS, "noise fractions Γ", type=fraction, nargs="+")
    alpha0: float | None = flag(None, "initial α (default: the model's training lr)", type=positive_float)
    # α grows in multiples of α0 while some candidate stays above the threshold (the paper's tables use
    # 1, 3, 6, 9 x α0); when a whole round falls below it, α shrinks by ``alpha_shrink`` instead.
    alpha_multipliers: tuple[float, ...] = (1.0, 3.0, 6.0, 9.0, 12.0)
    alpha_shrink: float = 3.0
    max_rounds: int = flag(4, "budget: rounds of α", type=positive)
    max_ca_drop: float = flag(0.05, "threshold = BadNet D_eval CA - this (paper 0.05)", type=float)
    epochs: int = flag(5, "fine-tuning epochs per candidate", type=positive)
    strategy: str = flag(
        "halving",
        "halving: each round's candidates grow by successive halving on D_eval CA; grid: all of them to the end",
        choices=STRATEGIES,
    )
    eta: int = flag(3, "halving: keep 1 in η candidates per rung", type=at_least_two)
    # the first rung's length at least this many epochs (0: 1/η² of them): a candidate's D_eval CA early in a
    # high-α run has dropped and not yet recovered, so a longer first look ranks it closer to where it ends
    first_rung_epochs: float = flag(0.0, "halving: the first rung trains at least this many epochs", type=float)
    precision: str = flag("auto", "arithmetic of the fine-tuning (auto: bf16 where it is faster here)",
                          choices=PRECISIONS)  # fmt: skip
    batch_size: int | None = flag(None, "fine-tuning batch size (default: the model's)", type=positive)
    optimizer: str | None = None  # None: the BadNet's optimizer
    noise: NoiseConfig = part(NoiseConfig, "noise (Algorithm 1's augmentation)")
    seed: int = flag(0, "seed of the noise and the fine-tuning", type=int)
    reject: RejectConfig = part(RejectConfig, "the bundle's reject rule (τ chosen on clean data, label-free)")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for reports."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class PredeploySpec(DataParts):
    """Everything one pre-deployment treatment reads, nested by part: the suspect model, the clean data,
    Algorithm 1's knobs (its noise and the bundle's reject rule among them), where candidates train and what is
    measured beside it. The CLI builds it from flags; ``--spec FILE`` reads its TOML form (a table per part)."""

    out: Path = flag(MISSING, "output folder", type=out_folder)
    fleet: str = flag("default", "fleet name written into the manifest", type=safe_name)
    model: ModelSource = part(ModelSource, "the suspect model")
    treat: PredeployConfig = part(PredeployConfig, "Algorithm 1")
    executor: ExecutorConfig = part(ExecutorConfig, "where the candidates train")
    eval: EvalSpec = part(EvalSpec, "evaluation only")


@dataclass(frozen=True)
class Candidate:
    """One fine-tuned model of the grid. ``test_*`` are evaluation-only and never read by :func:`pick`."""

    round: int
    alpha: float
    gamma: float
    eval_ca: float
    test_ca: float | None = None
    test_asr: float | None = None
    seconds: float = 0.0
    epochs: float = 0.0  # fine-tuning epochs it got: fewer than the recipe's where halving stopped it
    finished: bool = True  # False: stopped at a rung; its D_eval CA is that rung's and the pick passes it over


def pick(candidates: Sequence[tuple[float, float, float]], threshold: float) -> int | None:
    """The heuristic of §4.2 step 4 over (α, γ, D_eval CA) triples; returns an index or None.

    Search from the highest α down and, within an α, from the highest γ down; choose the candidate whose
    CA is closest to ``threshold`` without going below it (ties: the first in that order, i.e. the larger
    α and γ, which unlearn more).
    """
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i][0], -candidates[i][1]))
    best: int | None = None
    for i in order:
        ca = candidates[i][2]
        if ca >= threshold and (best is None or ca - threshold < candidates[best][2] - threshold):
            best = i
    return best


def pick_candidate(candidates: Sequence[Candidate], threshold: float) -> int | None:
    """:func:`pick` over the grid's finished candidates: only α, γ and the D_eval CA reach it (never ``test_*``)."""
    done = [i for i, c in enumerate(candidates) if c.finished]
    chosen = pick([(candidates[i].alpha, candidates[i].gamma, candidates[i].eval_ca) for i in done], threshold)
    return None if chosen is None else done[chosen]


def rungs(n: int, total_steps: int, eta: int) -> list[tuple[int, int]]:
    """Successive halving's rungs for ``n`` candidates of ``total_steps`` each: (train to step, then keep) pairs.
    The last rung is the full run with one candidate; each earlier rung has η times fewer steps and keeps η times
    fewer candidates (rounded up), e.g. 6 candidates, η = 3: 1/9 of the steps for 6, keep 2; 1/3 for 2, keep 1;
    all for 1. Each rung trains at least one step more than the one before."""
    if n <= 1 or total_steps <= 1:
        return [(total_steps, n)]
    levels = 1
    while eta**levels < n:
        levels += 1
    out: list[tuple[int, int]] = []
    alive = n
    for k in range(levels, -1, -1):
        until = max(math.ceil(total_steps / eta**k), (out[-1][0] + 1) if out else 1)
        keep = max(math.ceil(alive / eta), 1) if k else alive
        out.append((min(until, total_steps), keep))
        alive = keep
    return out


def floored(ladder: list[tuple[int, int]], floor: int) -> list[tuple[int, int]]:
    """``ladder`` (:func:`rungs`) with no rung short of the full run shorter than ``floor`` steps; a rung that the
    floor makes as long as the one before merges into it (the earlier rung's survivors go on)."""
    total = ladder[-1][0]
    out: list[tuple[int, int]] = []
    for until, keep in ladder:
        until = until if until >= total else min(max(until, floor), total)
        if out and until <= out[-1][0]:
            continue
        out.append((until, keep))
    return out


def halving_key(eval_ca: float, threshold: float) -> tuple[bool, float]:
    """Who goes on at a rung: the candidates above the threshold first, closest to it first (the pick's own
    order), then those below, closest first. Reads the D_eval CA only."""
    return eval_ca < threshold, abs(eval_ca - threshold)


def alpha_schedule(alpha0: float, cfg: PredeployConfig) -> Callable[[int, bool], float | None]:
    """The α rule of Algorithm 1 lines 17-23, as ``next(round, any_above) -> α or None (stop)``.

    Grow through ``alpha_multipliers`` while a round keeps a candidate above the threshold; if the very
    first rounds fall below, shrink by ``alpha_shrink`` until one is above; stop once growth has pushed a
    whole round below the threshold (higher α only unlearns more) or the budget is spent.
    """
    state = {"grow": 0, "shrink": 0, "grew_ok": False}

    def next_alpha(round_index: int, any_above: bool) -> float | None:
        if round_index + 1 >= cfg.max_rounds:
            return None
        if any_above:
            state["grew_ok"] = True
            state["grow"] += 1
            if state["shrink"]:  # found a working α by shrinking: grow from there
                base = alpha0 / cfg.alpha_shrink ** state["shrink"]
                return base * (1.0 + state["grow"])
            if state["grow"] < len(cfg.alpha_multipliers):
                return alpha0 * cfg.alpha_multipliers[state["grow"]]
            return alpha0 * (cfg.alpha_multipliers[-1] + 3.0 * (state["grow"] - len(cfg.alpha_multipliers) + 1))
        if state["grew_ok"]:
            return None
        state["shrink"] += 1
        return alpha0 / cfg.alpha_shrink ** state["shrink"]

    return next_alpha


@dataclass
class PredeployResult:
    """What :func:`run_predeploy` produced."""

    candidates: list[Candidate]
    threshold: float
    baseline_eval_ca: float
    selected: int | None
    report: dict[str, Any] = field(default_factory=dict)


def write_candidates_csv(path: Path, candidates: Sequence[Candidate], selected: int | None) -> None:
    """``candidates.csv``: round, α, γ, eval CA (and test CA/ASR when measured), selected flag."""
    with_test = any(c.test_ca is not None for c in candidates)
    cols = (
        ["round", "alpha", "gamma", "eval_ca"]
        + (["test_ca", "test_asr"] if with_test else [])
        + ["seconds", "epochs", "finished", "selected"]
    )
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(cols)
        for i, c in enumerate(candidates):
            row: list[Any] = [c.round, f"{c.alpha:.6g}", f"{c.gamma:.2f}", f"{c.eval_ca:.4f}"]
            if with_test:
                row += [
                    f"{c.test_ca:.4f}" if c.test_ca is not None else "",
                    f"{c.test_asr:.4f}" if c.test_asr is not None else "",
                ]
            row += [f"{c.seconds:.1f}", f"{c.epochs:.3g}", int(c.finished), int(i == selected)]
            writer.writerow(row)


def plot_heatmap(path: Path, candidates: Sequence[Candidate], threshold: float, selected: int | None) -> None:
    """Heat maps of D_eval CA (and test ASR when measured) over α (rows) and γ (columns); a candidate halving
    stopped shows its last rung's CA, marked *."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({c.alpha for c in candidates})
    gammas = sorted({c.gamma for c in candidates})
    panels: list[tuple[str, Callable[[Candidate], float | None], str]] = [
        ("D_eval clean accuracy", lambda c: c.eval_ca, "viridis")
    ]
    if any(c.test_asr is not None for c in candidates):
        panels.append(("test ASR (evaluation only)", lambda c: c.test_asr, "magma_r"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 0.6 * len(alphas) + 2.2), squeeze=False)
    for ax, (title, value, cmap) in zip(axes[0], panels, strict=True):
        grid = np.full((len(alphas), len(gammas)), np.nan)
        stopped = {(alphas.index(c.alpha), gammas.index(c.gamma)) for c in candidates if not c.finished}
        for c in candidates:
            v = value(c)
            if v is not None:
                grid[alphas.index(c.alpha), gammas.index(c.gamma)] = v
        lo, hi = (0.0, 1.0) if cmap != "viridis" else (float(np.nanmin(grid)) - 0.01, float(np.nanmax(grid)) + 0.01)
        im = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=lo, vmax=hi)
        for (r, k), v in np.ndenumerate(grid):
            if not math.isnan(v):
                ax.text(
                    k,
                    r,
                    f"{v:.3f}" + ("*" if (r, k) in stopped else ""),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if ((v - lo) / (hi - lo) < 0.5) == (cmap == "viridis") else "black",
                )
        if selected is not None:
            s = candidates[selected]
            ax.add_patch(
                plt.Rectangle(
                    (gammas.index(s.gamma) - 0.5, alphas.index(s.alpha) - 0.5),
                    1,
                    1,
                    fill=False,
                    edgecolor="red",
                    linewidth=2.5,
                )
            )
        ax.set_xticks(range(len(gammas)), [f"{g:.1f}" for g in gammas])
        ax.set_yticks(range(len(alphas)), [f"{a:.3g}" for a in alphas])
        ax.set_xlabel("noise fraction γ")
        ax.set_ylabel("learning rate α")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    note = "; *: stopped early by halving" if any(not c.finished for c in candidates) else ""
    fig.suptitle(f"Pre-deployment candidates (threshold {threshold:.3f}; red: heuristic pick{note})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class _Baseline:
    """The suspect model measured once: D_eval CA and the threshold, and (evaluation only) its test CA/ASR."""

    eval_ca: float
    threshold: float
    test_ref: np.ndarray  # θ_bd's test labels: they fix the ASR's eligible set
    poisoned: np.ndarray | None  # the triggered test set (evaluation only)
    test: Evaluation | None


def load_suspect(source: ModelSource, splits: Splits) -> tuple[Checkpoint, Splits]:
    """The suspect model through its door (checked: operators, parity, gradients, classes) and the data as its
    images (colour and size per its preprocessing)."""
    order = (
        declared_classes(source, str(source.path)) if source.arch is not None or source.path.suffix != ".pt" else None
    )
    if order is not None:
        relabelled = splits.relabelled(order)  # folders matched to the model's classes by name
        if relabelled is not splits:
            log.info("data classes matched to the model's order by name: %s", ", ".join(order))
        splits = relabelled
    suspect = import_model(source, splits.image_shape, splits.class_names, splits.valid.images)
    if order is not None:
        suspect.class_names = order
    images = splits.in_image_space(suspect.input_spec.preprocess)
    if tuple(suspect.input_spec.image_shape) != images.image_shape:
        raise ValueError(
            f"{source.path}: model expects images {suspect.input_spec.image_shape}, the data gives "
            f"{images.image_shape}; pass a --preprocess block with the model's colour and size"
        )
    if len(suspect.class_names) != len(splits.class_names):
        raise ValueError(f"{source.path}: model has {len(suspect.class_names)} classes, data {len(splits.class_names)}")
    if suspect.architecture not in ARCHITECTURES:
        check_exportable(suspect, str(source.path))
    k = len(images.class_names)
    floor = 2.0 / k if source.min_clean_accuracy is None else source.min_clean_accuracy
    predicted = predict(suspect.build(), images.valid.images)
    check_clean_accuracy(predicted, images.valid.labels, images.class_names, floor, str(source.path))
    return suspect, images


def check_exportable(suspect: Checkpoint, where: str) -> None:
    """The converted model exports to ONNX again, as bundle v1 and every repair will: a door check, before the grid
    (an operator the exporter cannot take would otherwise fail after the whole treatment)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_onnx(suspect.network(), suspect.input_spec, suspect.class_names, Path(tmp) / "probe.onnx")
        except Exception as e:  # torch.onnx and the checker raise many types for a graph they cannot take
            cause = e.__cause__ or e  # torch.onnx wraps the exporter's own error in a banner
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip().splitlines()
            raise ModelImportError(
                f"{where}: the converted model cannot be exported to ONNX again ({type(cause).__name__}: "
                f"{text[0][:300] if text else ''}); export it with torch.export (.pt2) or give --arch NAME "
                "--weights FILE"
            ) from None


def check_primary(bundle_dir: Path, suspect: Checkpoint, source: ModelSource, images: np.ndarray) -> float:
    """Bundle v1's ``primary.onnx`` against the user's own model on ``images``: the BadNet goes out unchanged
    (max |Δlogit| within the import tolerance, else :class:`ModelImportError`). Returns the difference."""
    from trainer.science.classifiers import OnnxClassifier

    # On the CPU, like both references: the check is about the export, not about a GPU's arithmetic (on an H100 the
    # CUDA provider alone moved these logits by up to 0.003).
    shipped = OnnxClassifier(bundle_dir / "primary.onnx", providers=["CPUExecutionProvider"])
    if source.arch is None and source.path.suffix == ".onnx":
        original = onnxruntime_logits(suspect.source)  # the file as imported: self-contained, no path read again

        def reference(x: np.ndarray) -> np.ndarray:
            return original(suspect.input_spec.preprocess.model_input(x))

    else:
        net = suspect.build()

        @torch.no_grad()
        def reference(x: np.ndarray) -> np.ndarray:
            return np.concatenate(
                [net(to_input(x[i : i + 512], torch.device("cpu"))).numpy() for i in range(0, len(x), 512)]
            )

    got, want = shipped.logits(images), reference(images)
    check_finite(want, str(source.path), "the model")
    check_finite(got, "bundle v1's primary.onnx", "the export")
    diff = float(np.abs(got - want).max())
    if not diff <= PARITY_TOLERANCE:
        raise ModelImportError(
            f"bundle v1's primary.onnx differs from {source.path} by up to {diff:.3g} in the logits on the test "
            f"split (tolerance {PARITY_TOLERANCE}): the export changed the model"
        )
    return diff


def measure_baseline(
    bd: Callable[[np.ndarray], np.ndarray],
    splits: Splits,
    cfg: PredeployConfig,
    eval_trigger: Trigger | None,
    target: int | None,
) -> _Baseline:
    """θ_bd on D_eval (the heuristic's threshold) and, for evaluation only, on the test set."""
    eval_ca = evaluate(bd, splits.eval).clean_accuracy
    test_ref = bd(splits.test.images) if eval_trigger is not None else np.empty(0, np.int64)
    poisoned = (
        splits.to_image(poisoned_copy(splits.raw_part("test"), eval_trigger, cfg.seed + 7))
        if eval_trigger is not None
        else None
    )
    test = (
        evaluate(bd, splits.test, eval_trigger, target, test_ref, poisoned=poisoned)
        if eval_trigger is not None
        else None
    )
    return _Baseline(eval_ca, eval_ca - cfg.max_ca_drop, test_ref, poisoned, test)


def grow_candidate(
    run: Run,
    until: int,
    label: str,
    eval_split: ImageSet,
    test_split: ImageSet,
    eval_trigger: Trigger | None,
    target: int | None,
    base: _Baseline,
    quiet: bool,
) -> tuple[Run, float, float | None, float | None, float]:
    """Train one candidate of the grid on to step ``until`` and measure it: D_eval CA and, once it has finished and
    only with ``eval_trigger`` (evaluation only), test CA and ASR. Returns the run (to go on with), those and the
    seconds it took. Runs here or as a Ray task (the run travels through Ray's object store)."""
    t0 = time.monotonic()
    device = default_device()
    model = run.advance(until, device, label, quiet)

    def classify(x: np.ndarray) -> np.ndarray:
        return predict(model, x, device=device)

    eval_ca = evaluate(classify, eval_split).clean_accuracy
    test_ca = test_asr = None
    if eval_trigger is not None and run.finished:
        ev = evaluate(classify, test_split, eval_trigger, target, base.test_ref, poisoned=base.poisoned)
        test_ca, test_asr = ev.clean_accuracy, ev.attack_success_rate
    model.cpu()  # a Ray task hands the run back through the object store
    return run, eval_ca, test_ca, test_asr, time.monotonic() - t0


def grid_progress(done: float, at_most: float, elapsed: float) -> str:
    """The grid's progress for a log line: candidates done, how many remain at most (the α schedule may stop
    sooner) and about how long they take at the mean time per candidate so far. Counts are full candidates'
    worth of training (a candidate halving stopped at a third of its epochs counts a third)."""
    left = max(at_most - done, 0)
    if done == 0:
        return f"0 of at most {at_most:.3g} candidates done"
    seconds = elapsed / done * left
    about = (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )
    return f"{done:.3g} done, at most {left:.3g} left" + (f" (about {about})" if left else "")


@dataclass
class _Round:
    """One α round's candidates while they grow: their runs, seconds so far and last measurement (D_eval CA, and
    test CA/ASR once finished)."""

    alpha: float
    runs: dict[float, Run]
    seconds: dict[float, float]
    measured: dict[float, tuple[float, float | None, float | None]] = field(default_factory=dict)

    def eval_ca(self, gamma: float) -> float:
        return self.measured[gamma][0]


def second_chance(last: dict[float, tuple[float, bool]], threshold: float) -> float | None:
    """The stopped candidate to finish next, from each γ's (last D_eval CA, finished): None while a finished one
    stands at or above ``threshold``, else the stopped one above it that :func:`halving_key` ranks first (None if
    there is none)."""
    if any(done and ca >= threshold for ca, done in last.values()):
        return None
    waiting = [g for g, (ca, done) in last.items() if not done and ca >= threshold]
    return min(waiting, key=lambda g: halving_key(last[g][0], threshold)) if waiting else None


class _Grid:
    """What every rung of every round shares: the data, the baseline, the executor and the progress."""

    def __init__(
        self,
        splits: Splits,
        base: _Baseline,
        eval_trigger: Trigger | None,
        target: int | None,
        quiet: bool,
        executor: Executor,
        steps: int,
        at_most: float,
    ) -> None:
        self.splits, self.base, self.eval_trigger, self.target = splits, base, eval_trigger, target
        self.quiet, self.executor, self.steps, self.at_most = quiet, executor, steps, at_most
        self.bar = tqdm(desc="predeploy", total=round(at_most, 2), disable=quiet, unit="cand")
        self.started = time.monotonic()
        self.spent = 0.0  # full candidates' worth of training so far

    def grow(self, rnd: _Round, names: Sequence[float], until: int) -> None:
        """Train ``names`` of ``rnd`` on to step ``until`` (in parallel where the executor is Ray) and measure them."""
        quiet = self.quiet or self.executor.cfg.executor != "serial"
        calls = [
            (rnd.runs[g], until, f"α={rnd.alpha:.3g} γ={g:.1f}", self.splits.eval, self.splits.test, self.eval_trigger,
             self.target, self.base, quiet)
            for g in names
        ]  # fmt: skip
        before = {g: rnd.runs[g].step for g in names}
        for g, (run, eval_ca, test_ca, test_asr, secs) in zip(
            names, self.executor.map(grow_candidate, calls), strict=True
        ):
            rnd.runs[g], rnd.seconds[g] = run, rnd.seconds[g] + secs
            rnd.measured[g] = (eval_ca, test_ca, test_asr)
            share = (run.step - before[g]) / self.steps
            self.spent += share
            self.bar.update(round(share, 2))
            self.bar.set_postfix(alpha=f"{rnd.alpha:.3g}", gamma=g, ca=f"{eval_ca:.3f}")
            shown = "" if test_asr is None or test_ca is None else f", test CA {test_ca:.4f} ASR {test_asr:.4f}"
            log.info("candidate α=%.3g γ=%.1f, %.2g epochs: D_eval CA %.4f%s", rnd.alpha, g, run.epochs_done, eval_ca,
                     shown)  # fmt: skip
        log.info("%s", grid_progress(self.spent, self.at_most, time.monotonic() - self.started))

    def key(self, rnd: _Round) -> Callable[[float], tuple[bool, float]]:
        return lambda g: halving_key(rnd.eval_ca(g), self.base.threshold)

    def run_round(self, rnd: _Round, ladder: Sequence[tuple[int, int]]) -> None:
        """Grow ``rnd`` up ``ladder``: after each rung short of the end only the best ``keep`` go on. If the one
        that ended fell below the threshold while one stopped earlier stood above it, that one goes on to the end as
        well (the closest first): a round the grid would pick from keeps a pickable candidate."""
        alive = list(rnd.runs)
        for until, keep in ladder:
            self.grow(rnd, alive, until)
            if until < self.steps:
                alive = sorted(alive, key=self.key(rnd))[:keep]
        while (g := second_chance({g: (rnd.eval_ca(g), r.finished) for g, r in rnd.runs.items()},
                                  self.base.threshold)) is not None:  # fmt: skip
            self.grow(rnd, [g], self.steps)


def search(
    suspect: Checkpoint,
    splits: Splits,
    cfg: PredeployConfig,
    base: _Baseline,
    ft_base: TrainConfig,
    alpha0: float,
    eval_trigger: Trigger | None,
    target: int | None,
    quiet: bool,
    executor: Executor | None = None,
) -> tuple[list[Candidate], list[Checkpoint | None], int]:
    """Algorithm 1's grid: every γ (highest first) per round of α while the schedule goes on. ``cfg.strategy``
    ``grid`` trains every candidate to the end; ``halving`` grows them rung by rung (:func:`rungs`) and stops the
    ones :func:`halving_key` ranks last, so the round's full epochs go to the candidate the pick can land on. A
    round's candidates at a rung are independent: ``executor`` may train them in parallel. Returns every candidate
    (stopped ones too), the finished ones' models (None for a stopped one) and the rounds run."""
    executor = executor or Executor(ExecutorConfig())
    treat_sets = {
        g: augment(splits.treat, g, np.random.default_rng([cfg.seed, round(g * 1000)]), cfg.noise) for g in cfg.gammas
    }
    gammas = sorted(cfg.gammas, reverse=True)
    steps = cfg.epochs * math.ceil(len(treat_sets[gammas[0]]) / ft_base.batch_size)  # a candidate's whole run
    ladder = rungs(len(gammas), steps, cfg.eta) if cfg.strategy == "halving" else [(steps, len(gammas))]
    if cfg.first_rung_epochs > 0:
        ladder = floored(ladder, math.ceil(cfg.first_rung_epochs * steps / cfg.epochs))
    alive = [len(gammas)] + [keep for _, keep in ladder[:-1]]
    reached = [0] + [until for until, _ in ladder[:-1]]
    per_round = sum(n * (until - r) for n, (until, _), r in zip(alive, ladder, reached, strict=True)) / steps
    grid = _Grid(splits, base, eval_trigger, target, quiet, executor, steps, cfg.max_rounds * per_round)
    log.info("grid (%s): at most %d rounds of α x %d γ, each %s", cfg.strategy, cfg.max_rounds, len(gammas),
             "; ".join(f"{n} to {until / steps:.2g} of the epochs" for n, (until, _) in zip(alive, ladder,
                                                                                            strict=True)))  # fmt: skip
    candidates: list[Candidate] = []
    models: list[Checkpoint | None] = []
    next_alpha = alpha_schedule(alpha0, cfg)
    alpha: float | None = alpha0
    round_index = 0
    while alpha is not None:
        ft = replace(ft_base, lr=alpha)
        runs = {g: Run(suspect.build(), treat_sets[g].images, treat_sets[g].labels, ft, cfg.seed) for g in gammas}
        rnd = _Round(alpha, runs, dict.fromkeys(gammas, 0.0))
        grid.run_round(rnd, ladder)
        for g, run in runs.items():
            eval_ca, test_ca, test_asr = rnd.measured[g]
            candidates.append(Candidate(round_index, alpha, g, eval_ca, test_ca, test_asr, rnd.seconds[g],
                                        run.epochs_done, run.finished))  # fmt: skip
            models.append(suspect.derive(run.model, run.cfg.to_dict(), {}) if run.finished else None)
        alpha = next_alpha(round_index, any(rnd.eval_ca(g) >= base.threshold for g in gammas))
        round_index += 1
    grid.bar.close()
    return candidates, models, round_index


def publish_v1(
    source: ModelSource,
    suspect: Checkpoint,
    aug: Checkpoint,
    chosen: Candidate,
    base: _Baseline,
    cfg: PredeployConfig,
    fleet: str,
    out_dir: Path,
    clean: dict[str, np.ndarray],
) -> bundle_pb2.Manifest:
    """θ_aug's checkpoint beside θ_bd's (repair fine-tunes them) and bundle v1 (θ_bd primary, θ_aug monitor), its
    reject rule's threshold chosen on ``clean`` (D_eval and D_treat, the model's images)."""
    aug.meta = {
        "role": "monitor",
        "parent_sha256": sha256_file(source.path),
        "alpha": chosen.alpha,
        "gamma": chosen.gamma,
        "eval_clean_accuracy": chosen.eval_ca,
        "noise": asdict(cfg.noise),
        **{k: v for k, v in suspect.meta.items() if k in ("dataset", "split")},
    }
    aug.save(out_dir / "monitor.pt")
    suspect.save(out_dir / "primary.pt")
    manifest = bundle_pb2.Manifest(
        fleet=fleet,
        version=1,
        parent_version=0,
        input_spec=suspect.input_spec.message(),
        class_names=list(suspect.class_names),
        created_by="nnoc-trainer predeploy",
    )
    manifest.provenance.update(
        {
            "suspect_sha256": sha256_file(source.path),
            "suspect_door": suspect.architecture,
            "alpha": f"{chosen.alpha:.6g}",
            "gamma": f"{chosen.gamma:.2f}",
            "noise_mode": cfg.noise.mode,
            "ca_threshold": f"{base.threshold:.4f}",
            "primary_checkpoint_sha256": sha256_file(out_dir / "primary.pt"),
            "monitor_checkpoint_sha256": sha256_file(out_dir / "monitor.pt"),
        }
    )
    metrics = {
        "primary": {
            "eval_clean_accuracy": base.eval_ca,
            "test_clean_accuracy": base.test.clean_accuracy if base.test else None,
            "attack_success_rate": base.test.attack_success_rate if base.test else None,
        },
        "monitor": {
            "eval_clean_accuracy": chosen.eval_ca,
            "test_clean_accuracy": chosen.test_ca,
            "attack_success_rate": chosen.test_asr,
            "ca_threshold": base.threshold,
        },
    }
    return publish_bundle(
        out_dir, {"primary": suspect, "monitor": aug}, manifest, metrics, calibration=(clean, cfg.reject)
    )


def run_predeploy(spec: PredeploySpec, splits: Splits, quiet: bool = False) -> PredeployResult:
    """Algorithm 1: load -> baseline -> search the (α, γ) grid -> pick -> publish v1; writes candidates.csv,
    heatmap.png, monitor.pt, primary.pt, bundle/ and report.json in ``spec.out``. ``splits``: the clean data
    ``spec`` names, loaded.

    Raises :class:`NoCandidateError` (after writing the table) when no candidate meets the threshold.
    """
    source, cfg, out_dir, fleet = spec.model, spec.treat, spec.out, spec.fleet
    eval_trigger, target = spec.eval.parsed(), spec.eval.target
    suspect, splits = load_suspect(source, splits)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = default_device()
    bd_model = suspect.build()
    base = measure_baseline(lambda x: predict(bd_model, x, device=device), splits, cfg, eval_trigger, target)
    base_train = train_config_of(suspect)
    alpha0 = cfg.alpha0 if cfg.alpha0 is not None else base_train.lr
    ft_base = replace(
        base_train,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size or base_train.batch_size,
        optimizer=cfg.optimizer or base_train.optimizer,
        precision=cfg.precision,
    )
    precision = pick_precision(suspect.build(), splits.treat.images, splits.treat.labels, ft_base, device)
    ft_base = replace(ft_base, precision=precision)  # resolved once: every candidate trains alike
    log.info("BadNet D_eval CA %.4f -> threshold %.4f; α0 %.3g (%s, %s)", base.eval_ca, base.threshold, alpha0,
             ft_base.optimizer, precision)  # fmt: skip
    start = time.monotonic()
    executor = Executor(spec.executor)
    try:
        candidates, models, rounds = search(
            suspect, splits, cfg, base, ft_base, alpha0, eval_trigger, target, quiet, executor
        )
    finally:
        executor.close()
    selected = pick_candidate(candidates, base.threshold)
    write_candidates_csv(out_dir / "candidates.csv", candidates, selected)
    plot_heatmap(out_dir / "heatmap.png", candidates, base.threshold, selected)
    tested = {}
    if base.test is not None:
        tested = {"clean_accuracy": base.test.clean_accuracy, "attack_success_rate": base.test.attack_success_rate}
    report: dict[str, Any] = {
        "suspect": str(source.path),
        "threshold": base.threshold,
        "baseline": {"eval_clean_accuracy": base.eval_ca, **tested},
        "alpha0": alpha0,
        "config": cfg.to_dict(),
        "precision": precision,
        "candidates": [asdict(c) for c in candidates],
        "seconds": round(time.monotonic() - start, 1),
        "candidates_csv": str(out_dir / "candidates.csv"),
        "heatmap": str(out_dir / "heatmap.png"),
    }
    if selected is None:
        report["selected"] = None
        report["error"] = (
            f"no candidate reached the D_eval clean-accuracy threshold {base.threshold:.4f} within "
            f"{rounds} rounds; raise --max-ca-drop, add rounds or lower --alpha0"
        )
        write_report(out_dir, report)
        raise NoCandidateError(report["error"])
    aug = models[selected]
    assert aug is not None  # the pick takes finished candidates only
    written = publish_v1(source, suspect, aug, candidates[selected], base, cfg, fleet, out_dir, clean_images(splits))
    report["reject_rule"] = MessageToDict(written.reject_rule, preserving_proto_field_name=True)
    scored = splits.scored  # the harness' test split, or your D_eval
    report["served_test" if len(splits.test) else "served_eval"] = served(out_dir / "bundle", scored.images,
                                                                         scored.labels)  # fmt: skip
    report["primary_parity"] = check_primary(out_dir / "bundle", suspect, source, scored.images)
    report["selected"] = {**asdict(candidates[selected]), "index": selected}
    report["monitor"] = str(out_dir / "monitor.pt")
    report["bundle"] = str(out_dir / "bundle")
    report["bundle_version"] = written.version
    write_report(out_dir, report)
    return PredeployResult(candidates, base.threshold, base.eval_ca, selected, report)
