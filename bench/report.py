"""Render bench/results/*.json into BENCHMARKS.md (tables with the machine each ran on)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT

HEADER = """# Benchmarks

The current result of each benchmark: the machine and date it ran on, the commit it measured, its result file and
the command that measures it again (`make bench` runs them all). Targets come from the issues; misses are reported
as measured, with their cause where known. What was tried on the way, and why, is in `bench/NOTES.md`.
"""

# result name -> the command that writes it (as `make bench` runs it)
REPRODUCE = {
    "predeploy": "python -m bench.bench_predeploy",
    "cost": "python -m bench.bench_cost --seeds 0 1",
    "steps": "python -m bench.bench_steps",
    "repair-checker4": "python -m bench.bench_repair --trigger checker4 --variants purified raw clean-ft bd-base "
    "clean-ft-bd --extra --profile quick",
    "repair-square-4": "python -m bench.bench_repair --trigger square:4 --cpds 0.1 --extra --profile quick",
    "edge": "python -m bench.bench_edge",
    "service": "python -m bench.bench_service",
    "reliability": "python -m bench.bench_reliability",
    "attacks": "python -m bench.bench_attacks --before 540fa5f",
    "demo": "python -m bench.bench_demo",
    "foreign": "python -m bench.bench_foreign",
    "smallest": "python -m bench.bench_smallest",
    "cyclegan-sizes": "python -m bench.bench_cyclegan_sizes",
    "detect": "python -m bench.bench_detect",
    "scores": "python -m bench.bench_scores",
    "purity": "python -m bench.bench_purity",
    "cameras": "python -m bench.bench_cameras",
    "fleet": "python -m bench.bench_fleet",
    "ray": "python -m bench.bench_ray",
    "field": "python -m bench.bench_field --seeds 0 1 (and --triggers checker4 --attacker noise-robust / resilient)",
    "premise": "python -m bench.bench_premise",
    "rounds": "python -m bench.bench_rounds",
    "weak": "python -m bench.bench_weak --trigger checker4",
    "recipe": "python -m bench.bench_recipe",
    "unlearn": "python -m bench.bench_unlearn",
    "gpu": "python -m bench.bench_gpu (by hand, where a GPU is lent)",
}


def provenance(name: str, data: dict[str, Any]) -> str:
    """A section's last line: the commit it measured, its result file, the command that measures it again."""
    after, before = data.get("after"), data.get("before")
    if isinstance(after, str) and isinstance(before, str):  # a comparison of two commits, in worktrees
        commit = f"{after} against {before}"
    else:
        commit = (data.get("machine") or {}).get("commit") or ""
    if not commit:  # results written before the machine block named its commit: the commit that wrote the file
        commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", f"bench/results/{name}.json"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
        commit = f"written at {commit}" if commit else "not committed"
    return f"_Commit {commit}; result `bench/results/{name}.json`; again: `{REPRODUCE.get(name, '?')}`._\n"


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _machine(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"_{m['cpu']}, {m['cores']} cores{gpu}; Python {m['python']}, torch {m['torch']}; {m['date']}._"


def _heading(title: str, rows: list[dict[str, Any]], text: str) -> list[str]:
    """A section's first lines: its title, the machine its first row ran on, what it measures."""
    return [title, "", _machine(rows[0]["machine"]) if rows else "", "", text]


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


def _spread(values: list[float]) -> tuple[float, float]:
    """(mean, max - min) of ``values``."""
    return sum(values) / len(values), max(values) - min(values)


def _ratio(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Wall time before over after (None where either is missing)."""
    if not before.get("wall_seconds") or not after.get("wall_seconds"):
        return None
    return float(before["wall_seconds"]) / float(after["wall_seconds"])


def cost_section(data: dict[str, Any]) -> str:
    """Algorithm 1's cost (bench/bench_cost.py): this commit's predeploy defaults against an earlier commit's."""
    lines = [
        "## Algorithm 1's cost: predeploy's defaults against the full grid (bench/bench_cost.py)",
        "",
        _machine(data["machine"]),
        "",
        f"`predeploy` with its defaults only, at {data['after']} (successive halving over each round's γ, η = 3; "
        f"channels-last; `--precision auto`) against {data['before']} (every candidate to the end, fp32), one "
        "command at a time on the same machine, nothing beside it. Wall time is the whole command. θ_aug CA/ASR: "
        "the harness' test split, the BadNet's eligible set (evaluation only: the pick reads D_eval CA). Foreign "
        "models: `bench/outsider_badnet.py` (ONNX, 3x32x32, X glyph, target 7); cnn3: `attack`, target 0. Epochs: "
        "fine-tuning epochs trained over the whole grid. Goals (issue 38): ≥ 3× less wall time per model, ≤ 10 "
        "min for resnet-small, θ_aug within the before's seed-to-seed spread.",
        "",
        "| model | trigger | seed | wall s before → after | × | epochs before → after | precision | "
        "θ_aug CA before → after | θ_aug ASR before → after | pick (α, γ) before → after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_case: dict[tuple[str, str], list[dict[str, Any]]] = {}
    repairs = []
    for r in data["rows"]:
        if "repair" in r:
            repairs.append(r)
            continue
        b, a = r["before"], r["after"]
        by_case.setdefault((r["model"], r["trigger"]), []).append(r)
        ratio = _ratio(b, a)

        def pick(x: dict[str, Any]) -> str:
            return f"{x['alpha']:.3g}, {x['gamma']:.1f}" if x.get("alpha") is not None else "none"

        mark = " †" if r.get("shared") else ""
        lines.append(
            f"| {r['model']} | {r['trigger']} | {r['seed']}{mark} | {_fmt(b.get('wall_seconds'), 0)} → "
            f"{_fmt(a.get('wall_seconds'), 0)} | {_fmt(ratio, 2)} | {b.get('epochs_trained')} → "
            f"{a.get('epochs_trained')} | {a.get('precision')} | {_fmt(b.get('test_ca'))} → {_fmt(a.get('test_ca'))} "
            f"| {_fmt(b.get('test_asr'))} → {_fmt(a.get('test_asr'))} | {pick(b)} → {pick(a)} |"
        )
    shared = [r for r in data["rows"] if r.get("shared")]
    if shared:
        lines += ["", "† " + "; ".join(sorted({r["shared"] for r in shared})) + "."]
    lines += ["", "Per case over its seeds: wall-time ratio of the rows measured alone (†: left out); θ_aug mean "
              "(spread = max − min over seeds).", "",
              "| model | trigger | seeds | × | CA before (spread) | CA after (spread) | ASR before (spread) "
              "| ASR after (spread) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (model, trigger), rows in by_case.items():
        done = [r for r in rows if r["before"].get("test_ca") is not None and r["after"].get("test_ca") is not None]
        if not done:
            continue
        alone = [r for r in done if not r.get("shared")] or done
        ratio = sum(r["before"]["wall_seconds"] for r in alone) / sum(r["after"]["wall_seconds"] for r in alone)
        cells = []
        for key in ("test_ca", "test_asr"):
            for side in ("before", "after"):
                mean, spread = _spread([r[side][key] for r in done])
                cells.append(f"{mean:.4f} ({spread:.4f})" if len(done) > 1 else f"{mean:.4f} (one seed)")
        lines.append(f"| {model} | {trigger} | {len(done)} | {ratio:.2f} | " + " | ".join(cells) + " |")
    if repairs:
        lines += ["", "The repair (quick profile) on the same quarantine (stream at CPD 0.1, N 1,000 into the before "
                  "bundle of seed 0), each commit's defaults:", "",
                  "| model | trigger | rejected (recall) | wall s before → after | × | precision | θ_repair CA "
                  "before → after | θ_repair ASR before → after |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in repairs:
            rp = r["repair"]
            b, a = rp.get("before") or {}, rp.get("after") or {}
            ratio = _ratio(b, a)
            lines.append(
                f"| {r['model']} | {r['trigger']} | {rp.get('rejected')} ({_fmt(rp.get('recall'), 3)}) | "
                f"{_fmt(b.get('wall_seconds'), 0)} → {_fmt(a.get('wall_seconds'), 0)} | {_fmt(ratio, 2)} | "
                f"{a.get('precision')} | {_fmt(b.get('test_ca'))} → {_fmt(a.get('test_ca'))} | "
                f"{_fmt(b.get('test_asr'))} → {_fmt(a.get('test_asr'))} |"
            )
    return "\n".join(lines) + "\n"


def steps_section(data: dict[str, Any]) -> str:
    """One training step's cost per architecture and arithmetic (bench/bench_steps.py)."""
    variants = data["variants"]
    lines = [
        "## One training step per architecture and arithmetic (bench/bench_steps.py)",
        "",
        _machine(data["machine"]),
        "",
        f"Adam, batch {data['batch']}, {data['threads']} torch threads; ms per step (median of 5 x 4 steps); "
        "in brackets the speed-up over fp32. `--precision auto` takes bf16 where its probe finds ≥ 1.3x.",
        "",
        "| model | input | " + " | ".join(variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    for r in data["rows"]:
        base = r["fp32"]
        cells = [f"{r[v]:.0f}" + ("" if v == "fp32" else f" ({base / r[v]:.2f}x)") for v in variants]
        lines.append(f"| {r['model']} | {r['input']} | " + " | ".join(cells) + " |")
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
        "## Edge agent (issue 4)",
        "",
        _machine(data["machine"]),
        "",
        "**Throughput.** Both models of the checker4 bundle on the CPU through the product's `Ensemble`, inputs "
        "per second (best of two rounds); `fused` is one ONNX graph holding both models behind one input "
        "(`edge_agent/fuse.py`, the default path), `two sessions` the other path. Ratios against eager PyTorch "
        f"running the same two models ({data['threads']} threads). Target ≥ 3×.",
        "",
        "| batch | two sessions | fused graph | eager PyTorch | two sessions / eager | fused / eager |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['batch']:.0f} | {r['two_sessions']:.0f} | {r['fused']:.0f} | {r['eager_torch']:.0f} "
            f"| {r['two_sessions'] / r['eager_torch']:.2f}× | {r['fused'] / r['eager_torch']:.2f}× |"
        )
    sp = data.get("spool")
    if sp:
        lines += [
            "",
            f"**Spool and uplink on.** Batch 1, a stream with 10% triggered inputs ({100 * sp['reject_share']:.1f}% "
            "rejected); the agent writes every reject to its SQLite spool (WAL; before answering unless "
            "`deferred`), and the uplink streams it to the real collector. Target ≥ 0.9×.",
            "",
            "| path | inputs/s | p50 ms | p99 ms |",
            "|---|---|---|---|",
            f"| bare ensemble | {sp['bare']['rate']:.0f} | {sp['bare']['p50_ms']:.3f} | {sp['bare']['p99_ms']:.3f} |",
            f"| agent, spool durability `power` (fsync per reject) | {sp['agent_power']['rate']:.0f} "
            f"| {sp['agent_power']['p50_ms']:.3f} | {sp['agent_power']['p99_ms']:.3f} |",
            f"| agent, spool durability `process` (survives kill -9) | {sp['agent_process']['rate']:.0f} "
            f"| {sp['agent_process']['p50_ms']:.3f} | {sp['agent_process']['p99_ms']:.3f} |",
        ]
        if "agent_deferred" in sp:
            d = sp["agent_deferred"]
            lines.append(
                f"| agent, spool durability `deferred` (the default: committed within 50 ms) | {d['rate']:.0f} "
                f"| {d['p50_ms']:.3f} | {d['p99_ms']:.3f} |"
            )
        deferred = f", {sp['ratio_deferred']:.2f}× (`deferred`)" if "ratio_deferred" in sp else ""
        lines += [
            "",
            f"Ratios {sp['ratio_power']:.2f}× (`power`), {sp['ratio_process']:.2f}× (`process`){deferred}; "
            f"acknowledged by the collector {sp['acked']}, stored {sp['stored']}.",
        ]
    sw = data.get("swaps")
    if sw:
        lines += [
            "",
            f"**Hot swaps under load.** {sw['swaps']} swaps (each loads a fresh ensemble, v1 ↔ v2) in "
            f"{sw['seconds']:.1f} s while 2 clients call the Open Inference Protocol endpoint with a 64-input batch "
            f"on which the versions differ in {sw['labels_differing_between_versions']} labels. Replies: "
            f"{sw['ok']} correct for the version they report, {sw['misversioned']} mis-versioned, {sw['failed']} "
            "failed (target 0 and 0).",
        ]
    return "\n".join(lines) + "\n"


def _layout(data: dict[str, Any]) -> str:
    """What the quarantine messages of a service run carried (runs before the image layout: float32 tensors)."""
    if data.get("layout", "tensor") == "image":
        return "the model's 28×28 uint8 image, as agents send it"
    return "28×28 float32 model-input tensors"


def _push(data: dict[str, Any]) -> str:
    if "verify_ten_s" not in data:  # runs before the service's side was timed apart: download and verify together
        return (
            f"**Push.** A {data['bundle_mb']} MB bundle published to subscribed agent processes (notice, download "
            f"in 1 MiB chunks, sha256 verify): one agent {data['push_one_s']:.2f} s, ten agents "
            f"{data['push_ten_s']:.2f} s, ratio {data['push_ratio']:.2f}× (goal ≤ 2×)."
        )
    return (
        f"**Push.** A {data['bundle_mb']} MB bundle published to subscribed agent processes. Service's side (publish "
        f"until the last agent has every 1 MiB chunk): one agent {data['push_one_s']:.2f} s, ten agents "
        f"{data['push_ten_s']:.2f} s, ratio **{data['push_ratio']:.2f}×** "
        f"({'met' if data['push_ratio'] <= 2 else 'MISS'} of the goal ≤ 2×; "
        f"{data['push_aggregate_mb_s']:.0f} MB/s to the ten together). The clients' sha256 verification, timed "
        f"apart after every download is in: {data['verify_one_s']:.2f} s for one, {data['verify_ten_s']:.2f} s for "
        "ten processes sharing the two cores." + _push_cpu(data)
    )


def _push_cpu(data: dict[str, Any]) -> str:
    if "push_ten" not in data:
        return ""
    one, ten = data["push_one"], data["push_ten"]
    return (
        f" CPU while delivering: the service {one['service_cpu_s']:.2f} s for one agent and "
        f"{ten['service_cpu_s']:.2f} s for ten ({ten['service_cpu_s'] / 10:.3f} s per download), the receiving "
        f"clients {one['clients_cpu_s']:.2f} s and {ten['clients_cpu_s']:.2f} s: "
        f"{(ten['service_cpu_s'] + ten['clients_cpu_s']) / ten['delivered_s']:.2f} of the machine's 2 cores busy "
        "for the ten."
    )


def service_section(data: dict[str, Any]) -> str:
    c = data["collector"]
    return (
        "\n".join(
            [
                "## Trainer service (issue 5)",
                "",
                _machine(data["machine"]),
                "",
                f"**Collector.** {data['agents']} agent processes × {data['messages_per_agent']} quarantine messages "
                f"({_layout(data)}) on loopback. Bare pyzmq PUSH/PULL moving the same frames (both senders send "
                "frame by frame) against the collector "
                "(parse, check against the fleet's input spec, one SQLite WAL transaction per batch with "
                "synchronous=FULL, then the ACKs; senders keep ≤ 1000 unacknowledged). ACKs as agents ask for them "
                "(`batched_acks`: one reply per sender and write, naming every message it stored) and, where measured, "
                "one reply per message (agents before a501ae4 (2026-11-28)). Target ≥ 0.3×.",
                "",
                "| path | messages/s | ratio | sent | acked | stored | lost | duplicates stored |",
                "|---|---|---|---|---|---|---|---|",
                f"| bare PUSH/PULL | {data['pushpull_rate']:.0f} | 1 | {c['sent']} | – | – | – | – |",
                *[
                    f"| {name} | {r['rate']:.0f} | {r['rate'] / data['pushpull_rate']:.2f}× | {r['sent']} "
                    f"| {r['acked']} | {r['stored']} | {r['lost']} | {r['duplicates_stored']} |"
                    for name, r in (
                        ("collector" + (", one reply per write" if "collector_ack_each" in data else ""), c),
                        ("collector, one reply per message", data.get("collector_ack_each")),
                    )
                    if r
                ],
                "",
                f"Ratio {data['collector_ratio']:.2f}× ({'met' if data['collector_ratio'] >= 0.3 else 'MISS'}).",
                "",
                _push(data),
            ]
        )
        + "\n"
    )


def _rollout_faults(ro: dict[str, Any]) -> str:
    """The staged-rollout faults (issue 16): an agent killed mid-download, the trainer killed mid-rollout."""
    if "error" in ro:
        return f"**Rollout faults** did not run to the end: {ro['error']}"
    on = sum(v == 2 for v in ro["versions"].values())
    killed = (
        f"at {ro['agent_killed_at_bytes'] / 1e6:.1f} of {ro['bundle_mb']} MB"
        if ro["agent_killed_mid_download"]
        else "after its download had finished (not mid-download)"
    )
    resumed = f"; it resumed: `{ro['resumed']}`" if ro.get("resumed") else "; no resume logged"
    outside = ", ".join(ro["served_outside_stage"]) or "none"
    return "\n".join(
        [
            f"**Rollout faults** (issue 16): a {ro['bundle_mb']} MB version rolled out to {ro['agents']} "
            "`nnoc-edge run` agents (canary cam-a, then 50%, 100%; bake 3 s), the canary agent killed -9 "
            "mid-download and started again a second later, the trainer killed -9 once the 50% stage had started "
            "and started again; watched every 0.1 s." + (f" {_machine(ro['machine'])}" if "machine" in ro else ""),
            "",
            "| fault | what happened |",
            "|---|---|",
            f"| kill -9 agent mid-download | killed {killed}{resumed} |",
            f"| kill -9 trainer mid-rollout (stage {ro['trainer_killed_in_stage']}) | the restarted service went on "
            f"from the stored record: rollout {ro['rollout_state']} ({ro['stages_started']} stages started) in "
            f"{ro['seconds']:.0f} s from publish |",
            f"| outcome | {on} of {ro['agents']} agents on the new version; devices that served it outside the "
            f"stages reached: {outside} |",
        ]
    )


def reliability_section(data: dict[str, Any]) -> str:
    lines = [
        "## Reliability (issue 6)",
        "",
        _machine(data["machine"]),
        "",
        "| fault injected | messages sent | stored | lost | duplicated | failed replies |",
        "|---|---|---|---|---|---|",
    ]
    for f in data["faults"]:
        lines.append(
            f"| {f['fault']} | {f['sent']} | {f['stored']} | {f['lost']} | {f['duplicated']} | {f['failed_replies']} |"
        )
    ro = data.get("rollouts")
    if ro:
        lines += ["", _rollout_faults(ro)]
    if data.get("hostile"):
        lines += ["", _hostile(data["hostile"])]
    fz = data.get("fuzz")
    if fz:
        lines += ["", "| decoder (hypothesis) | bad inputs tried | crashes |", "|---|---|---|"]
        for name, n in sorted(fz["examples"].items()):
            lines.append(f"| {name} | {n} | {fz['crashes'].get(name, 0)} |")
    inf, col = data["inference_rates"], data["collector_rates"]
    lines += [
        "",
        "**Cost of transport security**, same run, same machine:",
        "",
        "| link | plaintext | secured | ratio |",
        "|---|---|---|---|",
        f"| inference endpoint, batch 1, TLS (calls/s) | {inf['plaintext']:.0f} | {inf['tls']:.0f} "
        f"| {inf['tls'] / inf['plaintext']:.2f}× |",
        f"| inference endpoint, batch 1, mutual TLS (calls/s) | {inf['plaintext']:.0f} | {inf['mtls']:.0f} "
        f"| {inf['mtls'] / inf['plaintext']:.2f}× |",
        f"| quarantine uplink → collector, CURVE (messages/s) | {col['plaintext']:.0f} | {col['curve']:.0f} "
        f"| {col['curve'] / col['plaintext']:.2f}× |",
    ]
    return "\n".join(lines) + "\n"


def _hostile(h: dict[str, Any]) -> str:
    """The floods of issue 36 (bench_reliability.hostile_*): what serve, the edge and the uplink held."""
    sv, ed, up = h["serve"], h["edge"], h["uplink"]
    base = sv["baseline"]
    rows = []
    held = f"{sv['held_connections']['opened']} TCP connections held from one other host"
    for key, what in (("unfinished_frames", "30 raw ZMTP senders holding unfinished 2 MiB frames (2.5 GB offered)"),
                      ("held_connections", held)):  # fmt: skip
        r = sv[key]
        honest, during = r.get("honest_acked_after"), r.get("honest_acked_during")
        rows.append(
            f"| {what} | {base['serve_rss_mib']:.0f} → {r['serve_rss_mib']:.0f} MiB, {base['serve_fds']} → "
            f"{r['serve_fds']} fds | {r['collector_rss_mib']:.0f} MiB, {r['collector_fds']} fds | "
            f"{r['health_answered']} of {r['health_asked']} | "
            + (f"during: {'yes' if during else 'no'}; " if during is not None else "")
            + (
                f"8 s in, still held: {'yes' if r['honest_acked_8s'] else 'no'} ({r['collector_fds_8s']} fds); "
                if "honest_acked_8s" in r
                else ""
            )
            + f"after: {'yes' if honest else 'no'} |"
        )
    return "\n".join(
        [
            f"**Floods aimed at the service and the edge** (issue 36; {h['machine']['date']}, "
            f"{h['machine'].get('commit', '')}): serve's own process against its collector's (peaks while the flood "
            "runs; goal: serve bounded, health answering).",
            "",
            "| flood | serve (model service, store watcher) | collector process (peak) | health checks answered "
            "| an honest sender ACKed |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Edge: 4 requests of 128 compressible 4096×4096 PNGs at once: {', '.join(ed['bombs'])}; "
            f"**{ed['probes_answered']} of {ed['probes_sent']}** small probe requests answered meanwhile (goal: all); "
            f"agent RSS {ed['agent_rss_mib']:.0f} → {ed['agent_rss_peak_mib']:.0f} MiB.",
            "",
            f"Uplink whose spool fails (disk full) on its first ACK deletes and reads: {up['spooled']} spooled, "
            f"{up['stored']} stored, {up['lost']} lost, {up['spool_errors']} spool errors survived "
            f"(goal: resumes, nothing lost).",
        ]
    )


def attacks_section(data: dict[str, Any]) -> str:
    cols = [c for c in ("before", "after") if c in data]
    head = " | ".join(f"{c}" + (f" ({data['before_rev']})" if c == "before" else " (this tree)") for c in cols)

    def cell(col: str, scenario: str, render: Any) -> str:
        r = data[col].get(scenario, {})
        return f"error: {r['error']}" if "error" in r else render(r)

    rows = [
        (
            "valid messages ACKed while an attacker sends a malformed one every 5 ms (goal: all)",
            "flood",
            lambda r: (
                f"{r['victim_acked']} of {r['victim_sent']} ({r['attacker_sent']} attacks, "
                f"{r['tracebacks_logged']} tracebacks logged)"
            ),
        ),
        (
            "files open in `serve` after 10,000 distinct-version messages (goal: bounded)",
            "versions",
            lambda r: (
                f"{r['files_open_before']} → {r['files_open_after']}; {r['quarantine_folders']} folders; "
                f"a new sender's valid message {'stored' if r['new_sender_stored'] else 'NOT stored'}"
            ),
        ),
        (
            "Publish with an agent's certificate, mutual TLS (goal: denied)",
            "operator",
            lambda r: f"{r['cam-0']} (operator's: {r['operator']}); history says {r['history_by'][-1]!r}",
        ),
        (
            "agent after one 20,000-input request (goal: refused, memory flat)",
            "memory",
            lambda r: f"{r['status']} in {r['seconds']} s; RSS {r['rss_mb_before']} → {r['rss_mb_after']} MB",
        ),
    ]
    lines = [
        "## Under attack (issue 10)",
        "",
        _machine(data["machine"]),
        "",
        "`python -m bench.bench_attacks --before REV`: the same hostile clients against real `serve` and `nnoc-edge "
        "run` processes on loopback, for an older revision and this tree, in one run.",
        "",
        f"| attack | {head} |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for title, scenario, render in rows:
        lines.append(f"| {title} | " + " | ".join(cell(c, scenario, render) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def demo_section(data: dict[str, Any]) -> str:
    r = data["report"]
    b, a = r["before"], r["after"]
    return (
        "\n".join(
            [
                "## The end-to-end loop (`make demo`, quick profile)",
                "",
                _machine(data["machine"]),
                "",
                "`nnoc-trainer demo --profile quick`: serve + 2 agent processes on loopback (mutual TLS, CURVE, signed "
                "bundles), 1,000 replayed inputs per agent with 10% checker4-triggered, the quarantine starting one "
                "repair job. `before`: the v1 ensemble (offline, agent code); `after`: through the agents' inference "
                "endpoints once both serve the repaired version. A rejected input counts as not correctly answered "
                "and as not attacked. Targets: after ASR ≤ 0.02 with CA at most 0.02 below before; ≤ 15 minutes.",
                "",
                "| | CA | ASR | clean rejects | triggered rejects |",
                "|---|---|---|---|---|",
                f"| ensemble before (v1) | {b['clean_accuracy']:.4f} | {b['attack_success_rate']:.4f} "
                f"| {b['clean_reject_rate']:.4f} | {b['triggered_reject_rate']:.4f} |",
                f"| ensemble after (v{r['repaired_version']}) | {a['clean_accuracy']:.4f} "
                f"| {a['attack_success_rate']:.4f} "
                f"| {a['clean_reject_rate']:.4f} | {a['triggered_reject_rate']:.4f} |",
                f"| primary alone before (θ_bd) | {b['primary']['clean_accuracy']:.4f} "
                f"| {b['primary']['attack_success_rate']:.4f} | – | – |",
                f"| primary alone after (θ_repair) | {a['primary']['clean_accuracy']:.4f} "
                f"| {a['primary']['attack_success_rate']:.4f} | – | – |",
                "",
                f"Agents at the end: {r['agents']}; job started by: {r['job']['reason']}; seconds: {r['seconds']}.",
            ]
        )
        + "\n"
    )


def premise_section(data: dict[str, Any]) -> str:
    """The premise-aimed attackers' BadNets through the whole service loop (bench/bench_premise.py)."""
    lines = [
        "## Attackers aimed at the premise, end to end through the service (issue 39)",
        "",
        _machine(data["machine"]),
        "",
        "`python -m bench.bench_premise`: the BadNet of each premise-aimed attacker's `bench_field` cell (checker4, "
        "target 0; `noise-robust`: trained on Algorithm 1's own noise; `resilient`: SBL-style, sharpness-aware and "
        "continual-learning) defended by `nnoc-trainer demo --model` (quick profile): predeploy, `serve`, two agents "
        "fed 1,000 inputs each with 10% triggered, the quarantine, the service's repair job, v2 on both agents, "
        "measured through their inference endpoints (a rejected input is neither answered right nor attacked). "
        "Goals as the demo's: after ASR ≤ 0.02 with CA at most 0.02 below before.",
        "",
        "| attacker | BadNet CA / ASR | θ_aug test CA / ASR | v1 served CA / ASR | v1 clean / triggered rejects "
        "| job | v2 served CA / ASR | v2 clean rejects | θ_repair CA / ASR | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in data["runs"].items():
        r = run["report"]
        b, a, sel = r["before"], r["after"], (r.get("predeploy") or {}).get("selected") or {}
        lines.append(
            f"| `{name}` | {_pair(b['primary']['clean_accuracy'], b['primary']['attack_success_rate'])} "
            f"| {_pair(sel.get('test_ca'), sel.get('test_asr'))} "
            f"| {_pair(b['clean_accuracy'], b['attack_success_rate'])} "
            f"| {_fmt(b['clean_reject_rate'])} / {_fmt(b['triggered_reject_rate'])} "
            f"| {r['job']['reason']}, {r['job']['state']} "
            f"| {_pair(a['clean_accuracy'], a['attack_success_rate'])} | {_fmt(a['clean_reject_rate'])} "
            f"| {_pair(a['primary']['clean_accuracy'], a['primary']['attack_success_rate'])} "
            f"| {r['seconds'].get('total')} |"
        )
    return "\n".join(lines) + "\n"


def foreign_section(data: dict[str, Any]) -> str:
    lines = [
        "## Foreign models (bring your own model)",
        "",
        _machine(data["machine"]),
        "",
        "BadNets this project did not train (`bench/outsider_badnet.py`: plain torch, Fashion-MNIST resized to "
        "3×32×32 normalised RGB, a 5×5 X glyph at (2, 2) on 10% of its training images, target 7), exported to "
        "ONNX by torch's dynamo exporter and defended only through the CLI with the preprocessing JSON they came "
        f"with: predeploy ({data['rounds']} α rounds, {data['epochs']} epochs per candidate), stream at CPD 0.1, "
        "N = 1,000, repair (quick profile). CA is the test split's; ASR over the BadNet's eligible set. Targets "
        "(issue 12): θ_aug ASR ≤ 0.10 at CA drop ≤ 0.05; θ_repair ASR ≤ 0.03 at CA drop ≤ 0.03.",
        "",
        "| model | BadNet CA / ASR | θ_aug CA / ASR (α, γ) | stream recall / clean rejects | θ_repair CA / ASR "
        "(recipe; minutes) | primary parity | targets met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if "badnet" not in r:
            lines.append(f"| {r['arch']} | – | {r.get('error')} | | | | |")
            continue
        bd, aug, st = r["badnet"], r["theta_aug"], r.get("stream", {})
        rep = r.get("theta_repair") or {}
        met = ", ".join(k for k, v in r["targets"].items() if v) or "none"
        missed = [k for k, v in r["targets"].items() if not v]
        lines.append(
            f"| {r['arch']} | {_fmt(bd['clean_accuracy'])} / {_fmt(bd['attack_success_rate'])} "
            f"| {_fmt(aug['clean_accuracy'])} / {_fmt(aug['attack_success_rate'])} ({aug['alpha']:.3g}, "
            f"{aug['gamma']}) | {_fmt(st.get('recall'))} / {_fmt(st.get('clean_reject_rate'))} "
            f"| {_fmt(rep.get('clean_accuracy'))} / {_fmt(rep.get('attack_success_rate'))}"
            f"{_base(r.get('repair') or {}) or ' (CycleGAN, before 1a81fc1)'}; {r['repair_seconds'] / 60:.0f} "
            f"| {r['primary_parity']:.1e} | {met}{'; missed: ' + ', '.join(missed) if missed else ''} |"
        )
    return "\n".join(lines) + "\n"


def smallest_section(data: dict[str, Any]) -> str:
    bd = data["badnet"]
    lines = [
        "## How many photos (bench/bench_smallest.py)",
        "",
        _machine(data["machine"]),
        "",
        "The defender's own set against θ_aug and the repair, through the product's path: a foreign residual net "
        "(`bench/outsider_badnet.py`, resnet-small, 3×32×32 normalised RGB, glyph trigger, target 7), the first N "
        "pictures of Fashion-MNIST's training file as 28×28 PNGs in a folder per class (`--data`, `--class-names`; "
        "cut per class 80/20 into D_treat/D_eval); predeploy on the same grid at every N "
        f"(`{data['grid']}`, the six γ), stream at CPD 0.1, N = 1,000 (harness), repair (`{data['repair_profile']}` "
        "profile) on the same N photos. CA/ASR: 5,000 test images, the BadNet's eligible set (evaluation only). "
        f"BadNet: CA {_fmt(bd['clean_accuracy'])}, ASR {_fmt(bd['attack_success_rate'])}.",
        "",
        "| photos | D_treat / D_eval | θ_aug CA / ASR (α, γ) | stream recall / clean rejects | θ_repair CA / ASR "
        "| predeploy / repair s |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if "theta_aug" not in r:
            lines.append(f"| {r['photos']:,} | – | {r.get('error')} | | | |")
            continue
        aug, st, rep = r["theta_aug"], r.get("stream") or {}, r.get("theta_repair") or {}
        split = r.get("split") or {}
        repaired = (
            f"{_fmt(rep.get('clean_accuracy'))} / {_fmt(rep.get('attack_success_rate'))}"
            if r.get("repair_published")
            else f"not published: {r.get('repair_error')}"
        )
        lines.append(
            f"| {r['photos']:,} | {split.get('treat', '–')} / {split.get('eval', '–')} "
            f"| {_fmt(aug['clean_accuracy'])} / {_fmt(aug['attack_success_rate'])} ({aug['alpha']:.3g}, "
            f"{aug['gamma']}) | {_fmt(st.get('recall'))} / {_fmt(st.get('clean_reject_rate'))} | {repaired} "
            f"| {r.get('predeploy_seconds')} / {r.get('repair_seconds')} |"
        )
    return "\n".join(lines) + "\n"


def cyclegan_sizes_section(data: dict[str, Any]) -> str:
    lines = [
        "## CycleGAN cost per image size",
        "",
        _machine(data["machine"]),
        "",
        "The repair's trigger learner on the model's image (quick profile: width 16, 6 residual blocks, "
        f"batch 16, {data['threads']} torch threads), one epoch over random images; the generator downsamples "
        "twice whatever the size, the PatchGAN gets a third layer from 64 px up. "
        + (f"Measured with {data['note']}." if data.get("note") else ""),
        "",
        "| image (C×H×W) | pairs / s | discriminator layers | quick profile, 50 epochs × 500 pairs (min) |",
        "|---|---|---|---|",
    ]
    for r in data["rows"]:
        c, h, w = r["shape"]
        lines.append(
            f"| {c}×{h}×{w} | {r['pairs_per_second']} | {r['discriminator_layers']} | {r['quick_profile_minutes']} |"
        )
    return "\n".join(lines) + "\n"


def detect_section(data: dict[str, Any]) -> str:
    lines = [
        "## The monitor as a detector (reject scores)",
        "",
        _machine(data["rows"][0]["machine"]) if data["rows"] else "",
        "",
        "`nnoc-trainer detect-eval` on the test split (5,000 clean inputs) against its triggered copy, counting as "
        "attacks the triggered inputs the BadNet sends to the target. Recall at a clean-reject rate uses the "
        "threshold set on these clean test inputs (the curve); the label-free point uses τ chosen as a published "
        "bundle chooses it at a 1% budget (clean D_treat ∪ D_eval with a 0.9-confidence bound). Paper rule: reject "
        "when the argmaxes differ. `logit_gap` is the default score since f5e1388 (2026-11-27) (`kl` before).",
        "",
        "| case | attacks | paper rule recall / clean rejects | score | AUROC | recall at 0.5% / 1% / 2% / 5% "
        "| label-free 1%: recall / clean rejects |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        paper = r["scores"]["disagree"]
        for score in [k for k in r["scores"] if k != "disagree"]:
            s = r["scores"][score]
            at = s.get("recall_at_clean_reject") or {}
            lf = (s.get("label_free") or {}).get("0.01", {})
            curve = " / ".join(_fmt(at.get(k), 3) for k in ("0.005", "0.01", "0.02", "0.05"))
            lines.append(
                f"| {r['name']} | {r['attacks']} | {_fmt(paper.get('recall'))} / "
                f"{_fmt(paper.get('clean_reject_rate'))} | {score} | {_fmt(s['auroc'])} | {curve} "
                f"| {_fmt(lf.get('recall'))} / {_fmt(lf.get('clean_reject_rate'))} |"
            )
    lines += [
        "",
        "Side by side with detectors from the field on the same BadNet and inputs (the first 500 clean inputs and "
        "500 attacks; STRIP with N = 32 superimpositions, the paper's 100 would cost 3× more; SCALE-UP data-free "
        "with n ∈ {3, 5, 7, 9, 11}; the two-model rule's row is over all the test inputs above); µs per input on "
        "this machine's CPU, batched:",
        "",
        "| case | detector | AUROC | recall at 1% clean reject | forward passes | µs per input |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        cost = r.get("rule_cost", {})
        for score in [k for k in ("kl", "logit_gap") if k in r["scores"]]:
            sc = r["scores"][score]
            at1 = (sc.get("recall_at_clean_reject") or {}).get("0.01")
            lines.append(f"| {r['name']} | two-model rule ({score}) | {_fmt(sc['auroc'])} | {_fmt(at1)} | 2 "
                         f"| {cost.get('us_per_input', 0):.0f} |")  # fmt: skip
        for name, b in (r.get("baselines") or {}).items():
            lines.append(f"| {r['name']} | {name} | {_fmt(b['auroc'])} | {_fmt(b['recall_at_1pct'])} "
                         f"| {b['forward_passes']} | {b['us_per_input']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def scores_section(data: dict[str, Any]) -> str:
    """Candidate reject scores side by side (bench/bench_scores.py)."""
    cases = data["cases"]
    names = list(dict.fromkeys(n for c in cases for n in c["scores"]))  # a score added later: its cases only
    lines = [
        "### Candidate reject scores (bench/bench_scores.py)",
        "",
        _machine(data["machine"]),
        "",
        "Each score's τ chosen as publishing chooses it (label-free, 1% budget, 0.9 bound on clean D_treat ∪ "
        "D_eval); recall over the attacks of 5,000 clean test inputs at that τ, per case; the last columns the "
        "worst case's recall and AUROC. Cases: " + "; ".join(f"({i + 1}) {c['case']}" for i, c in enumerate(cases)),
        "",
        "| score | " + " | ".join(f"({i + 1})" for i in range(len(cases))) + " | worst recall | worst AUROC |",
        "|---|" + "---|" * (len(cases) + 2),
    ]
    for n in names:
        cells = [c["scores"].get(n) for c in cases]
        rows = [r for r in cells if r is not None]
        of = "" if len(rows) == len(cases) else f" (of {len(rows)})"
        lines.append(
            f"| {n} | "
            + " | ".join("–" if r is None else _fmt(r["recall"], 3) for r in cells)
            + f" | **{_fmt(min(r['recall'] for r in rows), 3)}**{of} | {_fmt(min(r['auroc'] for r in rows), 4)} |"
        )
    if len(names) and any(len(c["scores"]) < len(names) for c in cases):
        lines += ["", "–: a case whose bundle was not at hand when that score was added (not measured)."]
    return "\n".join(lines) + "\n"


def purity_section(data: dict[str, Any]) -> str:
    """What each reject score hands the repair (bench/bench_purity.py)."""
    lines = [
        "### What the reject score hands the repair (bench/bench_purity.py)",
        "",
        _machine(data["machine"]),
        "",
        "Streams of 1,000 (seed 0) through each bundle under each score; the quarantine, the triggered inputs in it "
        "(evaluation: truth.json) and what `excess` purification keeps; where a repair ran (quick profile, from "
        "that CPD-0.1 quarantine), θ_repair's test CA / ASR and v2's served CA at its clean rejects.",
        "",
        "| case | score | CPD | quarantined | triggered caught | kept | kept purity | θ_repair CA / ASR | served v2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        rep = r.get("repair") or {}
        test, served = rep.get("test") or {}, rep.get("served_test") or {}
        lines.append(
            f"| {r['cell']} | {r['score']} | {r['cpd']:g} | {r['quarantined']} | {r['poisoned_caught']} / "
            f"{r['poisoned_streamed']} | {r['kept']} | {_fmt(r['kept_purity'], 3)} | "
            + (f"{test['clean_accuracy']:.4f} / {test['attack_success_rate']:.4f}" if test else "–")
            + " | "
            + (f"{served['served_clean_accuracy']:.4f} ({served['clean_reject_rate']:.2%})" if served else "–")
            + " |"
        )
    return "\n".join(lines) + "\n"


def _monitoring(m: dict[str, Any]) -> str:
    """One batch size's agent/bare ratio at the default durability, then the others (older runs: one ratio)."""
    text = f"**{m['ratio']:.2f}×** ({m['agent']:.0f} / {m['bare']:.0f})"
    if "round_ratios" in m:
        r = m["round_ratios"]
        text += f", rounds: median **{m['round_ratio_median']:.2f}×**, {min(r):.2f}-{max(r):.2f}"
    others = [f"{m[f'ratio_{d}']:.2f}×" for d in ("process", "power") if f"ratio_{d}" in m]
    if "collector_cores" in m:
        others.append(f"collector {m['collector_cores']:.3f} cores")
    return text + (f" ({', '.join(others)})" if others else "")


def cameras_section(data: dict[str, Any]) -> str:
    lines = [
        "## Camera sources",
        "",
        _machine(data["machine"]),
        "",
        f"{data['rows'][0]['frames']} Fashion-MNIST stream pictures (10% with the bundle's trigger: "
        + "; ".join(f"{r['name']} `{r['trigger']}`" for r in data["rows"])
        + ") "
        "upscaled to a 1280×720 H.264 file at 30 fps (Debian's ffmpeg, libx264). Through the agent: OpenCV "
        "decoding (the default decoder) in the source's thread, the bundle's preprocessing in the dynamic batcher's "
        "thread (since 2026-11-28; before, in the source's thread: 0.79× for project-cnn3), the fused ensemble, the "
        "spool as `nnoc-edge run` sets it up (durability `deferred`: group commits within 50 ms, the reply does not "
        "wait) and the uplink to a collector process. Monitoring: the agent against the bare ensemble at the "
        "stream's reject share, for each spool durability, in alternating rounds of 3 s: the best round of each "
        "(from 2026-12-06: of six rounds, then the median and range of each round's agent / bare of the same "
        "round: this machine's speed drifts between rounds by as much as the effect measured); the collector "
        "process, on the trainer's host in a deployment, shares these two cores (its CPU during the default "
        "agent's rounds is shown). Goals (issue 13): "
        "the agent ≥ 0.8× decoding alone; "
        "monitoring ≥ 0.9× the bare ensemble. Rows of different dates are not comparable with each other: this "
        "machine's speed varies from day to day (decoding alone 293 frames/s in one run, 661 in another).",
        "",
        "| bundle | decode alone / through the agent (frames/s) | 4 sources as fast as they decode: batched ≤ 8 / "
        "one at a time (frames/s) | 4 × 30 fps, capture→decision p50 / p99 ms: batched / one at a time "
        "| monitoring agent / bare, batch 1 and 8: deferred (process, power) | stream reject share (rule) |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        d, src, mon = r["decode"], r["sources"], r["monitoring"]
        b, o, b30, o30 = src["batched"], src["one_at_a_time"], src["batched_30fps"], src["one_at_a_time_30fps"]
        lines.append(
            f"| {r['name']} ({r.get('date', 'an earlier run')}) | {d['decode_fps']:.0f} / {d['agent_fps']:.0f} "
            f"(**{d['ratio']:.2f}×**) "
            f"| {b['fps']:.0f} / {o['fps']:.0f} ({src['throughput_ratio']:.2f}×; mean batch {b['mean_batch']:.1f}) "
            f"| {b30['latency_p50_ms']:.0f} / {b30['latency_p99_ms']:.0f} vs {o30['latency_p50_ms']:.0f} / "
            f"{o30['latency_p99_ms']:.0f} | {_monitoring(mon['batch1'])}; {_monitoring(mon['batch8'])} "
            f"| {mon['reject_share']:.3f} ({r.get('reject_rule', '?')}) |"
        )
    measured = [r for r in data["rows"] if "decoders" in r]
    if measured:
        lines += [
            "",
            "**Decoders.** The same file decoded alone and through the agent by each decoder: OpenCV (BGR frames, "
            "the default) and PyAV (`?decoder=pyav`: the decoder's YUV planes, converted only where the resize "
            "reads). CPU: process time of all the measuring process's threads per frame (the collector's process "
            "apart). Best of three alternating runs.",
            "",
            "| bundle | decoder | decode alone: frames/s (CPU ms per frame) | through the agent: frames/s (CPU ms "
            "per frame) | agent / decode alone (goal ≥ 0.8×) | agent / OpenCV decoding alone |",
            "|---|---|---|---|---|---|",
        ]
        for r in measured:
            cv = r["decoders"]["opencv"]["decode_fps"]
            for name, d in r["decoders"].items():
                lines.append(
                    f"| {r['name']} ({r.get('date', '')}) | {name} | {d['decode_fps']:.0f} ({d['decode_cpu_ms']:.2f}) "
                    f"| {d['agent_fps']:.0f} ({d['agent_cpu_ms']:.2f}) | **{d['ratio']:.2f}×** "
                    f"| {d['agent_fps'] / cv:.2f}× |"
                )
    return "\n".join(lines) + "\n"


def fleet_section(data: dict[str, Any]) -> str:
    rows = data["rows"]
    any_row = next(iter(rows.values()))
    lines = [
        "## Fleet at scale (issue 16)",
        "",
        _machine(data["machine"]),
        "",
        f"{any_row['subscribers']} Subscribe streams on one model-service process, opened by "
        f"{any_row['client_procs']} client processes over {any_row['channels_per_proc']} channels each (grpc.aio); "
        f"then a publish (the store's fleet.json changes; the watcher reads it every {any_row['watch_interval_s']} s). "
        "Resident memory of the service process from /proc, idle and with every stream open. The thread-per-stream "
        "server of earlier commits held 64 streams with its default 64 workers (agent 65 waited); it was measured "
        "here with 2,100 worker threads.",
        "",
        "| server | streams served | all subscribed (s) | publish → first / last notice (s) | RSS idle → open (MB) "
        "| KB per subscription |",
        "|---|---|---|---|---|---|",
    ]
    for label in ("before", "after"):
        r = rows.get(label)
        if r is None:
            continue
        lines.append(
            f"| {r.get('server', label)} | {r['received']} / {r['subscribers']} | {r['subscribe_all_s']:.2f} "
            f"| {r['publish_to_first_s']:.3f} / {r['publish_to_last_s']:.3f} | {r['rss_idle_mb']:.0f} → "
            f"{r['rss_open_mb']:.0f} | {r['kb_per_subscription']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def ray_section(data: dict[str, Any]) -> str:
    grid, jobs = data["grid"], data["jobs"]
    lines = [
        "## Training work on Ray (issue 17)",
        "",
        _machine(data["machine"]),
        "",
        f"**Grid.** Algorithm 1 on one checker4 BadNet (the tests' small split), γ {' '.join(data['gammas'])}, "
        f"{data['epochs']} epoch(s) per candidate, up to {data['max_rounds']} rounds: the whole `predeploy` command, "
        "serial (one process, torch's own 2 threads) against `--executor ray` (a local cluster the command starts, "
        "each round's candidates as tasks of 1 CPU: 2 workers).",
        "",
        "| executor | seconds | candidates | pick (α, γ, D_eval CA) |",
        "|---|---|---|---|",
    ]
    for name in ("serial", "ray"):
        row = grid[name]
        picked = "; ".join(", ".join(p) for p in row["picked"]) or "none"
        lines.append(f"| {name} | {row['seconds']:.1f} | {row['candidates']} | {picked} |")
    lines += [
        "",
        f"Speed-up {grid['speedup']:.2f}×; same pick: {'yes' if grid['same_pick'] else 'no'}.",
        "",
        f"**Job overhead.** The job runner's two backends on the same commands, from submit to outcome (the local Ray "
        f"cluster was started beforehand: {jobs['cluster_start_s']:.1f} s).",
        "",
        "| command | child process (s) | Ray task (s) | overhead (s) |",
        "|---|---|---|---|",
    ]
    for name in ("trivial", "tiny repair", "quick repair"):
        if f"local {name}" not in jobs:
            continue
        local, ray = jobs[f"local {name}"], jobs[f"ray {name}"]
        lines.append(
            f"| {name} | {local['seconds']:.2f} | {ray['seconds']:.2f} | {ray['seconds'] - local['seconds']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def gpu_section(data: dict[str, Any]) -> str:
    """The edge ensemble on a lent GPU against the CPU (bench/bench_gpu.py), with the run before the fp32 fix."""

    def table(rows: list[dict[str, Any]]) -> list[str]:
        out = [
            "| provider | path | batch 1 /s | batch 32 /s | batch 256 /s | labels = CPU | rejects = CPU "
            "| max score gap |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            rate = r["per_s"]
            out.append(
                f"| {r['setting']} | {r['served']} | {rate['1']:,.0f} | {rate['32']:,.0f} | {rate['256']:,.0f} | "
                f"{r['labels_equal_cpu']} | {r['rejected_equal_cpu']} | {r['score_max_gap']:.2g} |"
            )
        return out

    lines = [
        "## The edge on a GPU (bench/bench_gpu.py)",
        "",
        _machine(data["machine"]),
        "",
        f"onnxruntime {data['onnxruntime']}; {data['bundle']}; {data['inputs']:,} test images, decisions compared "
        "with the CPU's two sessions. `cuda` is the product's default (fp32), `cuda-tf32` onnxruntime's own.",
        "",
        *table(data["rows"]),
    ]
    first = data.get("first_run")
    if first:
        lines += ["", f"First run, {first['gpu']} ({first['note']}):", "", *table(first["rows"])]
    for name, text in data.get("tests", {}).items():
        lines += ["", f"- {name.replace('_', ' ')}: {text}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parts = [HEADER]

    def section(name: str, render: Any) -> None:
        path = RESULTS / f"{name}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            parts.append(render(data).rstrip("\n") + "\n\n" + provenance(name, data))

    section("predeploy", predeploy_section)
    section("cost", cost_section)
    section("steps", steps_section)
    for path in sorted(RESULTS.glob("repair-*.json")):
        data = json.loads(path.read_text())
        parts.append(repair_section(data, path.stem).rstrip("\n") + "\n\n" + provenance(path.stem, data))
    section("edge", edge_section)
    section("service", service_section)
    section("reliability", reliability_section)
    section("attacks", attacks_section)
    section("demo", demo_section)
    section("foreign", foreign_section)
    section("smallest", smallest_section)
    section("cyclegan-sizes", cyclegan_sizes_section)
    section("detect", detect_section)
    section("scores", scores_section)
    section("purity", purity_section)
    section("cameras", cameras_section)
    section("fleet", fleet_section)
    section("ray", ray_section)
    section("field", field_section)
    section("premise", premise_section)
    section("rounds", rounds_section)
    section("weak", weak_section)
    section("recipe", recipe_section)
    section("unlearn", unlearn_section)
    section("gpu", gpu_section)
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


def _test(rep: dict[str, Any] | None, key: str) -> tuple[Any, Any]:
    """(CA, ASR) of ``key`` in a report's ``test`` block."""
    t = ((rep or {}).get("test") or {}).get(key) or {}
    return t.get("clean_accuracy"), t.get("attack_success_rate")


def _pair(ca: Any, asr: Any) -> str:
    return f"{_fmt(ca, 3)} / {_fmt(asr, 3)}"


FIELD_METHODS = ("BadNet", "θ_aug", "θ_repair", "clean-ft", "fine-pruning", "neural-cleanse", "ft-sam", "fst")


def _field_methods(c: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """CA / ASR per method of one bench_field cell (None where not run)."""
    a, p = c.get("attack") or {}, (c.get("predeploy") or {}).get("selected") or {}
    return {
        "BadNet": (a.get("clean_accuracy"), a.get("attack_success_rate")),
        "θ_aug": (p.get("test_ca"), p.get("test_asr")),
        "θ_repair": _test(c.get("repair"), "repaired"),
        "clean-ft": _test(c.get("clean-ft"), "repaired"),
        "fine-pruning": _test(c.get("fine-pruning"), "defended"),
        "neural-cleanse": _test(c.get("neural-cleanse"), "defended"),
        "ft-sam": _test(c.get("ft-sam"), "defended"),
        "fst": _test(c.get("fst"), "defended"),
    }


def plot_field(cells: list[dict[str, Any]], path: Path) -> bool:
    """CA and ASR per method and trigger (bars), the paper's Table 3 as a picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in cells if c.get("repair")]
    if not cells:
        return False
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    width = 0.8 / len(FIELD_METHODS)
    for k, method in enumerate(FIELD_METHODS):
        vals = [_field_methods(c)[method] for c in cells]
        xs = [i + (k - len(FIELD_METHODS) / 2 + 0.5) * width for i in range(len(cells))]
        for row, idx in ((0, 0), (1, 1)):
            axes[row].bar(xs, [v[idx] if v[idx] is not None else 0 for v in vals], width, label=method)
    axes[0].set_ylabel("clean accuracy")
    axes[0].set_ylim(0.7, 0.95)
    axes[1].set_ylabel("attack success rate")
    axes[1].set_yscale("symlog", linthresh=0.01)
    axes[1].set_xticks(range(len(cells)), [f"{c['trigger']} (seed {c['seed']})" for c in cells])
    axes[0].legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _field_seeds(cells: list[dict[str, Any]]) -> list[str]:
    """Mean ± half-range of CA / ASR per method over the seeds of each trigger run with two or more."""
    by: dict[str, list[dict[str, tuple[Any, Any]]]] = {}
    bases: dict[str, list[str]] = {}  # θ_repair's base per seed: seeds repaired by different recipes are not pooled
    for c in cells:
        by.setdefault(c["trigger"], []).append(_field_methods(c))
        bases.setdefault(c["trigger"], []).append(_base(c.get("repair") or {}))
    multi = {t: ms for t, ms in by.items() if len(ms) >= 2}
    if not multi:
        return []

    def spread(values: list[Any]) -> str:
        v = [x for x in values if x is not None]
        if len(v) < 2:
            return _fmt(v[0] if v else None, 3)
        return f"{sum(v) / len(v):.3f} ± {(max(v) - min(v)) / 2:.3f}"

    head = "| trigger | seeds | " + " | ".join(FIELD_METHODS) + " |"
    lines = [
        "",
        "Across seeds (mean ± half the range), CA / ASR; θ_repair pooled over seeds repaired from the same base only:",
        "",
        head,
        "|---|---|" + "---|" * len(FIELD_METHODS),
    ]

    def pooled(ms: list[dict[str, tuple[Any, Any]]], k: str) -> str:
        return f"{spread([m[k][0] for m in ms])} / {spread([m[k][1] for m in ms])}"

    for t, ms in multi.items():
        row = [pooled(ms, k) for k in FIELD_METHODS]
        groups = {b: [m for m, mb in zip(ms, bases[t], strict=True) if mb == b] for b in bases[t]}
        if len(groups) > 1:
            row[FIELD_METHODS.index("θ_repair")] = "; ".join(
                f"{pooled(g, 'θ_repair')} ({b.strip(' ()')}, {len(g)} seed{'s' * (len(g) > 1)})"
                for b, g in groups.items()
            )
        lines.append(f"| `{t}` | {len(ms)} | " + " | ".join(row) + " |")
    return lines


def _base(rep: dict[str, Any]) -> str:
    """The model a repair report fine-tuned and how, as " (θ_bd, unlearned)", " (θ_aug, auto, CycleGAN)" ...
    (auto: chosen by the repair; reports older than the quarantine term were all CycleGAN repairs)."""
    cfg = rep.get("config") or {}
    asked, took = cfg.get("base"), (rep.get("repair_set") or {}).get("base")
    if not (took or asked):
        return ""
    gan, unlearned = cfg.get("learner", "cyclegan") == "cyclegan", bool(cfg.get("unlearn_quarantine"))
    how = " + ".join(w for w, on in (("CycleGAN", gan), ("unlearned", unlearned)) if on) or "clean"
    return f" (θ_{took}, auto, {how})" if asked == "auto" else f" (θ_{took or asked}, {how})"


def weak_section(data: dict[str, Any]) -> str:
    """Table 15's shape: repair from weak monitors (bench/bench_weak.py)."""
    rows = data["rows"]
    lines = [
        *_heading(
            "## Repair from a weak θ_aug (the paper's Table 15; issue 15)",
            rows,
            "`python -m bench.bench_weak`: a candidate of the field cell's Algorithm 1 grid chosen by its test ASR "
            "(evaluation only), trained again as a one-point grid and deployed as the monitor; streams of N = 1000 at "
            "the paper's CPDs; the CycleGAN repair (the model it fine-tuned in brackets: θ_aug before 1803bf9's "
            "defaults, θ_bd since) and clean fine-tuning of θ_aug from the same quarantine. Goal: repaired ASR ≤ 0.05 "
            "at a CA drop ≤ 0.03 where clean fine-tuning stays above 0.2. CA / ASR on the test set. "
            "Rule: the one the quarantine came from (v1's own, or v1's two models put under another "
            "score by `nnoc-trainer calibrate`); kept purity: share of the purified quarantine that was triggered "
            "(evaluation only).",
        ),
        "",
        "| trigger | seed | candidate α, γ | BadNet | θ_aug | rule | CPD | rejects / recall / kept purity | θ_repair "
        "| clean-ft |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sel = (r.get("predeploy") or {}).get("selected") or {}
        a = r.get("candidate") or {}
        bad = ((r.get("predeploy") or {}).get("baseline")) or {}
        for key in sorted(k for k in r if k.startswith("cpd")):
            x = r[key]
            st, pur = x.get("stream") or {}, x.get("purity") or {}
            rep, cft = x.get("repair") or {}, x.get("clean-ft") or {}
            why = f" ({rep['error'][:60]})" if rep.get("error") else ""
            rule = r.get("reject_score") or "kl (v1's)"
            lines.append(
                f"| `{r['trigger']}` | {r['seed']} | {a.get('alpha', 0):g}, {a.get('gamma', 0):g} "
                f"| {_pair(bad.get('clean_accuracy'), bad.get('attack_success_rate'))} "
                f"| {_pair(sel.get('test_ca'), sel.get('test_asr'))} | {rule} | {key[3:]} "
                f"| {st.get('rejected', '–')} / {_fmt(st.get('recall'), 2)} / {_fmt(pur.get('kept_purity'), 2)} "
                f"| {_pair(*_test(rep, 'repaired'))}{_base(rep)}{why} | {_pair(*_test(cft, 'repaired'))} |"
            )
    return "\n".join(lines) + "\n"


def recipe_section(data: dict[str, Any]) -> str:
    """The repair's fine-tuning recipes side by side on the field cells (bench/bench_recipe.py)."""
    cells = sorted(data["cells"], key=lambda c: (c["seed"], c["trigger"]))
    names = data["variants"]
    lines = [
        *_heading(
            "## The repair's fine-tuning recipe (issue 15's CA drop)",
            cells,
            "`python -m bench.bench_recipe`: on each field cell's CPD-0.1 quarantine (N = 1000) and one CycleGAN per "
            "cell (quick profile, reused), the model fine-tuned (θ_bd or θ_aug), the lr (held or annealed along a "
            "cosine, 5 epochs from the BadNet's 1e-3) and the learned trigger's strength (`--trigger-gain`; auto: the "
            "smallest of 1, 1.5, 2, 3 that θ_bd follows on 90% of G(D_treat), label-free), and clean fine-tuning of "
            "each base as the control; base auto: both fine-tuned, the one with the smaller sum of the share of "
            "purified quarantined inputs it still answers with the attacked label and the D_eval CA it gives up "
            "(label-free). Unlearn quarantine W: `--unlearn-quarantine W`, each purified quarantined input moved off "
            "the BadNet's answer to it while fine-tuning (−log(1 − p), no label taught), with the CycleGAN's images "
            "or without them (the default since 1a81fc1 (2026-11-28)). "
            "Test CA / ASR; **bold**: both goals met (ASR ≤ 0.01 at a CA drop ≤ 0.01 "
            "against the BadNet). Gain: the one the CycleGAN recipe took, and the share of G(D_treat) θ_bd "
            "followed at each gain tried.",
        ),
        "",
        "| trigger | seed | BadNet | " + " | ".join(names) + " | CycleGAN's gain (θ_bd followed) |",
        "|---|---|---|" + "---|" * (len(names) + 1),
    ]
    for c in cells:
        a = c["attack"]
        row = []
        for n in names:
            ca, asr = _test({"test": {"r": (c.get(n) or {}).get("test")}}, "r")
            text = _pair(ca, asr)
            met = None not in (ca, asr, a.get("clean_accuracy")) and asr <= 0.01 and a["clean_accuracy"] - ca <= 0.01
            row.append(f"**{text}**" if met else text)
        gan = next((n for n in names if n.startswith("CycleGAN (")), names[0])
        rs = (c.get(gan) or {}).get("repair_set") or {}
        follows = ", ".join(f"{g}: {v:.2f}" for g, v in (rs.get("bd_follows") or {}).items())
        lines.append(
            f"| `{c['trigger']}` | {c['seed']} | {_pair(a.get('clean_accuracy'), a.get('attack_success_rate'))} | "
            + " | ".join(row)
            + f" | {rs.get('trigger_gain', 0):g} ({follows}) |"
        )
    return "\n".join(lines) + "\n"


def unlearn_section(data: dict[str, Any]) -> str:
    """The quarantine unlearned where it is small or the monitor weak (bench/bench_unlearn.py)."""
    rows = data["rows"]
    names = data["variants"]
    lines = [
        *_heading(
            "## The quarantine unlearned: small quarantines, weak monitors, an adaptive attacker (issue 15)",
            rows,
            "`python -m bench.bench_unlearn`: the same quarantine repaired three ways (quick profile, "
            "`--next-monitor keep`): the CycleGAN (the default until 6ab4909 (2026-11-27)), the CycleGAN with "
            "`--unlearn-quarantine 1`, and the quarantine unlearned with no trigger learner (the default since "
            "1a81fc1, 2026-11-28). Cases: seed-0 field cells streamed at CPD 0.02 under `gap_or_kl` (about 20 "
            "triggered "
            "inputs in N = 1000), the adaptive attacker's cell, and checker4's weak monitors (Table 15: θ_aug "
            "test ASR 0.78 and 0.33) at CPD 0.5 and 0.2. Test CA / ASR (ASR to 4 places); quarantined → kept "
            "after purification.",
        ),
        "",
        "| case | quarantined → kept | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        first: dict[str, Any] = next((r[n] for n in names if r.get(n)), {})
        cells = []
        for n in names:
            v = r.get(n) or {}
            t = (v.get("test") or {}).get("repaired") or {}
            if not t and v.get("error"):  # refused: the one line the repair printed
                cells.append(f"exit {v.get('exit_code')}: {str(v['error']).split(';')[0]})")
                continue
            cells.append(f"{_fmt(t.get('clean_accuracy'), 3)} / {_fmt(t.get('attack_success_rate'), 4)}")
        lines.append(
            f"| {r['case']} | {first.get('quarantine_size') or '–'} → {first.get('purified_size') or '–'} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _v2_gap(d: dict[str, Any] | None) -> str:
    """v2's served CA, clean rejects and θ_repair's CA at logit_gap's label-free 1% point (detect-eval on v2)."""
    lf = (((d or {}).get("scores") or {}).get("logit_gap") or {}).get("label_free", {}).get("0.01")
    if not d or not lf:
        return "–"
    return (
        f"{_fmt(lf.get('served_clean_accuracy'), 3)} / {_fmt(lf.get('clean_reject_rate'))} "
        f"/ {_fmt(d.get('primary_clean_accuracy'), 3)}"
    )


RETUNED = (
    "badnet", "theta_aug", "theta_repair", "reset-channels", "reset-head", "clean-ft", "fine-pruning",
    "neural-cleanse", "ft-sam", "fst", "never-poisoned",
)  # fmt: skip


def _retune_lines(cells: list[dict[str, Any]]) -> list[str]:
    """The retuning attack per cell: test ASR before, and after re-tuning on 5 / 20 poisoned samples."""
    rows = [c for c in cells if c.get("retune")]
    if not rows:
        return []
    counts = rows[0]["retune"]["config"]["poisoned"]
    lines = [
        "",
        "**After the retuning attack** (Min et al., NeurIPS 2024; goal: θ_repair ASR ≤ 0.10 after 5 poisoned samples): "
        "each model fine-tuned for 5 epochs (its own optimizer and learning rate, batch 32) on "
        + " or ".join(str(k) for k in counts)
        + " of the attacker's poisoned training samples among 500 clean ones, the same set for every model; test CA / "
        "ASR before → ASR after each count. reset-channels / reset-head: `repair --reset trigger-channels` / "
        "`--reset head`. *never-poisoned*: a cnn3 of the attack's recipe that never saw the trigger (what "
        "the few samples teach from scratch).",
        "",
        "| cell | seed | " + " | ".join(RETUNED) + " |",
        "|---|---|" + "---|" * len(RETUNED),
    ]
    for c in rows:
        r = c["retune"]

        def asr(block: str, model: str, r: dict[str, Any] = r) -> str:
            return _fmt(((r.get(block) or {}).get(model) or {}).get("attack_success_rate"), 3)

        def ca(model: str, r: dict[str, Any] = r) -> str:
            return _fmt(((r.get("before") or {}).get(model) or {}).get("clean_accuracy"), 3)

        cols = [" → ".join([f"{ca(m)} / {asr('before', m)}", *(asr(f"after_{k}", m) for k in counts)]) for m in RETUNED]
        lines.append(f"| `{c['trigger']}` | {c['seed']} | " + " | ".join(cols) + " |")
    return lines


def field_section(data: dict[str, Any]) -> str:
    cells = sorted(data["cells"], key=lambda c: (c["seed"], c["trigger"]))
    lines = [
        *_heading(
            "## The defense against the field, per trigger (issues 14 and 15)",
            cells,
            "`python -m bench.bench_field`: per trigger and seed one BadNet (the attack's defaults: cnn3, 3-step, "
            "10% poisoning, target 0), Algorithm 1 (3 epochs per candidate, up to 3 α rounds), the bundle's rule as a "
            "detector (`detect-eval`, 5,000 clean test inputs; τ chosen label-free "
            "at the default 1% budget: clean D_treat ∪ D_eval, 0.9-confidence bound), a "
            "stream at CPD 0.1 (N = 1000) and, on the same BadNet and clean data (D_treat to fine-tune, D_eval to "
            "stop or gate), the repair (quick profile) and the field's post-training defenses. Triggers: `checker4` "
            "(random place), `square:4` (bottom right), `paste` (a 5×5 ring glyph made by the bench at row 3, column "
            "19) and `blend` (a uniform-noise picture made by the bench, opacity 0.15).",
        ),
        "",
        "**Detection** (goal: AUROC ≥ 0.99 and recall ≥ 0.95 at ≤ 1% clean rejects; v1 served CA within 0.02 of "
        "the BadNet's):",
        "",
        "| trigger | seed | attacks | paper rule: recall / clean rejects | score | AUROC | recall at 1% (curve) "
        "| label-free 1%: recall / clean rejects | served CA v1 / BadNet | STRIP AUROC / recall at 1% "
        "| SCALE-UP AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        d = c.get("detect")
        if not d or "scores" not in d:
            continue
        paper = d["scores"]["disagree"]
        base = d.get("baselines") or {}
        strip, scale = base.get("strip") or {}, base.get("scale_up") or {}
        for score in [k for k in ("gap_or_kl", "logit_gap", "kl") if k in d["scores"]]:  # the default first
            sc = d["scores"][score]
            # τ as publishing chooses it today (for bundles made before a calibration change, not their own τ)
            lf = (sc.get("label_free") or {}).get("0.01") or {
                "recall": d.get("recall"),
                "clean_reject_rate": d.get("clean_reject_rate"),
            }
            # served CA at that point (older reports: only at the bundle's own rule)
            own = score == (d.get("rule") or {}).get("score")
            served = lf.get("served_clean_accuracy", d.get("served_clean_accuracy") if own else None)
            lines.append(
                f"| `{c['trigger']}` | {c['seed']} | {d['attacks']} "
                f"| {_pair(paper.get('recall'), paper.get('clean_reject_rate'))} | {score} "
                f"| {_fmt(sc['auroc'])} | {_fmt((sc.get('recall_at_clean_reject') or {}).get('0.01'))} "
                f"| {_fmt(lf.get('recall'), 3)} / {_fmt(lf.get('clean_reject_rate'))} "
                f"| {_pair(served, d.get('primary_clean_accuracy'))} "
                f"| {_pair(strip.get('auroc'), strip.get('recall_at_1pct'))} | {_fmt(scale.get('auroc'), 3)} |"
            )
    lines += [
        "",
        "**Repair against the field**, test CA / ASR (the paper's Table 3 in shape; goal: θ_repair ASR ≤ 0.01 at a "
        "CA drop ≤ 0.01 against the BadNet, and not worse than clean fine-tuning). Stream: rejects, recall, and "
        "the purity of what the repair learned from (evaluation only); v2 served: what the fleet serves "
        "with θ_repair and its monitor (refreshed; answered and right / all, and clean rejects; τ since a501ae4 "
        "(2026-11-28) "
        "the higher of D_treat ∪ D_eval's and D_eval's alone, `--calibration-set higher`). θ_repair: the "
        "repair's defaults when the cell was repaired (the CycleGAN until 6ab4909, 2026-11-27, the quarantine "
        "unlearned "
        "since then).",
        "",
        "| trigger | seed | " + " | ".join(FIELD_METHODS) + " | stream rejects / recall / kept purity "
        "| v2 served CA / clean rejects | v2 under logit_gap: served CA / clean rejects / θ_repair CA "
        "| NC: flagged (target's anomaly index) | FP: pruned |",
        "|---|---|" + "---|" * (len(FIELD_METHODS) + 5),
    ]
    for c in cells:
        m = _field_methods(c)
        s, pur = c.get("stream") or {}, c.get("purity") or {}
        served = (c.get("repair") or {}).get("served_test") or {}
        nc = ((c.get("neural-cleanse") or {}).get("details")) or {}
        fp = ((c.get("fine-pruning") or {}).get("details")) or {}
        ai = nc.get("anomaly_index")
        lines.append(
            f"| `{c['trigger']}` | {c['seed']} | "
            + " | ".join(
                _pair(*m[k]) + (_base(c.get("repair") or {}) if k == "θ_repair" else "") for k in FIELD_METHODS
            )
            + f" | {s.get('rejected', '–')} / {_fmt(s.get('recall'), 2)} / {_fmt(pur.get('kept_purity'), 2)} "
            f"| {_pair(served.get('served_clean_accuracy'), served.get('clean_reject_rate'))} "
            f"| {_v2_gap(c.get('detect-v2'))} "
            f"| {nc.get('flagged', '–')} ({_fmt(ai[0] if ai else None, 2)}) "
            f"| {fp.get('pruned', '–')} of {fp.get('channels', '–')} |"
        )
    lines += _field_seeds(cells)
    lines += _retune_lines(cells)
    if plot_field(cells, RESULTS / "field-methods.png"):
        lines += ["", "![CA and ASR per method and trigger](bench/results/field-methods.png)"]
    for png in sorted(RESULTS.glob("tsne-*.png")):  # bench_tsne: the paper's Fig. 10 analogue
        lines += ["", f"![t-SNE of penultimate features, {png.stem[5:]}](bench/results/{png.name})"]
    return "\n".join(lines) + "\n"


def rounds_section(data: dict[str, Any]) -> str:
    lines = [
        "## Two backdoors, two rounds; v2's monitor three ways (issues 14 and 15)",
        "",
        _machine(data["machine"]),
        "",
        "`python -m bench.bench_rounds`: one BadNet with two independent backdoors (checker4 → 0, the bench's "
        "second trigger → 4: the ring glyph pasted, or the noise blend at opacity 0.15; 10% of the training set "
        "each). Round 1 streams checker4 only (CPD 0.1, N = 1000) and "
        "repairs into v2; v2's monitor is chosen three ways from the same θ_repair. Round 2 streams the second "
        "trigger through v2 (keep) and repairs v2's primary into v3. The repair's recipe is named after each "
        "version (runs without one predate 1a81fc1, 2026-11-28, and were CycleGAN repairs of θ_aug). Detection: "
        "the bundle's "
        "own rule (label-free τ) on 5,000 clean test inputs against the triggered inputs its primary sends to the "
        "target.",
        "",
        "| version | monitor | primary test CA | ASR checker4 | ASR second | served CA / clean rejects "
        "| rule recall checker4 | rule recall second (AUROC) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        a = r.get("attack") or {}
        v1 = r.get("v1") or {}
        sel = (r.get("predeploy") or {}).get("served_test") or {}
        name = {"paste": "glyph", "blend": "noise blend"}.get(r.get("second_name", "paste"), "?")
        weak = ""
        if r.get("weak_second") is not None:
            kept = (v1.get("monitor_second_asr") or {}).get("attack_success_rate")
            weak = f", a weak θ_aug that keeps it: ASR {_fmt(kept, 3)}, the grid's pick nearest {r['weak_second']:g}"
        lines.append(f"| **second backdoor: {name}** (seed {r.get('seed')}{weak}) | | | | | | | |")
        lines.append(
            f"| v1 (BadNet) | θ_aug | {_fmt(a.get('clean_accuracy'), 3)} | {_fmt(a.get('attack_success_rate'), 3)} "
            f"| {_fmt(a.get('second_attack_success_rate'), 3)} "
            f"| {_pair(sel.get('served_clean_accuracy'), sel.get('clean_reject_rate'))} "
            f"| {_fmt((v1.get('first') or {}).get('recall'), 3)} | {_fmt((v1.get('second') or {}).get('recall'), 3)} "
            f"({_fmt((v1.get('second') or {}).get('auroc'), 3)}) |"
        )
        for choice, row in (r.get("v2") or {}).items():
            rep = row.get("repair") or {}
            ca, asr1 = _test(rep, "repaired")
            served = rep.get("served_test") or {}
            lines.append(
                f"| v2{_base(rep)} | {row.get('monitor', choice)} | {_fmt(ca, 3)} | {_fmt(asr1, 3)} "
                f"| {_fmt((row.get('primary_second_asr') or {}).get('attack_success_rate'), 3)} "
                f"| {_pair(served.get('served_clean_accuracy'), served.get('clean_reject_rate'))} "
                f"| {_fmt((row.get('first') or {}).get('recall'), 3)} "
                f"| {_fmt((row.get('second') or {}).get('recall'), 3)} "
                f"({_fmt((row.get('second') or {}).get('auroc'), 3)}) |"
            )
        v3 = r.get("v3") or {}
        rep3 = v3.get("repair") or {}
        ca3, _ = _test(rep3, "repaired")
        served3 = rep3.get("served_test") or {}
        s2 = r.get("stream2") or {}
        if s2:
            lines.append(
                f"| round 2 stream through v2 (keep), N = {r.get('n2', 1000)} | – | – | – | – | – | – "
                f"| {s2.get('rejected')} rejects, recall "
                f"{_fmt(s2.get('recall'), 2)}, the second trigger's success through the ensemble "
                f"{_fmt(s2.get('attack_success_through_ensemble'), 3)} |"
            )
        if rep3.get("error"):
            lines.append(f"| v3 | – | repair refused: {rep3['error']} | | | | | |")
        elif rep3:
            lines.append(
                f"| v3{_base(rep3)}"
                f"{' + round 1 unlearned again' if (rep3.get('repair_set') or {}).get('unlearned_earlier') else ''} "
                f"| {(rep3.get('config') or {}).get('next_monitor', 'θ_aug')} | {_fmt(ca3, 3)} "
                f"| {_fmt((v3.get('primary_first_asr') or {}).get('attack_success_rate'), 3)} "
                f"| {_fmt((v3.get('primary_second_asr_vs_badnet') or {}).get('attack_success_rate'), 3)} "
                f"| {_pair(served3.get('served_clean_accuracy'), served3.get('clean_reject_rate'))} "
                f"| {_fmt((v3.get('first') or {}).get('recall'), 3)} | – |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
