"""CURVE on the quarantine uplink: listed agents get through encrypted, others are refused and logged."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from conftest import run_cli, wait_for
from edge_agent.spool import Spool, SpoolConfig
from edge_agent.uplink import Uplink, UplinkConfig
from protos.nnoc.v1 import bundle_pb2, quarantine_pb2
from trainer.service.collector import Collector, CollectorConfig, fixed_spec, quarantine_size

SPEC = bundle_pb2.InputSpec(shape=[1, 28, 28], dtype="float32", min_value=0.0, max_value=1.0)


def _fill(spool: Spool, n: int) -> None:
    header = quarantine_pb2.QuarantineHeader(fleet="f", bundle_version=1, shape=[1, 28, 28], dtype="float32")
    for _ in range(n):
        spool.put(header.SerializeToString(), np.zeros((1, 28, 28), np.float32).tobytes())


def test_curve_uplink_accepts_listed_agents_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = tmp_path / "keys"
    for name in ("collector", "cam-1", "intruder"):
        code, out, _ = run_cli("trainer", "keys", "curve", "--out", str(keys), "--name", name)
        assert code == 0 and out is not None
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "cam-1.key").write_bytes((keys / "cam-1.key").read_bytes())
    ctx = zmq.Context()
    cfg = CollectorConfig(
        "tcp://127.0.0.1:0", tmp_path / "q", curve_secret=keys / "collector.key_secret", curve_allow=allow
    )
    collector = Collector(cfg, fixed_spec("f", SPEC), None, ctx).start()
    endpoint = f"tcp://127.0.0.1:{collector.port}"
    uplinks: list[Uplink] = []
    spools: dict[str, Spool] = {}

    def agent(device: str, **curve: Any) -> Spool:
        spool = spools[device] = Spool(SpoolConfig(tmp_path / f"{device}.sqlite", durability="power"))
        _fill(spool, 50)
        uplinks.append(Uplink(spool, UplinkConfig(endpoint, device, resend_after=0.5, **curve), context=ctx).start())
        return spool

    try:
        with caplog.at_level(logging.WARNING, logger="edge_agent.formats.curve"):
            good = agent("cam-1", curve_key=keys / "cam-1.key_secret", curve_server_key=keys / "collector.key")
            bad = agent("cam-2", curve_key=keys / "intruder.key_secret", curve_server_key=keys / "collector.key")
            plain = agent("cam-3")  # no CURVE at all: the handshake cannot even start
            assert wait_for(lambda: good.depth() == 0, 30)
            assert wait_for(lambda: collector.counters.auth_denied >= 1, 30)
            time.sleep(1.0)
        assert bad.depth() == 50 and plain.depth() == 50  # nothing left their spools: no ACK ever came
        assert any("not on the allow-list" in r.message for r in caplog.records)
    finally:
        for up in uplinks:
            up.stop()
        collector.stop()
        for s in spools.values():
            s.close()
        ctx.term()
    assert quarantine_size(tmp_path / "q", "f", 1) == 50
    assert collector.counters.received == 50


def test_curve_misconfiguration_is_a_clear_error(tmp_path: Path) -> None:
    code, _, err = run_cli(
        "trainer", "serve", "--curve-secret", str(tmp_path / "missing"), "--state-dir", str(tmp_path), check=False
    )
    assert code == 2 and "go together" in err
    (tmp_path / "allow").mkdir()
    cfg = CollectorConfig(
        "tcp://127.0.0.1:0", tmp_path / "q", curve_secret=tmp_path / "nope.key_secret", curve_allow=tmp_path / "allow"
    )
    with pytest.raises(ValueError, match="cannot read CURVE key"):
        Collector(cfg, lambda fleet: None).start()
