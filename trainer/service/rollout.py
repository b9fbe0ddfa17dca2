"""Staged rollouts: a new version reaches a fleet cohort by cohort, judged on the fleet's own traffic, and stops
itself (moving the devices it reached back) when too many of them fail.

A rollout is a record of its own in the model store (``<fleet>/rollouts/<id>.json``), separate from the signed
bundle: target and baseline versions, the policy, which stage it is in and since when, the latest verdict of
every device it reached, and a log. The fleet's ``current`` version stays the baseline until the last stage
passes; the model service tells each device the version the record gives it (:func:`desired`).

Stages (what AWS IoT jobs, Eclipse hawkBit, Mender and Azure Device Update call rollout groups or phases):

- an optional **canary**: devices named by the operator, or the N known devices of the fleet that come first by
  the rollout's stable hash (picked when the rollout starts and written into the record);
- **steps**: shares of the fleet (e.g. 5% -> 25% -> 100%). A device belongs to a step when
  ``sha256(rollout id : device id)`` read as a number in [0, 1) lies below the step's share: the same device
  stays in its cohort for the whole rollout (across trainer restarts and reconnections), a larger share holds
  every device of a smaller one, and different rollouts draw different cohorts.

Each stage bakes for ``bake`` seconds; every device reached so far is judged on what its agent already reports
(stats messages, subscriptions), never on which inputs were triggered:

- ``not-applied``: it did not report the target within ``apply_timeout`` of being reached and online (its agent
  refused the bundle, failed the download, or failed its canary input);
- ``lost``: it was heard from after being reached, then its subscription closed and nothing came for
  ``heartbeat`` seconds;
- ``errors``: the target's models failed on more than ``max_error_rate`` of its requests;
- ``reject-rate``: over at least ``min_requests`` requests on the target, its reject rate rose more than
  ``max_reject_increase`` above the same device's rate on the baseline (when it served at least
  ``min_requests`` on the baseline), or above ``max_reject_rate`` (when set);
- ``healthy``; or no verdict yet: ``updating`` (within the apply timeout), ``gathering`` (fewer requests than
  ``min_requests``), ``offline`` (not heard from since before it was reached: it gets the target when it returns).

When more than ``abort_threshold`` of the judged devices fail, the rollout aborts at once (not only at the end of
a bake) and every device it reached is told to go back to the baseline (agents keep the previous version cached).
A stage passes when its bake time is over, no device is still updating, and at least one device was judged
healthy (or the stage reached no device online); the last stage passing makes the target the fleet's current
version. An operator may pause (no stage starts; the judging and the abort go on), resume or abort.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from edge_agent.formats.names import is_name

log = logging.getLogger(__name__)

ACTIVE = ("running", "paused")
STATES = (*ACTIVE, "completed", "aborted")
FAILING = ("not-applied", "lost", "errors", "reject-rate")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class RolloutError(ValueError):
    """A rollout setting or operation that cannot be done; the message says why and what to do."""


def duration(text: Any) -> float:
    """``90``, ``90s``, ``2m``, ``1.5h``, ``500ms`` -> seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _DURATION.match(str(text).strip())
        if not m:
            raise RolloutError(f"{text!r} is not a duration (e.g. 90s, 2m, 1h)")
        value = float(m.group(1)) * _UNITS[m.group(2)]
    if value < 0:
        raise RolloutError(f"a duration cannot be negative, got {text!r}")
    return value


def share(text: Any, percent: bool = False) -> float:
    """``25%`` -> 0.25; a bare number is a fraction when it is at most 1 (``0.25``) and percent above (``25``),
    or always percent when ``percent`` (a step: ``steps=1,10,100``)."""
    s = str(text).strip()
    try:
        value = float(s.rstrip("%")) if not isinstance(text, bool) else float("nan")
    except ValueError:
        value = float("nan")
    if value != value:  # NaN: not a number
        raise RolloutError(f"{text!r} is not a share (e.g. 25% or 0.25)")
    if s.endswith("%") or percent or value > 1.0:
        value /= 100.0
    if not 0.0 <= value <= 1.0:
        raise RolloutError(f"a share lies in [0%, 100%], got {text!r}")
    return value


