from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import SMALL_SPLIT, run_cli
from edge_agent.formats.errors import QuarantineError
from edge_agent.formats.preprocess import Preprocess
from edge_agent.formats.wire import check_message
from protos.nnoc.v1 import quarantine_pb2
from trainer.science.cyclegan import CycleGANConfig, ImagePool, PatchDiscriminator, ResnetGenerator, train_cyclegan
from trainer.service.quarantine import QuarantineStore
from trainer.stages.purify import purify


def _header(seq: int, device: str = "d1", shape: Any = (1, 4, 4), **fields: Any) -> quarantine_pb2.QuarantineHeader:
    values = {"device_id": device, "fleet": "f", "bundle_version": 1, "seq": seq, "dtype": "float32"}
    return quarantine_pb2.QuarantineHeader(**{**values, **fields}, shape=list(shape), primary_label=0, monitor_label=3)


def test_quarantine_store_is_idempotent_and_survives_reopen(tmp_path: Path) -> None:
    x = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4)
    with QuarantineStore(tmp_path) as store:
        assert store.add_many([(_header(i), x.tobytes()) for i in range(5)]) == 5
        assert store.add_many([(_header(i), x.tobytes()) for i in range(3, 8)]) == 3  # 3, 4 are duplicates
        assert store.add_many([(_header(0, device="d2"), x.tobytes())]) == 1
    with QuarantineStore(tmp_path, create=False) as store:
        assert store.count() == 9
        q = store.load(Preprocess())
    assert q.images.shape == (9, 1, 4, 4) and q.images.dtype == np.uint8
    assert q.images[0, 0, 3, 3] == 255 and (q.primary == 0).all() and (q.monitor == 3).all()
    mode = sqlite3.connect(tmp_path / "quarantine.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


@pytest.mark.parametrize(
    ("header", "payload", "problem"),
    [
        (_header(1), b"\x00" * 10, "needs 64"),
        (quarantine_pb2.QuarantineHeader(seq=1, shape=[4], dtype="float32"), b"\x00" * 16, "device_id"),
        (_header(1, shape=[4], dtype="object"), b"\x00" * 16, "is not one of"),
        (_header(1, shape=[4], dtype="nonsense"), b"\x00" * 16, "dtype"),
        (_header(1, shape=[0], dtype="float32"), b"", "shape"),
        (_header(1, shape=[1 << 21], dtype="float32"), b"", "limit"),
        (_header(1, bundle_version=0), b"\x00" * 64, "bundle_version"),
        (_header(2**63), b"\x00" * 64, "seq"),
        (_header(1, device="../x"), b"\x00" * 64, "device"),
        (
            _header(1, shape=[1], dtype="float32"),
            np.array([np.nan], np.float32).tobytes(),
            "NaN",
        ),
    ],
)
def test_malformed_quarantine_messages_are_refused(header: Any, payload: bytes, problem: str) -> None:
    with pytest.raises(QuarantineError, match=problem):
        check_message(header, payload)


def test_missing_quarantine_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QuarantineError, match="nnoc-trainer stream"):
        QuarantineStore(tmp_path / "none", create=False)


def test_model_inputs_go_back_to_their_images() -> None:
    assert (Preprocess().to_image(np.full((1, 1, 1, 1), 0.5, np.float32)) == 128).all()
    normalised = Preprocess(mean=(0.5,), std=(0.25,), layout="NHWC")
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 4, 5), dtype=np.uint8)
    assert np.array_equal(normalised.to_image(normalised.model_input(images)), images)


