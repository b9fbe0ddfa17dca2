"""Training work on Ray against this machine's serial path (issue 17), side by side in one run.

grid: Algorithm 1 on one BadNet (checker4, the tests' small split) with the same grid twice: serial in one process
(torch's own threads: 2 here) and ``--executor ray`` (a local cluster the command starts; each round's candidates as
tasks of 1 CPU: 2 workers on 2 cores). Wall time of the whole predeploy command, and whether both picked the same
candidate (with different threads per candidate the numbers may differ in the last digits).

job: the overhead of a job on Ray against a child process: a trivial command (python -c pass), the tests' tiny repair
and a quick-profile repair (the job runner's default) on the predeploy output, each through the local backend and
through the Ray backend of the job runner (a local cluster, already up: its start is counted apart; the task asks
for both CPUs, so the repair trains on two threads on both backends). Time from submit until the outcome.

Usage: python -m bench.bench_ray [--gammas 0.2 0.4 0.6 0.8] [--epochs 2] [--max-rounds 2]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import run_cli, save

SPLIT = ["--dataset", "fashion-mnist", "--valid-size", "1000", "--stream-size", "500"]
SPLIT += ["--train-size", "8000", "--test-size", "2000"]
REPAIRS = {  # the tests' tiny repair, and the job runner's default profile (both on the small split)
    "tiny": ["--gan-epochs", "2", "--gan-epochs-decay", "1", "--gan-width", "8", "--gan-blocks", "2",
             "--clean-domain", "100", "--epochs", "1", "--max-ca-drop", "0.3", "--min-quarantine", "5"],
    "quick": ["--profile", "quick", "--max-ca-drop", "0.3", "--min-quarantine", "5"],
}  # fmt: skip


def _picked(out: Path) -> list[tuple[str, str, str]]:
    with (out / "candidates.csv").open() as f:
        return [(r["alpha"], r["gamma"], r["eval_ca"]) for r in csv.DictReader(f) if r["selected"] == "1"]


def bench_grid(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    run_cli("attack", *SPLIT, "--trigger", "checker4", "--target", "0", "--epochs", "2", "--clean-epochs", "1",
            "--out", str(work / "badnet"))  # fmt: skip
    common = [*SPLIT, "--model", str(work / "badnet" / "model.pt"), "--gammas", *args.gammas, "--epochs",
              str(args.epochs), "--max-rounds", str(args.max_rounds)]  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    for name, extra in (("serial", []), ("ray", ["--executor", "ray", "--ray-address", "local", "--task-cpus", "1"])):
        t0 = time.monotonic()
        report = run_cli("predeploy", *common, *extra, "--out", str(work / name))
        if report["exit_code"] != 0:
            raise RuntimeError(f"predeploy ({name}) exited {report['exit_code']}: {report}")
        with (work / name / "candidates.csv").open() as f:
            count = sum(1 for _ in csv.DictReader(f))
        rows[name] = {"seconds": time.monotonic() - t0, "candidates": count, "picked": _picked(work / name)}
        print(f"grid {name}: {rows[name]}", flush=True)
    return {**rows, "speedup": rows["serial"]["seconds"] / rows["ray"]["seconds"],
            "same_pick": rows["serial"]["picked"] == rows["ray"]["picked"]}  # fmt: skip


def _until_done(backend: Any, handle: Any) -> Any:
    while isinstance(state := backend.state(handle), str):
        time.sleep(0.05)
    return state


def bench_jobs(work: Path, repairs: list[str]) -> dict[str, Any]:
    import ray

    from trainer.service.backends import LocalBackend, RayBackend

    stream = work / "q"
    run_cli("stream", *SPLIT, "--bundle", str(work / "serial" / "bundle"), "--trigger", "checker4", "--target", "0",
            "--cpd", "0.2", "--n", "300", "--out", str(stream))  # fmt: skip
    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cluster_start = time.monotonic() - t0
    commands = {"trivial": [sys.executable, "-c", "pass"]}
    bundle = str(work / "serial" / "bundle")
    for name in repairs:
        repair = ["repair", *SPLIT, *REPAIRS[name], "--bundle", bundle, "--quarantine", str(stream), "--quiet"]
        commands[f"{name} repair"] = [sys.executable, "-m", "trainer", *repair]
    rows: dict[str, Any] = {"cluster_start_s": cluster_start}
    try:
        # the Ray task gets the machine's two CPUs, as the child process has: Ray sets the task's OMP_NUM_THREADS to
        # them, so the repair trains on as many threads on both backends
        for backend in (LocalBackend(), RayBackend(cpus=2)):
            for name, cmd in commands.items():
                out = work / f"job-{backend.name}-{name.replace(' ', '-')}"
                out.mkdir()
                full = [*cmd, "--out", str(out / "run")] if name != "trivial" else cmd
                t = time.monotonic()
                outcome = _until_done(backend, backend.start(name, full, out / "log"))
                rows[f"{backend.name} {name}"] = {"seconds": time.monotonic() - t, "code": outcome.code}
                print(f"job {backend.name} {name}: {rows[f'{backend.name} {name}']}", flush=True)
    finally:
        ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gammas", nargs="+", default=["0.2", "0.4", "0.6", "0.8"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-rounds", type=int, default=2)
    ap.add_argument("--repairs", nargs="+", choices=tuple(REPAIRS), default=list(REPAIRS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        grid = bench_grid(work, args)
        jobs = bench_jobs(work, args.repairs)
    save("ray", {"grid": grid, "jobs": jobs, "gammas": args.gammas, "epochs": args.epochs,
                 "max_rounds": args.max_rounds})  # fmt: skip


if __name__ == "__main__":
    main()