def cohort_hash(rollout_id: str, device_id: str) -> float:
    """Where a device falls in [0, 1) for one rollout: stable, uniform, independent between rollouts."""
    digest = hashlib.sha256(f"{rollout_id}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class RolloutPolicy:
    """How a rollout proceeds and what stops it (``--rollout`` keys in brackets)."""

    canary: tuple[str, ...] = ()  # [canary=cam-1+cam-2] devices named by the operator
    canary_count: int = 0  # [canary=2] or this many known devices, first by the rollout's hash
    steps: tuple[float, ...] = (0.05, 0.25, 1.0)  # [steps=5,25,100] shares of the fleet, the last one 100%
    bake: float = 300.0  # [bake=5m] seconds each stage runs before it is judged
    apply_timeout: float = 120.0  # [apply-timeout=2m] to report the target after being reached and online
    heartbeat: float = 120.0  # [heartbeat=2m] silence after which a reached device counts as lost
    min_requests: int = 100  # [min-requests=100] requests before a device's reject rate is judged
    max_reject_increase: float = 0.05  # [max-reject-increase=5%] above the device's own rate on the baseline
    max_reject_rate: float | None = None  # [max-reject-rate=20%] an absolute ceiling, when set
    max_error_rate: float = 0.01  # [max-error-rate=1%] requests the target's models failed on
    abort_threshold: float = 0.0  # [abort-threshold=10%] failing share of judged devices that aborts

    KEYS = {  # noqa: RUF012 (class-level table, not a field)
        "canary": "canary",
        "steps": "steps",
        "bake": "bake",
        "apply-timeout": "apply_timeout",
        "heartbeat": "heartbeat",
        "min-requests": "min_requests",
        "max-reject-increase": "max_reject_increase",
        "max-reject-rate": "max_reject_rate",
        "max-error-rate": "max_error_rate",
        "abort-threshold": "abort_threshold",
    }

    def __post_init__(self) -> None:
        if not self.steps or any(not 0.0 < s <= 1.0 for s in self.steps):
            raise RolloutError(f"steps are shares of the fleet in (0%, 100%], got {list(self.steps)}")
        if list(self.steps) != sorted(self.steps) or len(set(self.steps)) != len(self.steps):
            raise RolloutError(f"steps must grow: {[round(s * 100, 3) for s in self.steps]}")
        if self.steps[-1] != 1.0:
            raise RolloutError("the last step must be 100% (a rollout ends with the whole fleet)")
        if self.canary and self.canary_count:
            raise RolloutError("canary is either device names or a count, not both")
        if self.canary_count < 0 or self.min_requests < 1:
            raise RolloutError("canary count must be >= 0 and min-requests >= 1")

    @classmethod
    def parse(cls, text: str) -> RolloutPolicy:
        """``canary=2,steps=10,50,100,bake=2m,max-reject-rate=20%`` (a value with commas goes on until the next
        ``key=``); ``canary`` is a count, or device names joined by ``+``."""
        items: dict[str, list[str]] = {}
        key = None
        for token in (t.strip() for t in text.split(",")):
            if not token:
                continue
            name, eq, value = token.partition("=")
            if eq:
                key = name.strip()
                if key in items:
                    raise RolloutError(f"rollout key {key!r} given twice")
                items[key] = [value.strip()]
            elif key is None:
                raise RolloutError(f"rollout policy {text!r}: expected KEY=VALUE, got {token!r}")
            else:
                items[key].append(token)
        return cls.from_mapping({k: v if len(v) > 1 or k == "steps" else v[0] for k, v in items.items()})

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RolloutPolicy:
        """From a dict of ``--rollout`` keys (a TOML table, or :meth:`parse`'s result); unknown keys are errors."""
        kw: dict[str, Any] = {}
        for key, value in data.items():
            name = cls.KEYS.get(key.replace("_", "-"))
            if name is None:
                raise RolloutError(f"unknown rollout key {key!r}; known: {', '.join(cls.KEYS)}")
            try:
                kw.update(_convert(name, value))
            except (TypeError, ValueError) as e:
                raise RolloutError(f"rollout key {key}: {e}") from None
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (the rollout record keeps it)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutPolicy:
        """Back from :meth:`to_dict`."""
        names = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**kw)

    def describe(self) -> str:
        """One line, in ``--rollout`` form."""
        canary = "+".join(self.canary) if self.canary else str(self.canary_count)
        parts = [
            f"canary={canary}",
            "steps=" + ",".join(f"{s * 100:g}" for s in self.steps),
            f"bake={self.bake:g}s",
            f"apply-timeout={self.apply_timeout:g}s",
            f"heartbeat={self.heartbeat:g}s",
            f"min-requests={self.min_requests}",
            f"max-reject-increase={self.max_reject_increase * 100:g}%",
            f"max-error-rate={self.max_error_rate * 100:g}%",
            f"abort-threshold={self.abort_threshold * 100:g}%",
        ]
        if self.max_reject_rate is not None:
            parts.append(f"max-reject-rate={self.max_reject_rate * 100:g}%")
        return ",".join(parts)