def test_quarantine_of_images_and_older_tensors_loads_as_images(tmp_path: Path) -> None:
    """Agents send the model's uint8 image; rows from agents that sent the float tensor load the same."""
    normalised = Preprocess(mean=(0.3,), std=(0.2,))
    images = np.random.default_rng(1).integers(0, 256, (4, 1, 4, 4), dtype=np.uint8)
    tensors = normalised.model_input(images)
    with QuarantineStore(tmp_path) as store:
        store.add_many([(_header(i, dtype="uint8"), images[i].tobytes()) for i in (0, 2)])
        store.add_many([(_header(i), tensors[i].tobytes()) for i in (1, 3)])
        q = store.load(normalised)
        assert store.add_many([(_header(9, shape=(1, 5, 5), dtype="uint8"), bytes(25))]) == 1
        with pytest.raises(QuarantineError, match="different shapes"):
            store.load(normalised)
    assert q.images.dtype == np.uint8
    assert np.array_equal(q.images[np.argsort([s for _, s in q.keys])], images)


def test_purify_majority_and_fallback() -> None:
    labels = np.array([0] * 50 + [4] * 10 + [6] * 12 + [2] * 3)
    p = purify(labels, "majority")
    assert p.dominant == 0 and p.keep.sum() == 50
    flat = np.array([0] * 10 + [4] * 9 + [6] * 8)  # no label dominates (e.g. all-to-all)
    p = purify(flat, "majority")
    assert p.dominant is None and p.keep.all()
    assert purify(labels, method="none").keep.all()
    # Low CPD: the attacked label (0) is not the most common reject, but it is far above its clean baseline.
    low = np.array([0] * 20 + [4] * 28 + [6] * 33 + [2] * 8 + [3] * 8)
    assert purify(low, "majority").dominant is None  # the majority filter falls back to everything
    baseline = np.array([5, 0, 8, 8, 28, 0, 33, 0, 0, 0])  # clean disagreements' BadNet labels
    p = purify(low, "excess", baseline_counts=baseline)
    assert p.dominant == 0 and p.keep.sum() == 20
    with pytest.raises(ValueError, match="unknown purifier 'majorty'"):  # a typo no longer acts as majority
        purify(low, "majorty")
    # No attack: counts follow the baseline, nothing stands out, everything is kept.
    assert purify(np.array([0] * 5 + [4] * 28 + [6] * 33), "excess", baseline_counts=baseline).dominant is None
    # A label clean data almost never gives, seen 4 times (z 3.4 under the normal approximation, but an exact tail
    # of 0.01): not taken as the attacked label (measured: a 1-epoch BadNet's quarantine, 34 of 49 on its target,
    # whose clean rejects also sit mostly on the target). Nothing stands out: everything is kept.
    tiny = np.array([0] * 34 + [1] * 4 + [5] * 6 + [8] * 3 + [7] * 2)
    p = purify(tiny, "excess", baseline_counts=np.array([31, 0, 0, 0, 0, 10, 0, 2, 5, 0]))
    assert p.dominant is None and p.keep.all()
    from trainer.stages.purify import binomial_tail

    assert binomial_tail(49, 1 / 58, 4) == pytest.approx(0.0105, abs=5e-4) and binomial_tail(10, 0.3, 0) == 1.0
    assert binomial_tail(10, 0.5, 10) == pytest.approx(0.5**10) and binomial_tail(5, 0.5, 6) == 0.0
    with pytest.raises(ValueError, match="baseline"):
        purify(low, "excess")
    assert purify(np.zeros(0, np.int64), "majority").keep.shape == (0,)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 30, 30)])
def test_cyclegan_networks_fit_the_input(shape: tuple[int, int, int]) -> None:
    g = ResnetGenerator(shape[0], ngf=8, n_blocks=2)
    d = PatchDiscriminator(shape[0], ndf=8, n_layers=2)
    x = torch.rand(2, *shape) * 2 - 1
    y = g(x)
    assert y.shape == x.shape and y.abs().max() <= 1.0
    assert d(x).shape[:2] == (2, 1) and d(x).shape[-1] >= 2


def test_image_pool_mixes_history() -> None:
    import random

    pool = ImagePool(4, random.Random(0))
    first = pool.query(torch.zeros(4, 1, 2, 2))
    assert torch.equal(first, torch.zeros(4, 1, 2, 2))
    mixed = torch.cat([pool.query(torch.ones(4, 1, 2, 2)) for _ in range(10)])
    assert 0 < (mixed == 0).all(dim=(1, 2, 3)).sum() < len(mixed)


