"""Staged rollouts (trainer/service/rollout.py): the policy's forms, stable cohorts, the judging, the store's
records, and a fleet of light subscribers on the real model service following a rollout stage by stage."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import start_service, tiny_store, wait_for
from protos.nnoc.v1 import model_service_pb2 as ms
from protos.nnoc.v1 import model_service_pb2_grpc as ms_grpc
from protos.nnoc.v1.quarantine_pb2 import AgentStats
from trainer.service.rollout import (
    RolloutController,
    RolloutError,
    RolloutPolicy,
    cohort_hash,
    desired,
    judge,
    new_record,
    reached_stage,
    release,
)
from trainer.service.store import StoreError


def test_policy_forms_and_their_errors(tmp_path: Path) -> None:
    p = RolloutPolicy.parse("canary=2,steps=10,50,100,bake=2m,max-reject-rate=20%,abort-threshold=0.1")
    assert (p.canary_count, p.steps, p.bake, p.max_reject_rate, p.abort_threshold) == (
        2,
        (0.1, 0.5, 1.0),
        120,
        0.2,
        0.1,
    )
    assert RolloutPolicy.parse(p.describe()) == p
    assert RolloutPolicy.from_dict(p.to_dict()) == p
    named = RolloutPolicy.parse("canary=cam-1+cam-9,steps=1,100,bake=500ms")
    assert named.canary == ("cam-1", "cam-9") and named.steps == (0.01, 1.0) and named.bake == 0.5
    toml = RolloutPolicy.from_mapping({"canary": ["a"], "steps": [25, "100%"], "bake": "1h", "min_requests": 7})
    assert toml.canary == ("a",) and toml.steps == (0.25, 1.0) and toml.bake == 3600 and toml.min_requests == 7
    for bad, why in (
        ("steps=50", "last step must be 100%"),
        ("steps=50,10,100", "must grow"),
        ("bake=2x", "not a duration"),
        ("max-reject-rate=150%", "[0%, 100%]"),
        ("colour=red", "unknown rollout key"),
        ("canary=1,canary=2", "given twice"),
        ("nonsense", "expected KEY=VALUE"),
    ):
        with pytest.raises(RolloutError, match=why.replace("[", r"\[").replace("]", r"\]")):
            RolloutPolicy.parse(bad)


def test_cohorts_are_stable_nested_and_differ_between_rollouts() -> None:
    devices = [f"cam-{i}" for i in range(4000)]
    record = new_record("r1", "f", 2, 1, RolloutPolicy.parse("steps=5,25,100"), [], "test")
    reached = []
    for stage in range(3):
        record["stage"] = stage
        reached.append({d for d in devices if reached_stage(record, d) is not None})
    assert reached[0] <= reached[1] <= reached[2] and len(reached[2]) == len(devices)
    for got, want in zip(reached[:2], (0.05, 0.25), strict=True):
        assert abs(len(got) / len(devices) - want) < 0.02  # a uniform hash: the share is what the step says
    assert [cohort_hash("r1", d) for d in devices[:50]] == [cohort_hash("r1", d) for d in devices[:50]]
    other = {d for d in devices if cohort_hash("r2", d) < 0.25}
    assert len(other & reached[1]) < 0.5 * len(reached[1])  # another rollout draws another cohort


def _device(name: str, version: int, seen: float, subscribed: bool = True) -> dict[str, Any]:
    return {"device_id": name, "bundle_version": version, "last_seen": seen, "subscribed": int(subscribed)}


def test_judging_each_verdict_and_the_decisions() -> None:
    policy = RolloutPolicy.parse(
        "canary=a+b+c+d+e+f+g,steps=100,bake=10s,min-requests=50,heartbeat=30s,apply-timeout=20s"
    )
    record = new_record("r", "f", 2, 1, policy, list("abcdefg"), "test")
    t0 = record["stage_started"][0]
    devices = [
        _device("a", 2, t0 + 1),  # healthy: same rate as on v1
        _device("b", 2, t0 + 1),  # reject rate up by 0.4
        _device("c", 1, t0 + 1),  # told 25 s ago, still on v1: not applied
        _device("d", 2, t0 + 1, subscribed=False),  # heard from after the start, then silent 40 s: lost
        _device("e", 1, t0 - 100, subscribed=False),  # gone since before the rollout: offline, not judged
        _device("f", 2, t0 + 1),  # too few requests yet
        _device("g", 2, t0 + 1),  # its models failed
        _device("z", 1, t0 + 1),  # not in the canary: not judged
    ]
    traffic = {
        ("a", 1): (200, 10, 0),
        ("a", 2): (100, 6, 0),
        ("b", 1): (200, 10, 0),
        ("b", 2): (100, 45, 0),
        ("d", 2): (100, 5, 0),
        ("f", 2): (10, 0, 0),
        ("g", 2): (100, 0, 9),
    }
    record["online"]["c"] = t0  # first heard from at the start
    j = judge(record, devices, traffic, t0 + 41)
    verdicts = {d: v[0] for d, v in j.verdicts.items()}
    assert verdicts == {
        "a": "healthy",
        "b": "reject-rate",
        "c": "not-applied",
        "d": "lost",
        "e": "offline",
        "f": "gathering",
        "g": "errors",
    }
    assert j.action == "abort" and "4 of 6 devices failing" in j.reason and "b: reject-rate" in j.reason
    # the healthy and still-gathering devices alone: past the bake time the canary passes, the last stage completes
    calm = [d for d in devices if d["device_id"] in ("a", "e", "f")]
    assert judge(record, calm, traffic, t0 + 41).action == "advance"
    assert judge({**record, "stage": 1}, calm, traffic, t0 + 41).action == "complete"
    assert judge(record, calm, traffic, t0 + 5).action == "wait"  # still baking
    assert judge(record, [devices[5]], traffic, t0 + 41).action == "wait"  # nobody has enough traffic yet
    record["state"] = "paused"
    assert judge(record, calm, traffic, t0 + 41).action == "wait"
    assert judge(record, devices, traffic, t0 + 41).action == "abort"  # a pause does not stop the abort
    lenient = {**record, "policy": {**policy.to_dict(), "abort_threshold": 0.7}}
    lenient["state"] = "running"
    assert judge(lenient, devices, traffic, t0 + 41).action == "advance"  # 4 failing of 6 is under a 70% threshold


def test_store_records_refusals_completion_and_abort(tmp_path: Path) -> None:
    store = tiny_store(tmp_path / "store", "f", versions=(1, 2, 3))
    policy = RolloutPolicy.parse("canary=cam-1,steps=100,bake=0s")
    with pytest.raises(StoreError, match="already fleet 'f'"):
        release(store, None, "f", 1, "test", policy)
    with pytest.raises(RolloutError, match="has none yet"):
        release(store, None, "f", 2, "test", RolloutPolicy.parse("canary=2,steps=100"))
    record = release(store, None, "f", 2, "test", policy)
    assert record is not None and store.state("f").rollout == record["id"] and store.state("f").current == 1
    for action in (lambda: store.publish("f", 3), lambda: store.rollback("f", 1)):
        with pytest.raises(StoreError, match="rollout abort"):
            action()
    with pytest.raises(StoreError, match="running"):
        release(store, None, "f", 3, "test", policy)
    assert desired(1, record, "cam-1") == (2, False) and desired(1, record, "cam-2") == (1, False)

    def finish(r: dict[str, Any]) -> None:
        r["state"] = "completed"

    store.update_rollout("f", record["id"], finish)
    state = store.state("f")
    assert state.current == 2 and state.rollout is None and state.history[-1]["by"] == f"rollout {record['id']}"
    second = release(store, None, "f", 3, "test", policy)
    assert second is not None

    def stop(r: dict[str, Any]) -> None:
        r["state"] = "aborted"

    store.update_rollout("f", second["id"], stop)
    aborted = store.rollout("f")
    assert aborted is not None and aborted["state"] == "aborted" and store.state("f").current == 2
    assert desired(2, aborted, "cam-1") == (2, True)  # the canary goes back, told it is a rollback
    store.publish("f", 3)  # a publish supersedes the aborted rollout
    assert store.state("f").rollout is None and [r["state"] for r in store.rollouts("f")] == ["completed", "aborted"]
    store.set_rollout_policy("f", policy.to_dict())
    store.add("f", _tiny(tmp_path, 4))
    made = release(store, None, "f", 4, "a repair job")  # the fleet's default policy
    assert made is not None and made["policy"] == policy.to_dict()


def _tiny(tmp_path: Path, version: int) -> Path:
    from conftest import tiny_bundle

    return tiny_bundle(tmp_path / f"tiny-{version}", "f", version)


class Fleet:
    """Light simulated agents: each holds a real Subscribe stream, serves what it is told, and reports stats
    (requests and rejects under its version, at a reject rate per version) into the service's registry."""

    def __init__(self, port: int, registry: Any, names: list[str], rates: dict[int, float]) -> None:
        self.registry, self.rates = registry, rates
        self.serving = dict.fromkeys(names, 1)
        self.told: dict[str, list[tuple[int, bool]]] = {n: [] for n in names}
        self.counts = {n: [0, 0] for n in names}
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = ms_grpc.ModelServiceStub(self.channel)
        self.streams = []
        for name in names:
            stream = stub.Subscribe(ms.SubscribeRequest(fleet="f", device_id=name, current_version=1))
            self.streams.append(stream)
            threading.Thread(target=self._listen, args=(name, stream), daemon=True).start()

    def _listen(self, name: str, stream: Any) -> None:
        try:
            for notice in stream:
                self.told[name].append((notice.version, notice.rollback))
                if notice.version != self.serving[name]:
                    self.serving[name] = notice.version
                    self.counts[name] = [0, 0]  # a new stretch on the new version
        except grpc.RpcError:
            pass

    def report(self, per_tick: int = 25) -> None:
        for name, version in self.serving.items():
            c = self.counts[name]
            c[0] += per_tick
            c[1] = round(c[0] * self.rates[version])
            self.registry.record_stats(
                AgentStats(
                    device_id=name,
                    fleet="f",
                    bundle_version=version,
                    version_requests=c[0],
                    version_rejects=c[1],
                )
            )

    def close(self) -> None:
        for s in self.streams:
            s.cancel()
        self.channel.close()