def _convert(name: str, value: Any) -> dict[str, Any]:
    values = value if isinstance(value, list | tuple) else [value]
    if name == "canary":
        if isinstance(value, int) and not isinstance(value, bool):
            return {"canary_count": value}
        if isinstance(value, list | tuple):
            return {"canary": tuple(str(v) for v in value)}
        text = str(value).strip()
        if text.isdigit():
            return {"canary_count": int(text)}
        names = tuple(n for n in text.split("+") if n)
        bad = [n for n in names if not is_name(n)]
        if bad or not names:
            raise ValueError(f"canary {text[:80]!r}: a device count (0, 1, 2 ...) or device names joined by '+'")
        return {"canary": names}
    if name == "steps":
        return {"steps": tuple(share(v, percent=True) for v in values)}
    if len(values) != 1:
        raise ValueError(f"one value expected, got {values}")
    if name in ("bake", "apply_timeout", "heartbeat"):
        return {name: duration(value)}
    if name == "min_requests":
        return {name: int(value)}
    return {name: share(value)}


# -- the record ----------------------------------------------------------------------------------------------


def new_record(
    rollout_id: str, fleet: str, target: int, baseline: int, policy: RolloutPolicy, known: list[str] | None, by: str
) -> dict[str, Any]:
    """A rollout record at its start. ``known``: the fleet's known device ids (for a canary count; named canaries
    must be among them), None when no registry is at hand (the store alone: names cannot be checked)."""
    canary = list(policy.canary)
    unknown = sorted(set(canary) - set(known)) if known is not None else []
    if unknown:  # a canary no device has would pass the stage on no evidence at all
        raise RolloutError(
            f"canary device(s) {', '.join(unknown[:5])} are not known devices of fleet {fleet!r} "
            f"(known: {', '.join(sorted(known or [])[:10]) or 'none yet'}); name subscribed devices, or a count"
        )
    if policy.canary_count:
        canary = sorted(known or [], key=lambda d: cohort_hash(rollout_id, d))[: policy.canary_count]
    stages = ([{"name": "canary", "share": 0.0}] if canary else []) + [
        {"name": f"{s * 100:g}%", "share": s} for s in policy.steps
    ]
    now = time.time()
    return {
        "id": rollout_id,
        "fleet": fleet,
        "target": target,
        "baseline": baseline,
        "policy": policy.to_dict(),
        "canary": canary,
        "stages": stages,
        "stage": 0,
        "stage_started": [now],
        "state": "running",
        "reason": "",
        "by": by,
        "created": now,
        "updated": now,
        "online": {},  # device -> when it was first heard from after being reached (starts its apply timeout)
        "verdicts": {},  # device -> [verdict, detail], the latest judging
        "log": [f"{_stamp(now)} started by {by}: v{baseline} -> v{target}, stage {stages[0]['name']}"],
    }


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def note(record: dict[str, Any], text: str, now: float | None = None) -> None:
    """Append a line to the record's log."""
    record["log"].append(f"{_stamp(time.time() if now is None else now)} {text}")


def reached_stage(record: Mapping[str, Any], device_id: str) -> int | None:
    """The first stage (index) whose cohort holds the device, when that stage has started; else None."""
    h = None
    for i, stage in enumerate(record["stages"][: int(record["stage"]) + 1]):
        if stage["name"] == "canary":
            if device_id in record["canary"]:
                return i
            continue
        h = cohort_hash(record["id"], device_id) if h is None else h
        if h < stage["share"]:
            return i
    return None


def desired(current: int | None, record: Mapping[str, Any] | None, device_id: str) -> tuple[int | None, bool]:
    """The version a device of the fleet should serve, and whether going there is a move back (a rollback notice).

    ``current``: the fleet's current version; ``record``: the rollout the fleet points at (active, or aborted and
    not superseded by a later publish or rollback), or None.
    """
    if record is None or reached_stage(record, device_id) is None:
        return current, False
    if record["state"] in ACTIVE:
        return int(record["target"]), False
    if record["state"] == "aborted":
        return int(record["baseline"]), True
    return current, False


# -- judging -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    """The latest judging of a rollout: each reached device's verdict and what the rollout does next."""

    verdicts: dict[str, tuple[str, str]]
    action: str  # "wait", "advance", "complete", "abort"
    reason: str