@pytest.mark.slow
def test_cyclegan_learns_a_patch_and_resumes(tmp_path: Path) -> None:
    # U: dark images; V: the same kind of images with a white 4x4 corner patch. The score counts how many
    # G(U) gained a bright corner; a few epochs of a small CycleGAN must raise it well above zero.
    rng = np.random.default_rng(0)
    u = rng.integers(0, 60, (128, 1, 12, 12), dtype=np.uint8)
    v = rng.integers(0, 60, (128, 1, 12, 12), dtype=np.uint8)
    v[:, :, 8:, 8:] = 255

    def score(gen: np.ndarray) -> float:
        return float(np.mean(gen[:, :, 8:, 8:].mean(axis=(1, 2, 3)) > 150))

    cfg = CycleGANConfig(width=8, blocks=2, epochs=20, epochs_decay=2, batch_size=8, patience=0)
    ckpt = tmp_path / "gan.pt"
    res = train_cyclegan(u, v, cfg, score, u, checkpoint=ckpt, quiet=True, device=torch.device("cpu"))
    assert res.best_score is not None and res.best_score > 0.3
    assert res.history[0]["score"] < 0.05  # it was learned, not there from the start
    assert len(res.history) == 22 and ckpt.is_file()
    again = train_cyclegan(u, v, cfg, score, u, checkpoint=ckpt, quiet=True, device=torch.device("cpu"))
    assert len(again.history) == 22  # resumed at the end: nothing more to train
    assert again.best_score == res.best_score
    other = replace(cfg, epochs=1, epochs_decay=0)  # another config: the stale checkpoint is not resumed
    fresh = train_cyclegan(u, v, other, score, u, checkpoint=ckpt, quiet=True, device=torch.device("cpu"))
    assert len(fresh.history) == 1


def test_a_cyclegan_that_stopped_early_is_not_trained_on_when_resumed(tmp_path: Path) -> None:
    # A score that never improves stops the fit at its patience; the repair reuses a finished cyclegan.pt (bench
    # variants share one), so a second call must return the same generator without training another epoch.
    rng = np.random.default_rng(0)
    u = rng.integers(0, 60, (16, 1, 12, 12), dtype=np.uint8)
    v = rng.integers(0, 60, (16, 1, 12, 12), dtype=np.uint8)
    cfg = CycleGANConfig(width=4, blocks=1, epochs=10, epochs_decay=0, batch_size=8, patience=2,
                         min_epochs=3)  # fmt: skip
    ckpt = tmp_path / "gan.pt"
    cpu = torch.device("cpu")
    res = train_cyclegan(u, v, cfg, lambda gen: 0.5, u, checkpoint=ckpt, quiet=True, device=cpu)
    assert res.stopped_early and len(res.history) == 3 and res.best_epoch == 0
    again = train_cyclegan(u, v, cfg, lambda gen: 1.0, u, checkpoint=ckpt, quiet=True, device=cpu)
    assert again.stopped_early and len(again.history) == 3 and again.best_epoch == 0  # a better score unseen
    assert all(torch.equal(a, b) for a, b in zip(res.generator.state_dict().values(),
                                                again.generator.state_dict().values(), strict=True))  # fmt: skip


def test_the_auto_base_weighs_quarantined_inputs_followed_against_clean_accuracy_lost() -> None:
    from trainer.stages.repair import choose_base

    bd = {"eval_clean_accuracy": 0.91, "quarantine_still_dominant": 9, "quarantine_inputs": 100}
    aug = {"eval_clean_accuracy": 0.89, "quarantine_still_dominant": 4, "quarantine_inputs": 100}
    assert choose_base({"bd": bd, "aug": aug}) == "aug"  # 0.05 fewer followed for 0.02 of CA
    assert choose_base({"bd": {**bd, "quarantine_still_dominant": 5}, "aug": aug}) == "bd"  # 0.01 for 0.02 of CA
    assert choose_base({"bd": {**bd, "quarantine_still_dominant": 6}, "aug": aug}) == "bd"  # a tie: the CA decides
    assert choose_base({"bd": {"eval_clean_accuracy": 0.91}, "aug": {"eval_clean_accuracy": 0.89}}) == "bd"
    assert choose_base({"aug": aug}) == "aug"


