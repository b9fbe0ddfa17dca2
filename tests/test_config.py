"""Config has one source per command: the dataclass fields are the flags, a TOML file gives their defaults (an
explicit flag wins), and a repair job gets its settings as a file the repair command reads back."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import tomllib

from edge_agent.options import add_flags, flag, from_args


def test_flags_come_from_the_fields_and_build_them_back() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Settings:
        name: str = flag("cam", "a name")
        size: int = flag(3, "a size", type=int)
        on: bool = flag(True, "turn it off", name="--off")
        tags: tuple[str, ...] = flag((), "a tag (repeat)", name="--tag", action="append")
        hidden: float = 0.5  # no flag

    parser = argparse.ArgumentParser()
    add_flags(parser, Settings)
    assert from_args(Settings, parser.parse_args([])) == Settings()  # one default, on the field
    got = from_args(Settings, parser.parse_args(["--size", "5", "--off", "--tag", "a", "--tag", "b"]), hidden=0.1)
    assert got == Settings(size=5, on=False, tags=("a", "b"), hidden=0.1)
    assert "(default 3)" in parser.format_help() and "--hidden" not in parser.format_help()
    with pytest.raises(ValueError, match="two flags would set 'name'"):
        add_flags(parser, Settings)


def test_serve_and_run_configs_default_to_their_dataclasses() -> None:
    from edge_agent.app import RunConfig
    from edge_agent.cli import build_parser as edge_parser
    from edge_agent.runtime import RuntimeConfig
    from trainer.cli import build_parser, serve_config
    from trainer.service.serve import ServeConfig

    args = build_parser(only="serve").parse_args(["serve", "--insecure"])
    cfg = serve_config(args)
    assert cfg.collector == ServeConfig().collector and cfg.service == ServeConfig().service
    assert (cfg.store, cfg.state_dir, cfg.policy.min_quarantine, cfg.policy.enabled) == (
        ServeConfig().store,
        ServeConfig().state_dir,
        200,
        True,
    )
    assert cfg.policy.repair_config == {}  # no data named: each fleet's repair reads its own model card's
    named = serve_config(build_parser(only="serve").parse_args(["serve", "--insecure", "--dataset", "fashion-mnist"]))
    assert named.policy.repair_config["harness"]["name"] == "fashion-mnist"  # the data flags travel to the jobs
    run = edge_parser().parse_args(["run", "--device-id", "cam-1", "--fleet", "f"])
    assert from_args(RunConfig, run, runtime=from_args(RuntimeConfig, run)) == RunConfig("cam-1", "f")


def test_a_repair_job_reads_the_spec_the_runner_wrote(tmp_path: Path) -> None:
    from conftest import tiny_store
    from trainer.cli import build_parser, parse_args, serve_config
    from trainer.service.jobs import JobRunner
    from trainer.service.registry import Registry
    from trainer.stages.repair import RepairSpec

    config = tmp_path / "serve.toml"
    config.write_text(
        'no-jobs = true\ndataset = "fashion-mnist"\nimage-size = "32x32"\nvalid-size = 600\n'
        'repair-profile = "standard"\n'
    )
    shared = tmp_path / "jobs.toml"  # what every job starts from: a repair spec, tables by part
    shared.write_text("[repair]\nepochs = 2\n\n[repair.gan]\nwidth = 8\n\n[split]\nseed = 3\n")
    argv = ["serve", "--config", str(config), "--insecure", "--repair-spec", str(shared), "--split-seed", "7"]
    cfg = serve_config(parse_args(build_parser(only="serve"), argv))
    assert (cfg.policy.enabled, cfg.policy.repair_profile) == (False, "standard")  # no-jobs = true: off
    registry = Registry(tmp_path / "registry.sqlite")
    runner = JobRunner(tiny_store(tmp_path / "store", "cams"), registry, tmp_path / "q", tmp_path / "jobs", cfg.policy)
    (tmp_path / "job").mkdir()
    cmd = runner.repair_command("cams", 1, tmp_path / "job")
    assert cmd[cmd.index("repair") + 1] == "--spec"  # no flags strung together: one spec file
    # v1 made by an earlier repair job: the next repair unlearns again what that one unlearned
    made = registry.add_job("cams", 0, "test", 300)
    (tmp_path / "earlier" / "run").mkdir(parents=True)
    (tmp_path / "earlier" / "run" / "report.json").write_text("{}")
    registry.update_job(made.id, "published", version=1, out_dir=str(tmp_path / "earlier"))
    (tmp_path / "job2").mkdir()
    cmd2 = runner.repair_command("cams", 1, tmp_path / "job2")
    registry.close()
    written = tomllib.loads((tmp_path / "job" / "job.toml").read_text())
    assert written["version"] == 2 and written["quarantine"].endswith("cams/1")
    assert written["harness"]["image_size"] == "32x32" and "unlearn_earlier" not in written
    spec2 = from_args(RepairSpec, parse_args(build_parser(only="repair"), cmd2[cmd2.index("repair") :]))
    assert spec2.unlearn_earlier == (tmp_path / "earlier" / "run",)
    spec = from_args(RepairSpec, parse_args(build_parser(only="repair"), cmd[cmd.index("repair") :]))
    assert spec.unlearn_earlier == ()
    assert spec.bundle == tmp_path / "store" / "cams" / "1" / "bundle"
    assert (spec.harness.image_size, spec.split.valid, spec.split.seed, spec.profile) == ((32, 32), 600, 7, "standard")
    # the shared spec's sizes over the profile's; serve's own data flags over the shared spec's
    assert (spec.repair.epochs, spec.repair.gan.width, spec.repair.gan.epochs) == (2, 8, 60)


def test_a_spec_is_one_object_its_flags_and_its_file_agree_on(tmp_path: Path) -> None:
    """A stage's spec built from flags, written as TOML and read back with --spec is the same object; the profile
    fills the CycleGAN's sizes under it; one name per knob (the field, its flag, its key)."""
    from edge_agent.options import spec_toml
    from trainer.cli import build_parser, parse_args
    from trainer.stages.predeploy import PredeploySpec
    from trainer.stages.profiles import REPAIR_PROFILES
    from trainer.stages.repair import RepairSpec

    argv = ["repair", "--bundle", "b", "--quarantine", "q", "--out", str(tmp_path / "o"), "--data", "photos",
            "--profile", "quick", "--gan-width", "8", "--clean-reject-budget", "0.02", "--unlearn-earlier", "e1",
            "--eval-trigger", "checker4", "--target", "0", "--learner", "cyclegan"]  # fmt: skip
    spec = from_args(RepairSpec, parse_args(build_parser(only="repair"), argv))
    quick = REPAIR_PROFILES["quick"]["gan"]
    assert (spec.repair.gan.width, spec.repair.gan.epochs, spec.repair.gan.patience) == (8, quick["epochs"], 15)
    assert spec.rule.given() == {"clean_reject_budget": 0.02} and spec.data.path == Path("photos")
    text = spec_toml(spec)
    assert "[repair.gan]\nwidth = 8" in text and "ngf" not in text and "gan_width" not in text
    (tmp_path / "r.toml").write_text(text)
    back = parse_args(build_parser(only="repair"), ["repair", "--spec", str(tmp_path / "r.toml")])
    assert from_args(RepairSpec, back) == spec
    # an explicit flag wins over the file; the file over the profile
    again = parse_args(build_parser(only="repair"), ["repair", "--spec", str(tmp_path / "r.toml"), "--gan-width", "4"])
    assert from_args(RepairSpec, again).repair.gan.width == 4

    argv = ["predeploy", "--model", "m.onnx", "--out", str(tmp_path / "pd"), "--data", "photos", "--gammas", "0.1",
            "0.3", "--noise-mode", "pixel", "--clean-reject-budget", "0.02", "--executor", "ray"]  # fmt: skip
    pd = from_args(PredeploySpec, parse_args(build_parser(only="predeploy"), argv))
    assert (pd.treat.gammas, pd.treat.reject.clean_reject_budget, pd.executor.executor) == ((0.1, 0.3), 0.02, "ray")
    (tmp_path / "p.toml").write_text(spec_toml(pd))
    assert "[treat.reject]" in (tmp_path / "p.toml").read_text()
    back = parse_args(build_parser(only="predeploy"), ["predeploy", "--spec", str(tmp_path / "p.toml")])
    assert from_args(PredeploySpec, back) == pd
    (tmp_path / "bad.toml").write_text("[treat]\nmax_round = 3\n")
    with pytest.raises(ValueError, match=r"unknown key treat.max_round; keys there: .*max_rounds"):
        parse_args(build_parser(only="predeploy"), ["predeploy", "--spec", str(tmp_path / "bad.toml")])


