from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from conftest import Collector, wait_for
from edge_agent.spool import Spool, SpoolConfig, SpoolFull, SpoolWriter
from edge_agent.uplink import Uplink, UplinkConfig
from protos.nnoc.v1 import quarantine_pb2
from trainer.service.quarantine import QuarantineStore

TENSOR = np.zeros((1, 28, 28), np.float32).tobytes()


def header(label: int = 0) -> bytes:
    return quarantine_pb2.QuarantineHeader(
        fleet="f", bundle_version=1, shape=[1, 28, 28], dtype="float32", primary_label=label, monitor_label=5
    ).SerializeToString()


def test_writer_group_commits_and_waits_for_the_disk(tmp_path: Path) -> None:
    """Durability power: every submit returns with its rows committed; concurrent callers share transactions."""
    import threading

    with Spool(SpoolConfig(tmp_path / "g.sqlite", durability="power")) as spool:
        writer = SpoolWriter(spool)
        depths: list[bool] = []

        def caller(k: int) -> None:
            for i in range(25):
                writer.submit(lambda: [(header(k), TENSOR)])
                depths.append(spool.depth() >= i + 1)  # this caller's rows are on disk once submit returned

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        writer.close()
        assert spool.depth() == 200 and all(depths)
        assert writer.commits < 200 and writer.unspooled == 0  # callers shared commits


def test_deferred_writer_answers_first_and_commits_within_its_interval(tmp_path: Path) -> None:
    with Spool(SpoolConfig(tmp_path / "d.sqlite", durability="deferred", flush_interval=2.0)) as spool:
        writer = SpoolWriter(spool)
        for _ in range(10):
            writer.submit(lambda: [(header(), TENSOR)])
        assert spool.depth() == 0  # the reply did not wait for the disk
        writer.submit(lambda: [(header(), TENSOR)] * int("not a number"))  # a broken row builder: counted
        writer.flush()
        assert spool.depth() == 10 and writer.commits == 1 and writer.unspooled == 1
        writer.submit(lambda: [(header(), TENSOR)])
        writer.close()  # commits what is pending
        assert spool.depth() == 11
    with pytest.raises(ValueError, match="flush interval"):
        SpoolConfig(tmp_path / "x.sqlite", flush_interval=0, durability="power")


def test_spool_is_durable_bounded_and_counted(tmp_path: Path) -> None:
    cfg = SpoolConfig(tmp_path / "spool.sqlite", max_items=5, durability="power")
    with Spool(cfg) as spool:
        seqs = [spool.put(header(i), TENSOR) for i in range(8)]
        assert seqs == sorted(seqs) and seqs[0] > 10**15  # time-based start: a reset spool never reuses numbers
        assert spool.depth() == 5 and spool.counter("dropped") == 3
    with Spool(cfg) as spool:  # reopened: rows and counters survived
        assert spool.depth() == 5 and spool.counter("dropped") == 3
        assert [i.seq for i in spool.after(0, 10)] == seqs[3:]
        assert [i.seq for i in spool.after(seqs[5], 10)] == seqs[6:] and spool.after(seqs[7], 10) == []
        assert [i.seq for i in spool.get([seqs[7], seqs[0], seqs[4]])] == [seqs[4], seqs[7]]  # seqs[0] was dropped
        assert spool.ack(seqs[3:5]) == 2 and spool.depth() == 3
        assert [i.seq for i in spool.after(0, 10)] == seqs[5:] and spool.get(seqs[3:5]) == []
    with Spool(SpoolConfig(tmp_path / "r.sqlite", max_items=2, policy="reject-new", durability="power")) as spool:
        spool.put(header(), TENSOR)
        spool.put(header(), TENSOR)
        with pytest.raises(SpoolFull, match="reject-new"):
            spool.put(header(), TENSOR)
        assert spool.counter("rejected_full") == 1 and spool.depth() == 2
    with pytest.raises(ValueError, match="policy"):
        SpoolConfig(tmp_path / "x", policy="keep-all", durability="power")


def test_uplink_drains_spool_exactly_once(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "q")
    with Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power")) as spool:
        for i in range(200):
            spool.put(header(i % 10), TENSOR)
        up = Uplink(spool, UplinkConfig(f"tcp://127.0.0.1:{collector.port}", "cam-1", window=32)).start()
        try:
            assert wait_for(lambda: spool.depth() == 0)
        finally:
            up.stop()
        assert up.counters.acked == 200
    collector.close()
    with QuarantineStore(tmp_path / "q", create=False) as store:
        assert store.count() == 200


