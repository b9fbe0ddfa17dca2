"""Signed bundles: the store signs what it takes in; agents with trusted keys refuse anything else."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import make_version, run_cli, start_service, wait_for
from edge_agent.agent import Agent
from edge_agent.ensemble import Ensemble
from edge_agent.formats.bundle import BundleError, verify_bundle
from edge_agent.formats.signing import generate_keys, load_private_key, load_trusted_keys
from edge_agent.monitor import RejectMonitor
from edge_agent.spool import Spool, SpoolConfig
from edge_agent.updates import BundleCache, UpdateConfig, Updater
from trainer.service.store import ModelStore


def test_keys_cli_and_signature_checks(predeployed: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    code, out, _ = run_cli("trainer", "keys", "generate", "--out", str(tmp_path / "k"))
    assert code == 0 and out is not None and len(out["key_id"]) == 16
    assert (tmp_path / "k" / "signing.key").stat().st_mode & 0o777 == 0o600
    code, _, err = run_cli("trainer", "keys", "generate", "--out", str(tmp_path / "k"), check=False)
    assert code == 2 and "exists" in err
    other_key, other_pub = generate_keys(tmp_path / "k", "other")
    store = ModelStore(tmp_path / "exports", load_private_key(tmp_path / "k" / "signing.key"))
    store.create("default")
    store.publish("default", store.add("default", predeployed[0]))
    signed = store.version_dir("default", 1) / "bundle"
    trusted = load_trusted_keys([tmp_path / "k" / "signing.pub"])
    assert verify_bundle(signed, trusted).manifest.signature.key_id == out["key_id"]
    with pytest.raises(BundleError, match="not among the trusted keys"):
        verify_bundle(signed, load_trusted_keys([other_pub]))
    with pytest.raises(BundleError, match="not signed"):
        verify_bundle(predeployed[0] / "bundle", trusted)
    # Change the manifest after signing (say, bump its version): hashes still match, the signature does not.
    tampered = tmp_path / "tampered"
    shutil.copytree(signed, tampered)
    m = verify_bundle(tampered).manifest
    m.version = 9
    (tampered / "manifest.pb").write_bytes(m.SerializeToString())
    (tampered / "manifest.json").unlink()  # a careful attacker drops the rendering (which would disagree)
    with pytest.raises(BundleError, match=r"does not verify|differs from the one its signature covers"):
        verify_bundle(tampered, trusted)
    code, _, err = run_cli(
        "edge_agent", "verify", "--bundle", str(signed), "--trusted-key", str(other_pub), check=False
    )
    assert code == 2 and "not among the trusted keys" in err
    with pytest.raises(ValueError, match=r"not an Ed25519 public key|cannot read"):
        load_trusted_keys([other_key])


def test_agent_refuses_a_bundle_signed_by_an_untrusted_key(
    predeployed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    good_key, good_pub = generate_keys(tmp_path / "keys", "good")
    bad_key, _ = generate_keys(tmp_path / "keys", "bad")
    root = tmp_path / "exports"
    good, bad = ModelStore(root, load_private_key(good_key)), ModelStore(root, load_private_key(bad_key))
    good.create("default")
    good.publish("default", good.add("default", predeployed[0]))
    server = start_service(good, tmp_path)
    trusted = load_trusted_keys([good_pub])
    cache = BundleCache(tmp_path / "cache", trusted)
    staged = tmp_path / "stage1"
    shutil.copytree(good.version_dir("default", 1) / "bundle", staged)
    cache.install(staged, 1)
    cache.set_current(1)
    bundle = cache.load()
    assert bundle is not None
    spool = Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power"))
    agent = Agent(Ensemble(bundle), spool, RejectMonitor(), "cam-1")
    updater = Updater(agent, cache, UpdateConfig(f"127.0.0.1:{server.port}", "default", "cam-1")).start()
    x = np.zeros((2, 1, 28, 28), np.float32)
    try:
        bad.publish("default", bad.add("default", make_version(predeployed[0], tmp_path / "v2", 2)))
        assert wait_for(lambda: updater.counters.refused == 1, 30)
        assert "not among the trusted keys" in updater.counters.last_error
        assert agent.classify(x)[1] == 1  # the old bundle keeps serving
        good.publish("default", good.add("default", make_version(predeployed[0], tmp_path / "v3", 3)))
        assert wait_for(lambda: agent.ensemble.bundle.version == 3, 30)
    finally:
        updater.stop()
        server.stop()
        spool.close()
