"""Candidate reject scores side by side (issue 14): which function of the two models' logits separates triggered
inputs from clean ones at a fixed clean-reject budget, on every bundle the benches made.

For each case (a v1 bundle, its trigger and target) the two ONNX models score the clean test inputs, their triggered
copies and the defender's clean D_treat ∪ D_eval. A score's threshold is chosen as publishing chooses it (label-free,
1% budget, 0.9-confidence bound, :func:`trainer.stages.detect.rule_from_scores`); the rows give AUROC and recall at
that threshold over the attacks (triggered inputs the primary sends to the target, of clean inputs it got right).
The shipped scores come from :func:`edge_agent.formats.reject.reject_scores`; the others are defined here only to be
compared (evaluation: the trigger is read here, never by a rule).

    python -m bench.bench_scores
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.bench_field import WORK, trigger_pictures
from bench.common import RESULTS, ROOT, save

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _log_softmax(x: np.ndarray, temp: float = 1.0) -> np.ndarray:
    z = x.astype(np.float64) / temp
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _kl(temp: float) -> Scorer:
    def score(p: np.ndarray, m: np.ndarray) -> np.ndarray:
        lp, lm = _log_softmax(p, temp), _log_softmax(m, temp)
        return (np.exp(lp) * (lp - lm)).sum(1)

    return score


def _at_label(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, p.argmax(1)[:, None], 1)[:, 0]


def _margin(x: np.ndarray) -> np.ndarray:
    top = np.sort(x, 1)
    return top[:, -1] - top[:, -2]


def candidates() -> dict[str, Scorer]:
    from edge_agent.formats.reject import reject_scores

    def js(p: np.ndarray, m: np.ndarray) -> np.ndarray:
        lp, lm = _log_softmax(p), _log_softmax(m)
        la = np.log(0.5 * (np.exp(lp) + np.exp(lm)))
        return 0.5 * (np.exp(lp) * (lp - la)).sum(1) + 0.5 * (np.exp(lm) * (lm - la)).sum(1)

    def margin_gap(p: np.ndarray, m: np.ndarray) -> np.ndarray:
        # the primary's top-2 margin against the monitor's margin of the primary's label over its best other label
        y = p.argmax(1)
        other = np.where(m.argmax(1) == y, np.sort(m, 1)[:, -2], m.max(1))
        return _margin(p) - (_at_label(m, p) - other)

    def gap_plus_margin(p: np.ndarray, m: np.ndarray) -> np.ndarray:
        # logit_gap plus how far the monitor prefers its own label over the primary's (0 where they agree): an
        # adaptive BadNet that keeps its target logit in the clean range still meets a monitor sure of another label
        return reject_scores(p, m, "logit_gap") + (m.max(1) - _at_label(m, p))

    return {
        "logit_gap": lambda p, m: reject_scores(p, m, "logit_gap"),
        "logit_gap + monitor margin": gap_plus_margin,
        "kl": lambda p, m: reject_scores(p, m, "kl"),
        "doubt": lambda p, m: reject_scores(p, m, "doubt"),
        "raw logit difference": lambda p, m: _at_label(p - m, p),
        "kl T=2": _kl(2.0),
        "kl T=4": _kl(4.0),
        "reverse kl": lambda p, m: _kl(1.0)(m, p),
        "js": js,
        "margin gap": margin_gap,
        "primary max logit (one model)": lambda p, m: p.max(1),
        "primary margin (one model)": lambda p, m: _margin(p),
    }


def cases() -> list[tuple[str, Path, str, int]]:
    specs = trigger_pictures(WORK / "triggers")
    out = [(f"field {t} seed 0", WORK / t / "seed0" / "predeploy" / "bundle", specs[t], 0) for t in specs]
    foreign = ROOT / "runs" / "bench-foreign"
    for arch in ("resnet18", "resnet-small"):
        if (foreign / arch / "trigger.txt").is_file():
            out.append((f"foreign {arch}", foreign / arch / "predeploy" / "bundle",
                        (foreign / arch / "trigger.txt").read_text().strip(), 7))  # fmt: skip
    out.append(("weak θ_aug checker4 (ASR 0.78)", WORK / "checker4" / "seed0" / "weak-0.8" / "predeploy" / "bundle",
                "checker4", 0))  # fmt: skip
    adaptive = WORK / "checker4+adaptive0.3" / "seed0" / "predeploy" / "bundle"
    out.append(("adaptive attacker: checker4, smoothing 0.3", adaptive, "checker4", 0))
    rounds = ROOT / "runs" / "bench-rounds"
    out.append(("two backdoors: blend → 4", rounds / "blend-seed0" / "predeploy" / "bundle",
                f"blend:{rounds / 'triggers' / 'noise.png'}:0.15", 4))  # fmt: skip
    return [c for c in out if (c[1] / "manifest.pb").is_file()]


def measure(bundle: Path, spec: str, target: int) -> dict[str, dict[str, float]]:
    from edge_agent.formats.bundle import read_manifest
    from edge_agent.formats.reject import reject_scores
    from edge_agent.formats.spec import image_shape_of, preprocess_of
    from trainer.science.data import DataConfig, SplitConfig, load_splits
    from trainer.science.triggers import parse_trigger
    from trainer.stages.detect import RejectConfig, auroc, clean_scores, pair_logits, rule_from_scores

    manifest = read_manifest(bundle)
    pre = preprocess_of(manifest.input_spec)
    splits = load_splits(DataConfig(), SplitConfig(test=5000), pre)
    fitted = pre.fitted(image_shape_of(manifest.input_spec))
    test = splits.test
    triggered = parse_trigger(spec).apply(test.images, np.random.default_rng(0))

    def logits(images: np.ndarray) -> tuple[np.ndarray, ...]:
        return pair_logits(bundle / "primary.onnx", bundle / "monitor.onnx", fitted.image(images), pre)

    clean, trig = logits(test.images), logits(triggered)
    calib = {"eval": logits(splits.eval.images), "treat": logits(splits.treat.images)}
    attacks = (test.labels != target) & (clean[0].argmax(1) == test.labels) & (trig[0].argmax(1) == target)
    rows = {}
    scorers = candidates()
    # the shipped combined score, its scales fitted on the defender's clean sets as publishing fits them
    scales = clean_scores("gap_or_kl", calib, 0.01)[1]
    scorers["gap_or_kl"] = lambda p, m: reject_scores(p, m, "gap_or_kl", scales)
    for name, fn in scorers.items():
        neg, pos = fn(*clean), fn(*trig)[attacks]
        # "kl" as the rule's score only names the threshold's bookkeeping: τ is chosen from these scores
        rule = rule_from_scores({k: fn(*v) for k, v in calib.items()}, replace(RejectConfig(), reject_score="kl"))
        rows[name] = {
            "auroc": auroc(neg, pos),
            "recall": float((pos > rule.threshold).mean()),
            "clean_reject_rate": float((neg > rule.threshold).mean()),
        }
    return rows


def main() -> None:
    """Measure every case whose bundle is at hand; the earlier results of cases not at hand are kept."""
    path = RESULTS / "scores.json"
    out = json.loads(path.read_text())["cases"] if path.is_file() else []
    for name, bundle, spec, target in cases():
        rows = measure(bundle, spec, target)
        old = [i for i, c in enumerate(out) if c["case"] == name]
        if old:
            out[old[0]] = {"case": name, "scores": rows}
        else:
            out.append({"case": name, "scores": rows})
        save("scores", {"cases": out})
        print(json.dumps({"case": name, **{k: round(v["recall"], 3) for k, v in rows.items()}}), flush=True)


if __name__ == "__main__":
    main()