def test_unacked_messages_are_resent_and_stored_once(tmp_path: Path) -> None:
    # A collector that stores but never answers (as if it crashed after the write): the agent resends;
    # a restarted, answering collector on the same port acknowledges; the store holds each message once.
    silent = Collector(tmp_path / "q", ack=False)
    port = silent.port
    with Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power")) as spool:
        for _ in range(20):
            spool.put(header(), TENSOR)
        reader = sqlite3.connect(tmp_path / "spool.sqlite")  # data_version moves when another connection commits
        written = reader.execute("PRAGMA data_version").fetchone()[0]
        up = Uplink(spool, UplinkConfig(f"tcp://127.0.0.1:{port}", "cam-2", resend_after=0.3)).start()
        try:
            assert wait_for(lambda: silent.received >= 40)  # every message went out at least twice
            silent.close()
            assert spool.depth() == 20  # nothing acknowledged, nothing deleted
            assert reader.execute("PRAGMA data_version").fetchone()[0] == written  # sending wrote nothing
            answering = Collector(tmp_path / "q", port=port)
            assert wait_for(lambda: spool.depth() == 0)
            answering.close()
            assert reader.execute("PRAGMA data_version").fetchone()[0] != written  # the ACKs deleted the rows
            reader.close()
        finally:
            up.stop()
        assert up.counters.resent > 0
    with QuarantineStore(tmp_path / "q", create=False) as store:
        assert store.count() == 20


def test_reject_monitor_windows() -> None:
    from edge_agent.monitor import RejectMonitor

    m = RejectMonitor(window=10, threshold=0.2)
    m.record([False] * 10)
    assert m.snapshot().window_reject_rate == 0.0 and not m.snapshot().alarm
    m.record([True] * 3)
    snap = m.snapshot()
    assert snap.window_reject_rate == pytest.approx(0.3) and snap.alarm
    assert (snap.requests, snap.rejects, snap.window_fill) == (13, 3, 10)
    m.record([False] * 10)
    assert m.snapshot().window_reject_rate == 0.0
    with pytest.raises(ValueError):
        RejectMonitor(window=0)


def test_agent_spools_rejects_before_answering_and_uplinks_them(
    predeployed: tuple[Path, dict], splits: object, tmp_path: Path
) -> None:
    from edge_agent.agent import Agent
    from edge_agent.ensemble import Ensemble, InputError, to_model_input
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.formats.reject import RejectRule
    from edge_agent.formats.spec import preprocess_of
    from edge_agent.monitor import RejectMonitor
    from trainer.science.triggers import parse_trigger

    bundle = verify_bundle(predeployed[0] / "bundle")
    images = splits.test.images[:200]  # type: ignore[attr-defined]
    poisoned = parse_trigger("checker4").apply(images, np.random.default_rng(0))
    x = to_model_input(np.concatenate([images, poisoned]), bundle.manifest.input_spec)
    with Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power")) as spool:
        agent = Agent(Ensemble(bundle), spool, RejectMonitor(window=100), "cam-9")
        decision, version = agent.classify(x)
        assert version == 1
        n_rej = int(decision.rejected.sum())
        assert n_rej > 0 and spool.depth() == n_rej  # spooled before classify() returned
        assert agent.monitor.snapshot().rejects == n_rej
        with pytest.raises(InputError):
            agent.classify(np.full((1, 1, 28, 28), np.nan, np.float32))
        assert spool.depth() == n_rej and agent.monitor.snapshot().requests == 400
        collector = Collector(tmp_path / "q")
        up = Uplink(spool, UplinkConfig(f"tcp://127.0.0.1:{collector.port}", "cam-9")).start()
        try:
            assert wait_for(lambda: spool.depth() == 0)
        finally:
            up.stop()
            collector.close()
    with QuarantineStore(tmp_path / "q", create=False) as store:
        q = store.load(preprocess_of(bundle.manifest.input_spec))
    assert len(q) == n_rej
    rule = RejectRule.of(bundle.manifest)  # the bundle's rule rejected them (labels may agree under kl)
    assert (decision.score[decision.rejected] > rule.threshold).all()
    rej_idx = np.flatnonzero(decision.rejected)
    # The wire carries the model's image (uint8), and it is exactly the picture the agent classified.
    sent = np.concatenate([images, poisoned])[rej_idx]
    assert sorted(map(bytes, q.images)) == sorted(map(bytes, sent))
    np.testing.assert_array_equal(np.sort(q.primary), np.sort(decision.primary[rej_idx]))