def test_stream_then_repair_end_to_end(predeployed: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bundle = predeployed[0] / "bundle"
    _, rep, _ = run_cli(
        "trainer",
        "stream",
        *SMALL_SPLIT,
        "--bundle",
        str(bundle),
        "--trigger",
        "checker4",
        "--target",
        "0",
        "--cpd",
        "0.2",
        "--n",
        "500",
        "--out",
        str(tmp_path / "q"),
        "--quiet",
    )
    assert rep is not None and rep["poisoned"] == 100 and rep["n"] == 500
    assert rep["rejected"] == rep["quarantine_size"] > 0
    assert rep["recall"] is not None and rep["recall"] > 0.5  # the detector catches triggered inputs
    truth = json.loads((tmp_path / "q" / "truth.json").read_text())
    assert truth["evaluation_only"] and len(truth["poisoned_seq"]) == 100

    code, out, stderr = run_cli(
        "trainer",
        "repair",
        *SMALL_SPLIT,
        "--bundle",
        str(bundle),
        "--quarantine",
        str(tmp_path / "q"),
        "--out",
        str(tmp_path / "r"),
        "--gan-epochs",
        "2",
        "--gan-epochs-decay",
        "1",
        "--gan-width",
        "8",
        "--gan-blocks",
        "2",
        "--clean-domain",
        "100",
        "--epochs",
        "1",
        "--max-ca-drop",
        "0.2",
        "--repair-base",
        "auto",
        "--learner",
        "cyclegan",
        "--eval-trigger",
        "checker4",
        "--target",
        "0",
        "--quiet",
        check=False,
    )
    assert code == 0, stderr[-2000:]
    # auto: both bases fine-tuned and checked on the purified quarantine; the one taken is named in the bundle
    took = out["repair_set"]["base"]
    assert set(out["repair_set"]["bases"]) == {"bd", "aug"} and took in ("bd", "aug")
    assert all(b["quarantine_inputs"] == out["purified_size"] for b in out["repair_set"]["bases"].values())
    assert out["repair_set"]["unlearned"] == out["purified_size"]  # the quarantine unlearned beside G(D_treat)
    assert out is not None and out["published"] and out["version"] == 2 and out["parent_version"] == 1
    assert out["dominant_label"] == 0 and out["purified_size"] <= out["quarantine_size"]
    assert {"badnet", "monitor", "repaired"} <= set(out["test"])
    manifest = json.loads((tmp_path / "r" / "bundle" / "manifest.json").read_text())
    assert manifest["version"] == "2" and manifest["parent_version"] == "1"
    assert manifest["created_by"] == "nnoc-trainer repair" and manifest["provenance"]["repair_base"] == took
    assert (tmp_path / "r" / "samples.png").read_bytes()[:4] == b"\x89PNG"
    from edge_agent.formats.bundle import verify_bundle

    assert verify_bundle(tmp_path / "r" / "bundle").version == 2
    # The gate: an impossible floor publishes nothing and exits 3.
    code, out, _ = run_cli(
        "trainer",
        "repair",
        *SMALL_SPLIT,
        "--bundle",
        str(bundle),
        "--quarantine",
        str(tmp_path / "q"),
        "--out",
        str(tmp_path / "r2"),
        "--gan-epochs",
        "1",
        "--gan-epochs-decay",
        "0",
        "--gan-width",
        "8",
        "--gan-blocks",
        "1",
        "--clean-domain",
        "50",
        "--epochs",
        "1",
        "--max-ca-drop",
        "-0.5",
        "--quiet",
        check=False,
    )
    assert code == 3 and out is not None and "gate" in out["error"]
    assert not (tmp_path / "r2" / "bundle").exists()
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["published"] is False
    # Too few quarantined inputs is a clear error.
    code, out, stderr = run_cli(
        "trainer",
        "repair",
        *SMALL_SPLIT,
        "--bundle",
        str(bundle),
        "--quarantine",
        str(tmp_path / "q"),
        "--out",
        str(tmp_path / "r3"),
        "--min-quarantine",
        "100000",
        "--quiet",
        check=False,
    )
    assert code == 2 and "quarantined inputs" in stderr


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_repair_chooses_what_monitors_the_new_version(
    predeployed: tuple[Path, dict[str, Any]],
    splits: Any,
    tmp_path: Path,
    choice: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """auto (the default) refreshes a monitor that records its treatment; a version whose monitor does not (made
    with none) is kept by the next repair's auto, with a warning."""
    from edge_agent.formats.bundle import sha256_file
    from trainer.science.models import Checkpoint
    from trainer.stages.repair import RepairConfig, load, resolve_next_monitor

    bundle = predeployed[0] / "bundle"
    run_cli("trainer", "stream", *SMALL_SPLIT, "--bundle", str(bundle), "--trigger", "checker4", "--target", "0",
            "--cpd", "0.2", "--n", "300", "--out", str(tmp_path / "q"), "--quiet")  # fmt: skip
    _, out, _ = run_cli(
        "trainer", "repair", *SMALL_SPLIT, "--bundle", str(bundle), "--quarantine", str(tmp_path / "q"),
        "--out", str(tmp_path / "r"), "--learner", "none", "--epochs", "1", "--max-ca-drop", "0.2",
        "--min-quarantine", "5", *(["--next-monitor", choice] if choice != "auto" else []), "--quiet",
    )  # fmt: skip
    assert out is not None and out["published"]
    manifest = json.loads((tmp_path / "r" / "bundle" / "manifest.json").read_text())
    assert manifest["provenance"]["monitor"] == ("refresh" if choice == "auto" else choice)
    files = {a["role"]: tmp_path / "r" / "bundle" / a["name"] for a in manifest["artifacts"]}
    served = out["served_test"]
    if choice == "none":
        assert manifest["reject_rule"]["score"] == "disagree"
        assert served["clean_reject_rate"] == 0.0
        assert served["served_clean_accuracy"] == served["primary_clean_accuracy"]
        v2 = load(tmp_path / "r" / "bundle", tmp_path / "q", splits)  # its monitor: θ_repair, no treatment
        with caplog.at_level(logging.WARNING, logger="trainer.stages.repair"):
            assert resolve_next_monitor(v2, RepairConfig()).next_monitor == "keep"
        assert "does not record its treatment" in caplog.text
        with pytest.raises(ValueError, match="does not record its treatment"):
            resolve_next_monitor(v2, RepairConfig(next_monitor="refresh"))
    else:
        v1_monitor = bundle / next(a["name"] for a in json.loads((bundle / "manifest.json").read_text())["artifacts"]
                                   if a["role"] == "monitor")  # fmt: skip
        assert sha256_file(files["monitor"]) not in (sha256_file(files["primary"]), sha256_file(v1_monitor))
        meta = Checkpoint.load(tmp_path / "r" / "monitor.pt").meta
        assert meta["refreshed_from"] == "repaired primary" and "alpha" in meta and "gamma" in meta
        assert 0 < served["clean_reject_rate"] < 0.5


@pytest.mark.parametrize("reset", ["trigger-channels", "head"])
def test_repair_resets_cut_the_trigger_channels_or_the_head(
    predeployed: tuple[Path, dict[str, Any]], splits: Any, tmp_path: Path, reset: str
) -> None:
    import torch

    from trainer.science.models import Checkpoint
    from trainer.science.pruning import channel_activity, last_conv

    bundle = predeployed[0] / "bundle"
    run_cli("trainer", "stream", *SMALL_SPLIT, "--bundle", str(bundle), "--trigger", "checker4", "--target", "0",
            "--cpd", "0.2", "--n", "300", "--out", str(tmp_path / "q"), "--quiet")  # fmt: skip
    _, out, _ = run_cli(
        "trainer", "repair", *SMALL_SPLIT, "--bundle", str(bundle), "--quarantine", str(tmp_path / "q"),
        "--out", str(tmp_path / "r"), "--epochs", "1", "--max-ca-drop", "0.2", "--min-quarantine", "5",
        "--reset", reset, "--next-monitor", "keep", "--quiet",
    )  # fmt: skip
    assert out is not None and out["published"]
    done = out["repair_set"]["bases"]["bd"]["reset"]
    assert done["kind"] == reset and out["config"]["reset"] == reset
    if reset == "head":
        assert done["cosine_to_base"] < 0.5  # a new head, held away from the BadNet's
        return
    assert 1 <= done["cut"] < done["channels"] and all(e > 0 for e in done["excess"])
    model = Checkpoint.load(tmp_path / "r" / "primary.pt").build()
    _, _, layer = last_conv(model)
    quiet = channel_activity(model, layer, splits.test.images[:200], torch.device("cpu"))
    assert int((quiet == 0).sum()) >= done["cut"]  # the cut channels stay cut in the published model


def test_the_learned_trigger_is_strengthened_until_the_badnet_follows_it() -> None:
    from trainer.science.data import ImageSet
    from trainer.stages.repair import GAINS, choose_gain, strengthen

    rng = np.random.default_rng(0)
    clean = rng.integers(0, 200, (200, 1, 8, 8), dtype=np.uint8)
    labels = np.arange(200) % 10
    learned = clean.copy()
    learned[:, :, :2, :2] = np.minimum(clean[:, :, :2, :2].astype(int) + 40, 255)  # a faint corner patch
    # the change is scaled and clipped; gain 1 leaves G's images as they are
    assert strengthen(clean, learned, 1.0) is learned
    doubled = strengthen(clean, learned, 2.0)
    assert np.array_equal(doubled[:, :, 2:, :], clean[:, :, 2:, :])
    assert np.array_equal(doubled[:, :, :2, :2], np.minimum(clean[:, :, :2, :2].astype(int) + 80, 255))

    def badnet(images: np.ndarray) -> np.ndarray:  # follows the patch once it is 70 grey levels over the image
        corner = images[:, 0, :2, :2].astype(int).mean(axis=(1, 2)) - clean_by_key(images)
        return np.where(corner >= 70, 0, 5)

    def clean_by_key(images: np.ndarray) -> np.ndarray:  # the clean corner of the same input (rows are unique)
        rows = [np.flatnonzero((clean[:, 0, 2:, :] == im[0, 2:, :]).all(axis=(1, 2)))[0] for im in images]
        return clean[rows, 0, :2, :2].astype(int).mean(axis=(1, 2))

    treat = ImageSet(clean, labels)
    gain, images, followed = choose_gain(badnet, treat, learned, 0, None)
    # 40 levels at gain 1 and 60 at 1.5 are not followed; 80 at gain 2 is, on all but the clipped few
    assert gain == 2.0 and list(followed) == ["1", "1.5", "2"] and followed["1"] == 0.0 and followed["2"] >= 0.9
    assert np.array_equal(images, doubled)
    # never followed: the strongest is taken; a gain given is used as it is; no dominant label: as generated
    assert choose_gain(lambda x: np.full(len(x), 5), treat, learned, 0, None)[0] == GAINS[-1]
    assert choose_gain(badnet, treat, learned, 0, 1.5)[0] == 1.5
    assert choose_gain(badnet, treat, learned, None, None)[:2] == (1.0, learned)
