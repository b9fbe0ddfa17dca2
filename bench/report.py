"""Render bench/results/*.json into BENCHMARKS.md (tables with the machine each ran on)."""

from __future__ import annotations

import json
from typing import Any

from bench.common import RESULTS, ROOT

HEADER = """# Benchmarks

Measured by the scripts in `bench/` (`make bench`); each section names the machine and date it ran on.
Targets come from the issues; misses are reported as measured, with the reason where known.
"""


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _machine(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"_{m['cpu']}, {m['cores']} cores{gpu}; Python {m['python']}, torch {m['torch']}; {m['date']}._"


def predeploy_section(data: dict[str, Any]) -> str:
    lines = [
        "## Pre-deployment treatment (Algorithm 1)",
        "",
        _machine(data["machine"]),
        "",
        f"Fashion-MNIST, cnn3 BadNet (3-step, 1 clean + 2 poisoned epochs, 10% poisoning, target 0), Algorithm 1 "
        f"with {data['epochs']} fine-tuning epochs per candidate, up to {data['max_rounds']} α rounds from the "
        "BadNet's lr (Adam 1e-3) in multiples 1, 3, 6, 9 ×, Γ = {0.1 … 0.6}, threshold = BadNet D_eval CA − 0.05. "
        "Each row is the heuristic's pick (it reads D_eval CA only); test CA/ASR are measured for this table only. "
        "`clean-ft` is the control: the same search with γ = 0 (fine-tuning on clean D_treat alone).",
        "",
        "| trigger | variant | BadNet CA | BadNet ASR | θ_aug CA | θ_aug ASR | CA drop | pick α, γ "
        "| lowest ASR on grid | candidates | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        drop = r["badnet_ca"] - r["aug_ca"] if r["aug_ca"] is not None else None
        pick = f"{r['alpha']:.3g}, {r['gamma']:.1f}" if r["alpha"] is not None else "none met the threshold"
        lines.append(
            f"| `{r['trigger']}` | {r['variant']} | {_fmt(r['badnet_ca'])} | {_fmt(r['badnet_asr'])} "
            f"| {_fmt(r['aug_ca'])} | {_fmt(r['aug_asr'])} | {_fmt(drop)} | {pick} "
            f"| {_fmt(r['best_asr_any_candidate'])} | {r['candidates']} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


SECTIONS = {"predeploy": predeploy_section}


def main() -> None:
    parts = [HEADER]
    for name, render in SECTIONS.items():
        path = RESULTS / f"{name}.json"
        if path.is_file():
            parts.append(render(json.loads(path.read_text())))
    notes = ROOT / "bench" / "NOTES.md"
    if notes.is_file():
        parts.append(notes.read_text())
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
