"""``predeploy --executor ray``: Algorithm 1's candidates of a round as parallel Ray tasks (a local cluster the
command starts) train the same models as the serial run with the same threads per candidate: the same D_eval
CA for every candidate and the same pick."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from conftest import SMALL_SPLIT, run_cli


def test_the_ray_grid_picks_what_the_serial_grid_picks(badnet: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    common = [*SMALL_SPLIT, "--model", str(badnet[0] / "model.pt"), "--gammas", "0.3", "0.6", "--epochs", "1",
              "--max-rounds", "2", "--precision", "fp32", "--quiet"]  # fmt: skip
    _, serial, _ = run_cli("trainer", "predeploy", *common, "--threads", "1", "--out", str(tmp_path / "serial"))
    _, parallel, err = run_cli("trainer", "predeploy", *common, "--executor", "ray", "--ray-address", "local",
                               "--task-cpus", "1", "--out", str(tmp_path / "ray"))  # fmt: skip
    assert serial is not None and parallel is not None, err[-2000:]
    assert (serial["executor"], parallel["executor"]) == ("serial", "ray")

    def table(run: str) -> list[tuple[str, str, str, str]]:
        with (tmp_path / run / "candidates.csv").open() as f:
            return [(r["alpha"], r["gamma"], r["eval_ca"], r["selected"]) for r in csv.DictReader(f)]

    assert len(table("serial")) >= 2
    assert table("ray") == table("serial")  # same candidates, same D_eval CA (4 digits), same pick