def test_a_fleet_follows_rollouts_stage_by_stage_and_a_bad_one_stops_at_the_canary(tmp_path: Path) -> None:
    store = tiny_store(tmp_path / "store", "f", versions=(1, 2, 3))
    server = start_service(store, tmp_path)
    registry = server.servicer.registry
    names = [f"cam-{i:02d}" for i in range(40)]
    fleet = Fleet(server.port, registry, names, {1: 0.05, 2: 0.06, 3: 0.5})
    controller = RolloutController(store, registry)
    try:
        assert wait_for(lambda: all(fleet.told[n] == [(1, False)] for n in names), 30)
        fleet.report()
        policy = RolloutPolicy.parse("canary=3,steps=25,100,bake=0.3s,min-requests=50")

        def drive(until: Any, limit: float = 60.0) -> list[tuple[int, set[str]]]:
            """Report and judge until ``until()``; returns (stage, devices serving the target) per tick."""
            seen = []
            deadline = time.monotonic() + limit
            while not until() and time.monotonic() < deadline:
                fleet.report()
                controller.tick()
                r = store.rollout("f") or store.rollouts("f")[-1]
                seen.append((int(r["stage"]), {n for n, v in fleet.serving.items() if v == r["target"]}))
                time.sleep(0.05)
            return seen

        good = release(store, registry, "f", 2, "test", policy)
        assert good is not None and len(good["canary"]) == 3
        seen = drive(lambda: store.state("f").current == 2)
        assert store.state("f").current == 2 and store.rollouts("f")[-1]["state"] == "completed"
        for stage, on_target in seen:  # never beyond the stage's cohort
            reached = {n for n in names if reached_stage({**good, "stage": stage}, n) is not None}
            assert on_target <= reached
        assert {s for s, _ in seen} == {0, 1, 2}
        assert wait_for(lambda: all(v == 2 for v in fleet.serving.values()), 10)
        assert all(fleet.told[n][-1] == (2, False) for n in names)

        bad = release(store, registry, "f", 3, "test", policy)
        assert bad is not None
        drive(lambda: (store.rollout("f") or {}).get("state") == "aborted", 30)
        record = store.rollout("f")
        assert record is not None and record["state"] == "aborted" and record["stage"] == 0
        assert "reject-rate" in record["reason"] and store.state("f").current == 2
        canary = set(bad["canary"])
        assert wait_for(lambda: all(v == 2 for v in fleet.serving.values()), 10)  # the canary went back by itself
        for n in names:
            got3 = [t for t in fleet.told[n] if t[0] == 3]
            assert bool(got3) == (n in canary)  # nobody outside the canary was ever told v3
            if n in canary:
                assert fleet.told[n][-1] == (2, True)  # told to go back, as a rollback

        # the operator: pause holds a stage past its bake time, resume moves on, abort moves the reached back
        store.publish("f", 3)
        assert wait_for(lambda: all(v == 3 for v in fleet.serving.values()), 10)
        from trainer.service.fleet import rollout_command

        store.add("f", _tiny(tmp_path, 4))
        fleet.rates[4] = fleet.rates[3]  # as good as v3 on the same traffic
        third = release(
            store, registry, "f", 4, "test", RolloutPolicy.parse("canary=3,steps=100,bake=0.3s,min-requests=50")
        )
        assert third is not None
        rollout_command(store, "f", "pause", "looking at it")
        drive(lambda: False, 1.5)
        held = store.rollout("f")
        assert (
            held is not None and held["state"] == "paused" and held["stage"] == 0 and "looking at it" in held["log"][-1]
        )
        RolloutController(store, registry).tick()  # a restarted controller reads the same record: still paused
        rollout_command(store, "f", "resume", "")
        drive(lambda: (store.rollout("f") or {}).get("stage") == 1, 20)
        assert (store.rollout("f") or {}).get("stage") == 1
        rollout_command(store, "f", "abort", "enough")
        stopped = store.rollout("f")
        assert stopped is not None and stopped["state"] == "aborted" and "by the operator (enough)" in stopped["reason"]
        assert wait_for(lambda: all(v == 3 for v in fleet.serving.values()), 10)
        with pytest.raises(StoreError, match="no running or paused rollout"):
            rollout_command(store, "f", "resume", "")
    finally:
        fleet.close()
        server.stop()