def judge(
    record: dict[str, Any],
    devices: list[Mapping[str, Any]],
    traffic: Mapping[tuple[str, int], tuple[int, int, int]],
    now: float,
) -> Judgement:
    """Judge a running or paused rollout (updates ``record['online']``). ``devices``: the registry's rows of the
    fleet; ``traffic``: (device, version) -> (requests, rejects, errors) from the registry."""
    policy = RolloutPolicy.from_dict(record["policy"])
    target, baseline = int(record["target"]), int(record["baseline"])
    verdicts: dict[str, tuple[str, str]] = {}
    for d in devices:
        device = str(d["device_id"])
        stage = reached_stage(record, device)
        if stage is None:
            continue
        reached_at = float(record["stage_started"][stage])
        last_seen = float(d["last_seen"])
        connected = bool(d.get("subscribed"))  # an open Subscribe stream counts as a sign of life
        if last_seen < reached_at and not connected:
            verdicts[device] = ("offline", "not heard from since it was reached")
            continue
        if not connected and now - last_seen > policy.heartbeat:
            verdicts[device] = ("lost", f"silent for {now - last_seen:.0f} s (heartbeat {policy.heartbeat:g} s)")
            continue
        online_at = float(record["online"].setdefault(device, max(now, reached_at)))
        if int(d["bundle_version"]) != target:
            if now - online_at > policy.apply_timeout:
                verdicts[device] = (
                    "not-applied",
                    f"still serves v{d['bundle_version']} {now - online_at:.0f} s after it was told "
                    f"(apply timeout {policy.apply_timeout:g} s)",
                )
            else:
                verdicts[device] = ("updating", f"serves v{d['bundle_version']}")
            continue
        requests, rejects, errors = traffic.get((device, target), (0, 0, 0))
        if errors and errors > policy.max_error_rate * max(requests, 1):
            verdicts[device] = ("errors", f"the models failed on {errors} of {requests} requests")
            continue
        if requests < policy.min_requests:
            verdicts[device] = ("gathering", f"{requests} of {policy.min_requests} requests on v{target}")
            continue
        rate = rejects / requests
        before = traffic.get((device, baseline), (0, 0, 0))
        base = before[1] / before[0] if before[0] >= policy.min_requests else None
        if policy.max_reject_rate is not None and rate > policy.max_reject_rate:
            verdicts[device] = ("reject-rate", f"reject rate {rate:.3f} > max {policy.max_reject_rate:.3f}")
        elif base is not None and rate > base + policy.max_reject_increase:
            verdicts[device] = (
                "reject-rate",
                f"reject rate {rate:.3f} on v{target} against {base:.3f} on v{baseline} "
                f"(+{rate - base:.3f} > +{policy.max_reject_increase:.3f})",
            )
        else:
            against = f" against {base:.3f} on v{baseline}" if base is not None else ""
            verdicts[device] = ("healthy", f"reject rate {rate:.3f} over {requests} requests{against}")
    return Judgement(verdicts, *_decide(record, policy, verdicts, now))


def _decide(
    record: Mapping[str, Any], policy: RolloutPolicy, verdicts: Mapping[str, tuple[str, str]], now: float
) -> tuple[str, str]:
    stage = record["stages"][int(record["stage"])]["name"]
    judged = {d: v for d, v in verdicts.items() if v[0] != "offline"}
    failing = {d: v for d, v in judged.items() if v[0] in FAILING}
    if judged and len(failing) / len(judged) > policy.abort_threshold:
        worst = "; ".join(f"{d}: {v[0]} ({v[1]})" for d, v in sorted(failing.items())[:5])
        return "abort", (
            f"stage {stage}: {len(failing)} of {len(judged)} devices failing "
            f"(> {policy.abort_threshold * 100:g}% abort threshold): {worst}"
        )
    if record["state"] != "running":
        return "wait", "paused by the operator"
    baked = now - float(record["stage_started"][-1])
    if baked < policy.bake:
        return "wait", f"stage {stage}: baking, {policy.bake - baked:.0f} s left"
    updating = [d for d, v in judged.items() if v[0] == "updating"]
    if updating:
        return "wait", f"stage {stage}: {len(updating)} devices still updating"
    healthy = sum(v[0] == "healthy" for v in judged.values())
    if judged and not healthy:
        return "wait", f"stage {stage}: no device has served {policy.min_requests} requests on the target yet"
    last = int(record["stage"]) == len(record["stages"]) - 1
    return ("complete" if last else "advance"), f"stage {stage} passed: {healthy} healthy of {len(judged)} judged"


# -- the controller ------------------------------------------------------------------------------------------


