"""The field's post-training defenses in the evaluation harness (`nnoc-trainer defend`): fine-pruning and Neural
Cleanse on the real small BadNet, and their parts on small modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SMALL_SPLIT, run_cli
from trainer.science.pruning import channel_activity, last_conv, prune_channels
from trainer.stages.defenses import anomaly_index


def test_last_conv_prunes_the_batch_norm_after_it() -> None:
    with_bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
    name, conv, layer = last_conv(with_bn)
    assert name == "1" and conv is with_bn[1] and layer is with_bn[2]
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Flatten())
    assert last_conv(plain)[2] is plain[2]
    with pytest.raises(ValueError, match="has none"):
        last_conv(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_pruned_channels_output_zero_and_stay_zero_while_training() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    prune_channels(net[1], keep)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x = torch.rand(8, 1, 5, 5)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().neg().backward()
        opt.step()
    out = net.eval()(x)
    assert torch.all(out[:, [1, 3]] == 0)
    assert out[:, [0, 2]].abs().sum() > 0
    images = (np.random.default_rng(0).random((16, 1, 5, 5)) * 255).astype(np.uint8)
    activity = channel_activity(net, net[1], images, torch.device("cpu"))
    assert activity.shape == (4,) and activity[1] == 0 and activity[3] == 0


def test_anomaly_index_flags_the_small_outlier_only() -> None:
    norms = np.array([60.0, 64.0, 58.0, 8.0, 61.0, 70.0, 63.0, 59.0, 150.0, 62.0])
    index = anomaly_index(norms)
    assert index.argmax() == 3 and index[3] > 2
    assert (index[np.arange(10) != 3] < 2).all()  # a large norm is never an outlier


def _defend(badnet: tuple[Path, dict[str, Any]], out: Path, *flags: str) -> dict[str, Any]:
    _, report, _ = run_cli(
        "trainer", "defend", *SMALL_SPLIT, "--model", str(badnet[0] / "model.pt"), "--out", str(out),
        "--eval-trigger", "checker4", "--target", "0", "--quiet", *flags,
    )  # fmt: skip
    assert report is not None
    return report


def test_fine_pruning_on_the_badnet(badnet: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from trainer.science.models import Checkpoint

    report = _defend(badnet, tmp_path, "--method", "fine-pruning")
    d = report["details"]
    assert 0 < d["pruned"] < d["channels"]
    assert d["eval_ca_pruned"] >= d["eval_ca_floor"]
    test = report["test"]
    assert test["badnet"]["attack_success_rate"] > 0.8  # the session's small BadNet (0.88 trained on an H100)
    assert test["defended"]["attack_success_rate"] < test["badnet"]["attack_success_rate"]
    # the saved model carries the pruning: the pruned channels of the last conv are exactly zero
    state = Checkpoint.load(tmp_path / "model.pt").state_dict
    weight = state[d["layer"].removeprefix("net.") + ".weight"]
    zero_rows = int((weight.flatten(1).abs().sum(1) == 0).sum())
    assert zero_rows == d["pruned"]
    assert (tmp_path / "pruning.png").stat().st_size > 1000


def test_neural_cleanse_finds_the_target(badnet: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    # the small fixture is enough to find the target; whether its anomaly index passes 2 depends on how far the
    # other labels' norms spread (measured in bench_field), so the unlearning is tested on the smallest norm
    report = _defend(badnet, tmp_path, "--method", "neural-cleanse", "--nc-steps", "150", "--epochs", "2",
                     "--nc-flag", "smallest")  # fmt: skip
    d = report["details"]
    norms = np.array(d["norms"])
    assert norms.argmin() == 0, f"the target's reversed trigger should be the smallest: {d['norms']}"
    assert d["anomaly_index"][0] == max(d["anomaly_index"])
    assert d["flagged"] == [0] and d["unlearn_stamped"] > 0
    assert report["test"]["defended"]["attack_success_rate"] < 0.5 * report["test"]["badnet"]["attack_success_rate"]
    assert (tmp_path / "reversed.png").stat().st_size > 1000


def test_ft_sam_lowers_the_asr(badnet: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    report = _defend(badnet, tmp_path, "--method", "ft-sam", "--epochs", "2")
    train = report["details"]["train"]
    assert train["sam_rho"] == 2.0 and train["sam_adaptive"] and train["schedule"] == "cosine"
    test = report["test"]
    assert test["defended"]["attack_success_rate"] < test["badnet"]["attack_success_rate"]
    assert test["defended"]["clean_accuracy"] > test["badnet"]["clean_accuracy"] - 0.1


def test_fst_reinitialises_the_head_and_shifts_it_away(badnet: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    report = _defend(badnet, tmp_path, "--method", "fst", "--epochs", "2")
    d = report["details"]
    assert d["head"]  # the last Linear, named
    assert d["head_cosine_to_badnet"] < 0.5  # a new head, not the BadNet's fine-tuned
    test = report["test"]
    assert test["defended"]["attack_success_rate"] < test["badnet"]["attack_success_rate"]
    assert test["defended"]["clean_accuracy"] > test["badnet"]["clean_accuracy"] - 0.1


def test_defend_bad_input_is_one_line(tmp_path: Path) -> None:
    code, _, err = run_cli("trainer", "defend", "--model", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o"),
                           check=False)  # fmt: skip
    assert code == 2
    assert "Traceback" not in err and "none.pt" in err


def test_a_second_backdoor_takes_its_own_rows() -> None:
    from trainer.science.data import ImageSet
    from trainer.science.triggers import parse_trigger
    from trainer.stages.attack import add_backdoor, poison_training_set

    rng = np.random.default_rng(0)
    clean = ImageSet(np.full((200, 1, 28, 28), 100, np.uint8), rng.integers(0, 10, 200))
    first = poison_training_set(clean, parse_trigger("checker4"), 0, 0.1, rng)
    both = add_backdoor(first, parse_trigger("square:4"), 3, 0.1, rng)
    second = both.poisoned & ~first.poisoned
    assert first.poisoned.sum() == 20 and second.sum() == 20
    assert (both.data.labels[second] == 3).all() and (both.data.labels[first.poisoned] == 0).all()
    assert (both.data.images[second][:, 0, -4:, -4:] == 255).all()  # the white square, bottom right
    untouched = ~both.poisoned
    assert (both.data.images[untouched] == 100).all() and (both.data.labels[untouched] == clean.labels[untouched]).all()


def test_second_backdoor_flags_go_together(tmp_path: Path) -> None:
    code, _, err = run_cli("trainer", "attack", "--second-trigger", "square:4", "--out", str(tmp_path),
                           check=False)  # fmt: skip
    assert code == 2 and "--second-target" in err and "Traceback" not in err