def _cams_bundle(out: Path, version: int, monitor_seed: int) -> Path:
    """A real bundle (ONNX) for fleet cams: primary seed 0; a monitor of the same seed agrees on every input, one of
    another seed disagrees on (nearly) every input: a version that would reject the fleet's traffic."""
    import torch

    from edge_agent.formats.bundle import write_bundle
    from edge_agent.formats.preprocess import Preprocess
    from edge_agent.formats.spec import InputSpec
    from protos.nnoc.v1 import bundle_pb2
    from trainer.science.export import export_onnx
    from trainer.science.models import build_model

    out.mkdir(parents=True)
    spec = InputSpec.for_image((3, 32, 32), Preprocess(color="rgb", size=(32, 32), mean=(0.5,), std=(0.25,)))
    files = {}
    for role, seed in (("primary", 0), ("monitor", monitor_seed)):
        torch.manual_seed(seed)
        files[role] = out / f"{role}.onnx"
        export_onnx(build_model("cnn3", (3, 32, 32), 10), spec, tuple("0123456789"), files[role])
    manifest = bundle_pb2.Manifest(
        fleet="cams", version=version, input_spec=spec.message(), class_names=list("0123456789")
    )
    write_bundle(out / "bundle", files, manifest)
    return out


def test_real_agents_follow_rollouts_a_bad_one_returns_by_itself_and_a_restart_resumes(tmp_path: Path) -> None:
    """Three ``nnoc-edge run`` processes and ``nnoc-trainer serve`` on loopback. A good version goes through every
    stage; a bad one (its monitor disagrees on every input) stops at the canary, whose agent returns to the
    previous version by itself, and no other agent ever serves it; a paused rollout survives a trainer restart and
    completes after resume."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import numpy as np

    from conftest import ROOT, free_port, make_version, run_cli
    from trainer.service.registry import Registry

    store, state = tmp_path / "store", tmp_path / "serve-state"
    good = _cams_bundle(tmp_path / "v1", 1, monitor_seed=0)
    _cams_bundle(tmp_path / "v3", 3, monitor_seed=1)
    make_version(good, tmp_path / "v2", 2)
    make_version(good, tmp_path / "v4", 4)
    frames = tmp_path / "frames.npy"
    np.save(frames, np.random.default_rng(0).integers(0, 256, (24, 3, 40, 40), dtype=np.uint8))
    run_cli("trainer", "fleet", "create", "cams", "--from", str(good), "--store", str(store))
    service, collector = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def fleet(*args: str, check: bool = True) -> dict[str, Any]:
        _, out, _ = run_cli("trainer", "fleet", *args, "--store", str(store), "--state-dir", str(state), check=check)
        return out or {}

    def start_serve() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer", "serve", "--insecure", "--store", str(store), "--state-dir", str(state),
             "--listen", f"127.0.0.1:{service}", "--collector", f"tcp://127.0.0.1:{collector}", "--no-jobs",
             "--rollout-interval", "0.2", "--quiet"],
            cwd=ROOT, env=env, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def devices() -> dict[str, int]:
        return {d["device_id"]: d["bundle_version"] for d in fleet("status", "cams")["devices"]}

    def rollout() -> dict[str, Any]:
        return fleet("status", "cams")["rollout"] or {}

    serve = start_serve()

    def start_agent(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--insecure", "--device-id", name, "--fleet", "cams",
             "--bundle", str(good / "bundle"), "--model-service", f"127.0.0.1:{service}",
             "--collector", f"tcp://127.0.0.1:{collector}", "--infer-port", "0", "--stats-interval", "0.3",
             "--source", f"npy:{frames}?loop=1&fps=30", "--state-dir", str(tmp_path / name), "--quiet"],
            cwd=ROOT, env=env, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    agents = [start_agent(name) for name in ("cam-a", "cam-b", "cam-c")]
    policy = "steps=50,100,bake=1s,min-requests=20,apply-timeout=30s,heartbeat=30s"
    try:
        assert wait_for(lambda: devices() == {"cam-a": 1, "cam-b": 1, "cam-c": 1}, 90)

        fleet("publish", "cams", "--from", str(tmp_path / "v2"), "--rollout", f"canary=cam-a,{policy}")
        assert wait_for(lambda: rollout().get("state") == "completed", 90), rollout()
        assert wait_for(lambda: devices() == {"cam-a": 2, "cam-b": 2, "cam-c": 2}, 30)
        done = fleet("status", "cams")
        assert done["current"] == 2 and [ln.split(" ", 2)[-1][:5] for ln in done["rollout"]["log"]][-1]
        assert len(done["rollout"]["stage_started"]) == 3  # canary, 50%, 100%: every stage ran

        fleet("publish", "cams", "--from", str(tmp_path / "v3"), "--rollout", f"canary=cam-b,{policy}")
        assert wait_for(lambda: rollout().get("state") == "aborted", 90), rollout()
        stopped = rollout()
        assert stopped["stage"] == 0 and "cam-b: reject-rate" in stopped["reason"], stopped["reason"]
        assert wait_for(lambda: devices() == {"cam-a": 2, "cam-b": 2, "cam-c": 2}, 30)  # cam-b went back itself
        registry = Registry(state / "registry.sqlite")
        try:
            served = registry.traffic(["cam-a", "cam-b", "cam-c"], (3,))
        finally:
            registry.close()
        assert set(served) == {("cam-b", 3)} and served[("cam-b", 3)][1] > 0  # only the canary ever served v3
        assert fleet("status", "cams")["current"] == 2

        fleet("publish", "cams", "--from", str(tmp_path / "v4"), "--rollout", f"canary=cam-c,{policy}")
        fleet("rollout", "pause", "cams", "--reason", "maintenance window")
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
        serve = start_serve()  # a trainer restart mid-rollout: the record says paused, stage 0
        assert wait_for(lambda: (state / "serve.json").is_file(), 60)
        time.sleep(2.0)  # past the bake time: a paused rollout does not move on
        held = rollout()
        assert held["state"] == "paused" and held["stage"] == 0
        fleet("rollout", "resume", "cams")
        assert wait_for(lambda: rollout().get("state") == "completed", 90), rollout()
        assert wait_for(lambda: devices() == {"cam-a": 4, "cam-b": 4, "cam-c": 4}, 30)
        from trainer.service.fleet import render

        text = render(fleet("status", "cams"))  # what `fleet status` prints
        assert "current v4" in text and "completed" in text and "resumed by the operator" in text
        code, _, err = run_cli("trainer", "fleet", "rollout", "abort", "cams", "--store", str(store), check=False)
        assert code == 2 and "no running or paused rollout" in err
        assert json.loads((state / "serve.json").read_text())["pid"] == serve.pid
    finally:
        for proc in (*agents, serve):
            proc.send_signal(signal.SIGTERM)
        for proc in (*agents, serve):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_agents_count_per_version_and_the_registry_adds_up_their_stretches(tmp_path: Path) -> None:
    from edge_agent.monitor import VersionCounts
    from trainer.service.registry import Registry

    c = VersionCounts()
    c.record(1, 10, 2)
    c.start(2)  # a swap
    c.record(2, 5, 1)
    c.record(1, 3, 0)  # a batch v1 was still answering during the swap counts for v1
    assert c.get(1) == (13, 2, 0) and c.get(2) == (5, 1, 0) and c.get(7) == (0, 0, 0)
    c.error(2, 4)
    assert c.get(2) == (9, 1, 4)
    c.start(1)  # moved back: v1's new stretch starts from zero
    assert c.get(1) == (0, 0, 0)

    registry = Registry(tmp_path / "registry.sqlite")

    def stats(version: int, requests: int, rejects: int) -> None:
        registry.record_stats(
            AgentStats(device_id="cam-1", fleet="f", bundle_version=version, version_requests=requests,
                       version_rejects=rejects)
        )  # fmt: skip

    stats(1, 100, 40)
    stats(1, 150, 60)  # the same stretch grew
    stats(2, 30, 1)
    stats(1, 20, 5)  # back on v1 (or the agent restarted): a new stretch, added
    assert registry.traffic(["cam-1"], (1, 2)) == {("cam-1", 1): (170, 65, 0), ("cam-1", 2): (30, 1, 0)}
    assert registry.devices("f")[0]["bundle_version"] == 1
    registry.close()
