"""Render bench/results/*.json into BENCHMARKS.md (tables with the machine each ran on)."""

from __future__ import annotations

import json
from pathlib import Path
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


def plot_cpd(data: dict[str, Any], path: Path) -> bool:
    """CA and ASR of the repaired model against CPD (the paper's Fig. 8); False when there is no sweep."""
    rows = sorted(
        (r for r in data["rows"] if r["variant"] == "purified" and r["repaired_ca"] is not None), key=lambda r: r["cpd"]
    )
    if len(rows) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpd = [r["cpd"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(cpd, [r["repaired_ca"] for r in rows], "o-", label="CA (θ_repair)")
    ax.plot(cpd, [r["repaired_asr"] for r in rows], "s-", label="ASR (θ_repair)")
    ax.axhline(rows[0]["badnet_ca"], color="gray", linestyle=":", label="CA (BadNet)")
    ax.axhline(rows[0]["aug_asr"], color="tab:red", linestyle=":", label="ASR (θ_aug alone)")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(cpd, [f"{c:g}" for c in cpd])
    ax.set_xlabel("CPD (poisoned share of the stream)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Repair vs CPD, trigger {data['trigger']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def repair_section(data: dict[str, Any], name: str) -> str:
    lines = [
        f"## Post-deployment repair, trigger `{data['trigger']}`",
        "",
        _machine(data["machine"]),
        "",
        f"Same BadNet and heuristic θ_aug (block noise) as above; stream of N = {data['n']} inputs per CPD "
        "(stream split, seed 0); the repair job's defaults unless the variant says otherwise"
        + (f" (extra flags: `{' '.join(data['extra'])}`)" if data.get("extra") else "")
        + ". Purity = poisoned share of the images the CycleGAN learned from (evaluation only).",
        "",
        "| CPD | variant | rejects | recall | kept | purity | θ_repair CA | θ_repair ASR | BadNet CA | θ_aug ASR "
        "| GAN score | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(data["rows"], key=lambda r: (r["cpd"], r["variant"])):
        lines.append(
            f"| {r['cpd']:g} | {r['variant']} | {r['rejected']} | {_fmt(r['recall'], 2)} | {r['kept']} "
            f"| {_fmt(r['kept_purity'], 2)} | {_fmt(r['repaired_ca'])} | {_fmt(r['repaired_asr'])} "
            f"| {_fmt(r['badnet_ca'])} | {_fmt(r['aug_asr'])} | {_fmt(r['gan_best_score'], 3)} | {r['seconds']:.0f} |"
        )
    png = RESULTS / f"{name}.png"
    if plot_cpd(data, png):
        lines += ["", f"![CA and ASR against CPD]({png.relative_to(ROOT)})"]
    return "\n".join(lines) + "\n"


def edge_section(data: dict[str, Any]) -> str:
    lines = [
        "## Edge ensemble throughput (issue 4, first measurement)",
        "",
        _machine(data["machine"]),
        "",
        "Both models of the checker4 bundle on the CPU, inputs per second; `fused` is one ONNX graph holding both "
        "models behind one input (argmax inside). Ratios are against eager PyTorch running the same two models "
        f"({data['threads']} threads).",
        "",
        "| batch | two sessions | fused graph | eager PyTorch | two sessions / eager | fused / eager |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['batch']} | {r['two_sessions']:.0f} | {r['fused']:.0f} | {r['eager_torch']:.0f} "
            f"| {r['two_sessions'] / r['eager_torch']:.2f}× | {r['fused'] / r['eager_torch']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parts = [HEADER]

    def section(name: str, render: Any) -> None:
        path = RESULTS / f"{name}.json"
        if path.is_file():
            parts.append(render(json.loads(path.read_text())))

    section("predeploy", predeploy_section)
    for path in sorted(RESULTS.glob("repair-*.json")):
        parts.append(repair_section(json.loads(path.read_text()), path.stem))
    section("edge", edge_section)
    notes = ROOT / "bench" / "NOTES.md"
    if notes.is_file():
        parts.append(notes.read_text())
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
