"""The quarantine unlearned directly, where the quarantine is small or the monitor weak (issue 15).

``--unlearn-quarantine W`` adds a fine-tuning term that moves the purified quarantine's inputs (the attacker's
trigger as it arrived) off the dominant BadNet label; bench_recipe measures it on the field cells at CPD 0.1. The
question here is whether it holds where there is little to unlearn from or the quarantine is a biased sample:

- CPD 0.02 (about 20 triggered inputs in N = 1000), seed-0 cells, streamed under ``gap_or_kl`` (bench_field's
  purity stage); the adaptive attacker's cell at CPD 0.1 when present;
- a weak θ_aug (bench_weak's high- and mid-ASR monitors, ``gap_or_kl``) at CPD 0.5 and 0.2: the quarantine holds
  only the triggered inputs that monitor happens to catch.

Each is repaired three ways on the same quarantine: the CycleGAN (the default until 6ab4909, 2026-11-27), the
CycleGAN with the term, and the term with no trigger learner (θ_bd fine-tuned on clean D_treat with the term: the
default since 1a81fc1, 2026-11-28). The CycleGAN a case fitted before (1803bf9's runs) is resumed, so the learned
trigger is the same across variants. ``--next-monitor keep``.

    python -m bench.bench_unlearn [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.bench_field import QUICK, WORK, trigger_pictures
from bench.bench_recipe import repair_variant, slug
from bench.common import RESULTS, machine, save

VARIANTS: dict[str, list[str]] = {
    "CycleGAN (session-16 default)": ["--learner", "cyclegan", "--unlearn-quarantine", "0"],
    "CycleGAN + unlearn 1": ["--learner", "cyclegan", "--unlearn-quarantine", "1"],
    "no learner, unlearn 1": ["--learner", "none", "--unlearn-quarantine", "1"],
    "default (no learner, unlearn 0.5)": [],
}


def cases(specs: dict[str, str]) -> list[dict[str, Any]]:
    """Every case whose quarantine exists: name, bundle, quarantine, trigger spec and a fitted CycleGAN (or None)."""
    out: list[dict[str, Any]] = []
    for trigger in ("checker4", "square:4", "paste", "blend", "checker4+adaptive0.3"):
        purity = WORK / trigger / "seed0" / "purity"
        for cpd in ("0.02", "0.1") if "adaptive" in trigger else ("0.02",):
            stream = purity / f"stream-gap_or_kl-{cpd}.json"
            if not stream.is_file():
                continue
            rec = json.loads(stream.read_text())
            spec = specs.get(trigger, rec.get("trigger"))
            out.append({"name": f"{trigger} CPD {cpd}", "dir": purity / f"unlearn-{cpd}", "bundle": rec["bundle"],
                        "quarantine": rec["quarantine"], "spec": spec,
                        "gan": purity / f"s15-repair-{cpd}" / "cyclegan.pt"})  # fmt: skip
    for asr in ("0.8", "0.35"):
        w = WORK / "checker4" / "seed0" / f"weak-{asr}" / "gap_or_kl"
        for cpd in ("0.5", "0.2"):
            if (w / f"cpd{cpd}" / "quarantine").is_dir():
                out.append({"name": f"checker4 weak θ_aug (ASR ~{asr}) CPD {cpd}", "dir": w / f"unlearn-{cpd}",
                            "bundle": str(w / "calibrated" / "bundle"),
                            "quarantine": str(w / f"cpd{cpd}" / "quarantine"),
                            "spec": specs["checker4"], "gan": w / f"s15-repair-{cpd}" / "cyclegan.pt"})  # fmt: skip
    return out


def run_case(case: dict[str, Any], only: list[str] | None) -> dict[str, Any]:
    common = ["--bundle", case["bundle"], "--quarantine", case["quarantine"], "--eval-trigger", case["spec"],
              "--target", "0", *QUICK, "--next-monitor", "keep"]  # fmt: skip
    res: dict[str, Any] = {"case": case["name"]}
    gan: Path = case["gan"]
    for name, flags in VARIANTS.items():
        if only and name not in only:
            continue
        out = case["dir"] / slug(name)
        rep = repair_variant(out, common, flags, gan)
        res[name] = {
            "exit_code": rep.get("exit_code"),
            "error": rep.get("error"),
            "test": rep.get("test"),
            "quarantine_size": rep.get("quarantine_size"),
            "purified_size": rep.get("purified_size"),
            "trigger_gain": (rep.get("repair_set") or {}).get("trigger_gain"),
        }
        print(json.dumps({"case": case["name"], "variant": name, "test": (rep.get("test") or {}).get("repaired")}),
              flush=True)  # fmt: skip
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only the cases of these names")
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), metavar="NAME",
                    help="run only these variants (default: all); a case's other results are kept")  # fmt: skip
    args = ap.parse_args()
    specs = trigger_pictures(WORK / "triggers")
    path = RESULTS / "unlearn.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if path.is_file() else []
    for case in cases(specs):
        if args.only and case["name"] not in args.only:
            continue
        old = next((r for r in rows if r["case"] == case["name"]), {})
        res = {**old, **run_case(case, args.variants), "machine": machine()}
        rows = [r for r in rows if r["case"] != case["name"]] + [res]
        save("unlearn", {"variants": list(VARIANTS), "rows": rows})


if __name__ == "__main__":
    main()