class RolloutController:
    """Judges every fleet's active rollout every ``interval`` seconds and moves it on, in a thread of ``serve``.

    All state is in the store's records (read-modify-write under the store's lock), so a restarted trainer
    resumes each rollout where its record says, and ``nnoc-trainer fleet rollout pause`` in another process
    takes effect at the next tick.
    """

    def __init__(self, store: Any, registry: Any, interval: float = 1.0) -> None:
        self.store, self.registry, self.interval = store, registry, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollouts", daemon=True)
        self.ticks = 0

    def start(self) -> RolloutController:
        """Start judging."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop judging (records stay as they are; a restart resumes them)."""
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # a half-written store or registry must not end the rollouts; the next tick retries
                log.exception("judging rollouts failed")

    def tick(self, now: float | None = None) -> None:
        """One judging of every active rollout."""
        self.ticks += 1
        for fleet in self.store.fleets():
            record = self.store.rollout(fleet)
            if record is not None and record["state"] in ACTIVE:
                self.store.update_rollout(fleet, record["id"], self._step(fleet, now))

    def _step(self, fleet: str, now: float | None) -> Callable[[dict[str, Any]], None]:
        def step(record: dict[str, Any]) -> None:
            if record["state"] not in ACTIVE:  # the operator aborted it meanwhile
                return
            t = time.time() if now is None else now
            devices = self.registry.devices(fleet)
            traffic = self.registry.traffic(
                [d["device_id"] for d in devices], (int(record["target"]), int(record["baseline"]))
            )
            j = judge(record, devices, traffic, t)
            record["verdicts"] = {d: list(v) for d, v in j.verdicts.items()}
            record["status"] = j.reason
            if j.action == "abort":
                abort(record, j.reason, t)
                log.warning("rollout %s of %s v%s aborted: %s", record["id"], fleet, record["target"], j.reason)
            elif j.action == "advance":
                record["stage"] = int(record["stage"]) + 1
                record["stage_started"].append(t)
                note(record, f"{j.reason}; stage {record['stages'][record['stage']]['name']} starts", t)
                log.info("rollout %s of %s: %s", record["id"], fleet, record["log"][-1])
            elif j.action == "complete":
                record["state"] = "completed"
                record["reason"] = j.reason
                note(record, f"{j.reason}; v{record['target']} is the fleet's current version", t)
                log.info("rollout %s of %s v%s completed", record["id"], fleet, record["target"])

        return step


def abort(record: dict[str, Any], reason: str, now: float | None = None) -> None:
    """Stop a rollout: the devices it reached are told to go back to the baseline."""
    record["state"] = "aborted"
    record["reason"] = reason
    note(record, f"aborted: {reason}; the devices reached go back to v{record['baseline']}", now)


def render(record: Mapping[str, Any]) -> list[str]:
    """A rollout as lines for ``fleet status`` and ``fleet rollout status``."""
    stage = record["stages"][int(record["stage"])]
    lines = [
        f"rollout {record['id']}: v{record['baseline']} -> v{record['target']}, {record['state']}, "
        f"stage {int(record['stage']) + 1}/{len(record['stages'])} ({stage['name']})"
        + (f": {record['reason']}" if record.get("reason") else ""),
        f"  policy {RolloutPolicy.from_dict(record['policy']).describe()}",
    ]
    if record.get("canary"):
        lines.append(f"  canary {', '.join(record['canary'])}")
    if record.get("status") and record["state"] in ACTIVE:
        lines.append(f"  now: {record['status']}")
    for device, (verdict, detail) in sorted(record.get("verdicts", {}).items()):
        lines.append(f"  {device:<21} {verdict:<12} {detail}")
    lines += [f"  {line}" for line in record["log"][-8:]]
    return lines


def release(
    store: Any, registry: Any, fleet: str, version: int, by: str, policy: RolloutPolicy | None = None, note: str = ""
) -> dict[str, Any] | None:
    """Make a stored version reach the fleet: through a staged rollout under ``policy`` (default: the fleet's own
    rollout policy, when it has one), or at once (a plain publish). Returns the rollout record, or None."""
    if policy is None:
        default = store.state(fleet).rollout_policy
        if default is None:
            store.publish(fleet, version, by=by, note=note)
            return None
        policy = RolloutPolicy.from_dict(default)
    known = [str(d["device_id"]) for d in registry.devices(fleet)] if registry is not None else None
    if policy.canary_count and not known:
        raise RolloutError(
            f"canary={policy.canary_count} picks among the fleet's known devices and fleet {fleet!r} has none yet: "
            "name the canary devices (canary=cam-1+cam-2) or start the rollout once agents have reported"
        )

    def make(rollout_id: str, baseline: int) -> dict[str, Any]:
        return new_record(rollout_id, fleet, version, baseline, policy, known, by)

    record: dict[str, Any] = store.start_rollout(fleet, version, make, by)
    log.info("fleet %s: rollout %s of v%d started (%s)", fleet, record["id"], version, policy.describe())
    return record