def test_a_config_file_error_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.cli import main

    (tmp_path / "r.toml").write_text("bundle = 3\nshape = 1\n")
    logging.getLogger().handlers.clear()
    assert main(["repair", "--config", str(tmp_path / "r.toml"), "--json"]) == 2
    assert "unknown keys ['shape']" in capsys.readouterr().out


def test_help_fits_a_screen_and_help_all_shows_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent.cli import main as edge_main
    from trainer.cli import main

    for argv, tool in ((["predeploy"], main), (["serve"], main), (["run"], edge_main)):
        with pytest.raises(SystemExit):
            tool([*argv, "--help"])
        short = capsys.readouterr().out
        with pytest.raises(SystemExit):
            tool([*argv, "--help-all"])
        full = capsys.readouterr().out
        assert "--help-all" in short and "more flags" in short and "more flags" not in full
        assert short.count("\n  --") < full.count("\n  --") / 2, argv


def test_edge_run_reads_a_config_with_tables_and_a_flag_wins(tmp_path: Path) -> None:
    from edge_agent.app import RunConfig
    from edge_agent.cli import build_parser
    from edge_agent.options import config_values, flag_defaults

    (tmp_path / "agent.toml").write_text(
        'device-id = "cam-7"\nfleet = "doors"\n[spool]\nmax-items = 50\ndurability = "process"\n'
        "[uplink]\nstats-interval = 2.5\n"
    )
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    run.set_defaults(**flag_defaults(run, config_values(tmp_path / "agent.toml", RunConfig), "agent.toml"))
    args = parser.parse_args(["run", "--spool-max-items", "70"])
    cfg = from_args(RunConfig, args, runtime=None)
    assert (cfg.device_id, cfg.fleet, cfg.spool.max_items, cfg.spool.durability, cfg.stats_interval) == (
        "cam-7", "doors", 70, "process", 2.5,
    )  # fmt: skip
    (tmp_path / "bad.toml").write_text("[spool]\nmax-itemz = 5\n")
    with pytest.raises(ValueError, match=r"unknown key spool.max-itemz; keys there: .*max_items"):
        config_values(tmp_path / "bad.toml", RunConfig)
    # the spool's defaults are the agent's: one default per knob, wherever the spool is made
    from edge_agent.spool import SpoolConfig

    assert RunConfig("cam", "f").spool == SpoolConfig() and SpoolConfig().durability == "deferred"
