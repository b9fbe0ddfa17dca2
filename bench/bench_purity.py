"""What a reject rule hands the repair (issue 14): the quarantine each score collects and what purification keeps.

For each bundle bench_field and bench_weak made (checker4, blend, the weak θ_aug, the adaptive attacker), under
``logit_gap`` and ``gap_or_kl`` (the bundle put under the other score by ``nnoc-trainer calibrate``: same two models,
τ chosen again on clean data): a stream of 1,000 at each CPD, its quarantine, and the quarantine purified as the
repair purifies it (``excess``, from the BadNet labels of the clean D_valid inputs the rule rejects). Evaluation
reads truth.json (which inputs were triggered); no rule or purifier does. ``--repair`` also repairs (quick profile)
from the named score's CPD-0.1 quarantine, for the CA / ASR of θ_repair and v2's served CA.

    python -m bench.bench_purity [--cpds 0.1 0.02] [--repair gap_or_kl] [--cells checker4 blend weak adaptive]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_field import QUICK, WORK, stage, trigger_pictures
from bench.common import RESULTS, run_cli, save

CELLS = {
    "checker4": ("checker4", WORK / "checker4" / "seed0" / "predeploy" / "bundle"),
    "blend": ("blend", WORK / "blend" / "seed0" / "predeploy" / "bundle"),
    "weak": ("checker4", WORK / "checker4" / "seed0" / "weak-0.8" / "predeploy" / "bundle"),
    "adaptive": ("checker4", WORK / "checker4+adaptive0.3" / "seed0" / "predeploy" / "bundle"),
}
SCORES = ("logit_gap", "gap_or_kl")


def under(bundle: Path, score: str, work: Path) -> Path:
    """The bundle under ``score``: itself when its rule has that score, else ``calibrate``'s copy."""
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.formats.reject import RejectRule

    if RejectRule.of(verify_bundle(bundle).manifest).score == score:
        return bundle
    out = work / f"cal-{score}"
    stage(work / f"cal-{score}.json", lambda: run_cli(
        "calibrate", "--bundle", str(bundle), "--reject-score", score, "--out", str(out)))  # fmt: skip
    return out / "bundle"


def composition(bundle: Path, quarantine: Path, valid: np.ndarray) -> dict[str, Any]:
    """The quarantine's size and poisoned share, and what ``excess`` purification keeps (evaluation: truth.json)."""
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.formats.preprocess import Preprocess
    from edge_agent.formats.reject import RejectRule
    from edge_agent.formats.spec import preprocess_of
    from trainer.service.quarantine import QuarantineStore
    from trainer.stages.detect import pair_logits
    from trainer.stages.purify import purify

    b = verify_bundle(bundle)
    rule = RejectRule.of(b.manifest)
    p, m = pair_logits(b.model_path("primary"), b.model_path("monitor"), valid, preprocess_of(b.manifest.input_spec))
    baseline = np.bincount(p.argmax(1)[rule.reject(rule.scores(p, m))], minlength=p.shape[1])
    poisoned = set(json.loads((quarantine / "truth.json").read_text())["poisoned_seq"])
    with QuarantineStore(quarantine, create=False) as store:
        q = store.load(Preprocess())
    is_p = np.array([seq in poisoned for _, seq in q.keys], dtype=bool)
    pur = purify(q.primary, "excess", baseline_counts=baseline)
    return {
        "quarantined": len(q), "poisoned_streamed": len(poisoned), "poisoned_caught": int(is_p.sum()),
        "raw_purity": float(is_p.mean()) if len(q) else None, "dominant": pur.dominant, "kept": int(pur.keep.sum()),
        "kept_purity": float(is_p[pur.keep].mean()) if pur.keep.any() else None,
    }  # fmt: skip


def main() -> None:
    from trainer.science.data import DataConfig, SplitConfig, load_splits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    ap.add_argument("--cpds", nargs="+", type=float, default=[0.1, 0.02])
    ap.add_argument("--repair", choices=SCORES, default=None, help="repair from this score's CPD-0.1 quarantine")
    args = ap.parse_args()
    specs = trigger_pictures(WORK / "triggers")
    valid = load_splits(DataConfig(), SplitConfig()).valid.images
    path = RESULTS / "purity.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if path.is_file() else []
    for name in args.cells:
        trigger, bundle = CELLS[name]
        if not (bundle / "manifest.pb").is_file():
            print(f"{name}: {bundle} not found (run bench_field / bench_weak first); skipped", flush=True)
            continue
        work = bundle.parent.parent / "purity"
        for score in SCORES:
            b = under(bundle, score, work)
            for cpd in args.cpds:
                q = work / f"q-{score}-{cpd:g}"
                ev = ["--bundle", str(b), "--target", "0"]
                stream = [*ev, "--trigger", specs[trigger], "--cpd", f"{cpd:g}", "--n", "1000", "--seed", "0"]
                stage(work / f"stream-{score}-{cpd:g}.json", lambda a=[*stream, "--out", str(q)]: run_cli("stream", *a))
                row: dict[str, Any] = {"cell": name, "score": score, "cpd": cpd, **composition(b, q, valid)}
                if score == args.repair and cpd == 0.1:
                    repair = [*ev, "--quarantine", str(q), "--eval-trigger", specs[trigger], *QUICK,
                              "--out", str(work / f"repair-{score}-0.1")]  # fmt: skip
                    rep = stage(work / f"repair-{score}-0.1.json", lambda a=repair: run_cli("repair", *a))
                    row["repair"] = {"exit_code": rep.get("exit_code"), "error": rep.get("error"),
                                     "test": (rep.get("test") or {}).get("repaired"),
                                     "served_test": rep.get("served_test"), "seconds": rep.get("seconds")}  # fmt: skip
                rows = [r for r in rows if (r["cell"], r["score"], r["cpd"]) != (name, score, cpd)] + [row]
                save("purity", {"rows": rows})
                print(json.dumps({k: row[k] for k in ("cell", "score", "cpd", "quarantined", "kept", "kept_purity")}),
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
