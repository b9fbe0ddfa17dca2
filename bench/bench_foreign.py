"""Foreign models: BadNets this project did not train (bench/outsider_badnet.py, plain torch, their own trigger
and target, 3x32x32 normalised RGB), defended only through the CLI with the preprocessing block they came with.

Per model: predeploy (the heuristic reads D_eval only) -> stream at CPD 0.1, N = 1000 -> repair (quick
profile) -> the numbers against the issue's targets: θ_aug ASR <= 0.10 at CA drop <= 0.05, θ_repair
ASR <= 0.03 at CA drop <= 0.03 (CA drop against the BadNet's test CA).

    python -m bench.bench_foreign [--archs resnet18 resnet-small]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from bench.bench_field import stage
from bench.common import RESULTS, ROOT, machine, run_cli, save

OUT = ROOT / "runs" / "bench-foreign"
DATA = ["--valid-size", "5000", "--stream-size", "2000", "--test-size", "5000"]


def defend(arch: str, rounds: int, epochs: int, reuse: bool = False) -> dict[str, Any]:
    """Make the outsider's BadNet, then defend it through the CLI; every step's seconds and numbers.

    ``reuse``: keep the BadNet and the predeploy run already under ``runs/bench-foreign/ARCH`` (its report.json and
    predeploy.json) and stream and repair again, e.g. after the repair's default changed."""
    out = OUT / arch
    t = time.monotonic()
    if not (reuse and (out / "report.json").is_file()):
        subprocess.run([sys.executable, "-m", "bench.outsider_badnet", "--arch", arch, "--out", str(out)],
                       check=True, cwd=ROOT)  # fmt: skip
        (out / "predeploy.json").unlink(missing_ok=True)
        made = json.loads((out / "report.json").read_text()) | {"seconds": round(time.monotonic() - t, 1)}
        (out / "report.json").write_text(json.dumps(made, indent=1) + "\n")
    made = json.loads((out / "report.json").read_text())
    trigger = (out / "trigger.txt").read_text().strip()
    door = ["--model", str(out / "model.onnx"), "--preprocess", str(out / "preprocess.json")]
    evaluation = ["--eval-trigger", trigger, "--target", "7"]
    pd = stage(out / "predeploy.json", lambda: run_cli(
        "predeploy", *door, "--out", str(out / "predeploy"), *evaluation, *DATA, "--max-rounds", str(rounds),
        "--epochs", str(epochs)))  # fmt: skip
    pd_seconds = pd["seconds"]
    result: dict[str, Any] = {"arch": arch, "outsider": made, "trigger": trigger, "predeploy_seconds": pd_seconds}
    if pd.get("exit_code", 0) != 0:  # a stored predeploy report (--reuse) has no exit code: it was published
        result["error"] = pd.get("error")
        return result
    base, pick = pd["baseline"], pd["selected"]
    result["badnet"] = {"clean_accuracy": base["clean_accuracy"], "attack_success_rate": base["attack_success_rate"]}
    result["theta_aug"] = {
        "clean_accuracy": pick["test_ca"],
        "attack_success_rate": pick["test_asr"],
        "alpha": pick["alpha"],
        "gamma": pick["gamma"],
        "candidates": len(pd["candidates"]),
    }
    result["primary_parity"] = pd["primary_parity"]
    bundle = out / "predeploy" / "bundle"
    t = time.monotonic()
    st = run_cli("stream", "--bundle", str(bundle), "--trigger", trigger, "--target", "7", "--cpd", "0.1",
                 "--n", "1000", "--out", str(out / "quarantine"), *DATA)  # fmt: skip
    result["stream"] = {k: st.get(k) for k in ("rejected", "precision", "recall", "clean_reject_rate")}
    rep = run_cli("repair", "--bundle", str(bundle), "--quarantine", str(out / "quarantine"), "--out",
                  str(out / "repair"), "--profile", "quick", *evaluation, *DATA)  # fmt: skip
    result["repair_seconds"] = round(time.monotonic() - t, 1)
    if "test" in rep:
        result["theta_repair"] = rep["test"]["repaired"]
    result["repair"] = {k: rep.get(k) for k in ("config", "repair_set", "served_test", "reject_rule")}
    result["repair_published"] = rep["exit_code"] == 0
    result["repair_error"] = rep.get("error")
    bd_ca = result["badnet"]["clean_accuracy"]
    aug, repd = result["theta_aug"], result.get("theta_repair") or {}
    result["targets"] = {
        "theta_aug_asr_le_0.10": aug["attack_success_rate"] <= 0.10,
        "theta_aug_ca_drop_le_0.05": bd_ca - aug["clean_accuracy"] <= 0.05,
        "repair_asr_le_0.03": bool(repd) and repd["attack_success_rate"] <= 0.03,
        "repair_ca_drop_le_0.03": bool(repd) and bd_ca - repd["clean_accuracy"] <= 0.03,
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--archs", nargs="+", default=["resnet18", "resnet-small"])
    ap.add_argument("--rounds", type=int, default=2, help="predeploy α rounds")
    ap.add_argument("--epochs", type=int, default=3, help="predeploy fine-tuning epochs per candidate")
    ap.add_argument("--reuse", action="store_true",
                    help="keep each model's BadNet and θ_aug from an earlier run; stream and repair again")  # fmt: skip
    args = ap.parse_args()
    # Rows of models not run this time are kept (each model takes about an hour here): one report for all.
    path = RESULTS / "foreign.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    for arch in args.archs:
        row = defend(arch, args.rounds, args.epochs, args.reuse)
        row["machine"] = machine()
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if r["arch"] != arch] + [row]
        save("foreign", {"rows": rows, "rounds": args.rounds, "epochs": args.epochs})


if __name__ == "__main__":
    main()
