"""``nnoc-trainer fleet``: operator commands on the model store and the trainer service's state.

They work on the store directly (atomic, locked against concurrent writers); a running ``serve`` notices a
change of a fleet's current version or rollout within a fraction of a second and tells the agents concerned.
A staged rollout (``publish --rollout``, or the fleet's ``policy``) is judged and moved on by ``serve``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainer.card import CARD_FILE, ModelCard
from trainer.service.collector import quarantine_size
from trainer.service.registry import Registry
from trainer.service.rollout import ACTIVE, RolloutError, RolloutPolicy, abort, note, release
from trainer.service.rollout import render as render_rollout
from trainer.service.store import ModelStore, StoreError


def status(store: ModelStore, state_dir: Any, fleet: str) -> dict[str, Any]:
    """A fleet's versions (with quarantine sizes), devices, jobs and history."""
    state = store.state(fleet)
    quarantine_root = state_dir / "quarantine"
    record = store.rollout(fleet) or next(reversed(store.rollouts(fleet)), None)  # the governing one, or the latest
    out: dict[str, Any] = {
        "fleet": fleet,
        "current": state.current,
        "rollout": record,
        "rollout_policy": state.rollout_policy,
        "card": state.card,
        "versions": [
            {"version": v, "current": v == state.current, "quarantine": quarantine_size(quarantine_root, fleet, v)}
            for v in state.versions
        ],
        "devices": [],
        "jobs": [],
        "history": state.history,
    }
    registry_path = state_dir / "registry.sqlite"
    if registry_path.is_file():
        registry = Registry(registry_path)
        try:
            out["devices"] = registry.devices(fleet)
            out["jobs"] = [j.__dict__ for j in registry.jobs(fleet)]
        finally:
            registry.close()
    return out


def render(st: dict[str, Any]) -> str:
    """The status as a short terminal report."""
    lines = [f"fleet {st['fleet']}: current v{st['current']}"]
    if st.get("card"):
        card = st["card"]
        data, repair = card.get("data") or {}, card.get("repair") or {}
        profile = repair.get("profile", "serve's")
        lines.append(f"model card: photos {data.get('dir', '-')}, repair profile {profile}")
    else:
        lines.append("model card: none (repair jobs read serve's data flags; set one with 'fleet card')")
    if st.get("rollout_policy"):
        lines.append(f"rollout policy: {RolloutPolicy.from_dict(st['rollout_policy']).describe()}")
    if st.get("rollout"):
        lines += render_rollout(st["rollout"])
    lines += ["", "version  current  quarantine"]
    lines += [f"v{v['version']:<7} {'*' if v['current'] else '':<8} {v['quarantine']}" for v in st["versions"]]
    lines += ["", "device                version  requests  rejects  window rate  spool  last seen"]
    for d in st["devices"]:
        seen = time.strftime("%H:%M:%S", time.localtime(d["last_seen"]))
        lines.append(
            f"{d['device_id']:<21} v{d['bundle_version']:<7} {d['requests']:<9} {d['rejects']:<8} "
            f"{d['window_reject_rate']:<12.3f} {d['spool_depth']:<6} {seen}"
        )
    lines += ["", "job                     from  state          version  reason"]
    for j in st["jobs"]:
        made = f"v{j['version']}" if j["version"] else "-"
        lines.append(f"{j['id']:<23} v{j['from_version']:<4} {j['state']:<14} {made:<8} {j['reason']}")
    return "\n".join(lines)


@contextmanager
def _registry(state_dir: Path) -> Iterator[Registry | None]:
    """The service's registry when it exists (a rollout's canary count picks among its devices), else None."""
    path = state_dir / "registry.sqlite"
    if not path.is_file():
        yield None
        return
    registry = Registry(path)
    try:
        yield registry
    finally:
        registry.close()


def policy_of(args: argparse.Namespace) -> RolloutPolicy | None:
    """``--rollout`` or ``--rollout-file`` -> a policy; None when neither was given."""
    if args.rollout is not None:
        return RolloutPolicy.parse(args.rollout)
    if args.rollout_file is not None:
        import tomllib

        try:
            data = tomllib.loads(args.rollout_file.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise RolloutError(f"--rollout-file {args.rollout_file}: {e}") from None
        return RolloutPolicy.from_mapping(data.get("rollout", data))
    return None


def rollout_command(store: ModelStore, fleet: str, action: str, reason: str) -> None:
    """``fleet rollout pause|resume|abort`` on the fleet's rollout record (a running ``serve`` acts on it within
    its judging interval; an abort moves the devices reached back at once)."""
    record = store.rollout(fleet)
    if action == "status":
        if record is None and not store.rollouts(fleet):
            raise StoreError(f"fleet {fleet!r} has no rollout; start one with 'fleet publish {fleet} --rollout ...'")
        return
    if record is None or record["state"] not in ACTIVE:
        raise StoreError(f"fleet {fleet!r} has no running or paused rollout to {action}")
    why = f" ({reason})" if reason else ""

    def change(r: dict[str, Any]) -> None:
        if r["state"] not in ACTIVE:
            raise StoreError(f"rollout {r['id']} is {r['state']} already")
        if action == "pause":
            r["state"] = "paused"
            note(r, f"paused by the operator{why}")
        elif action == "resume":
            r["state"] = "running"
            note(r, f"resumed by the operator{why}")
        else:
            abort(r, f"aborted by the operator{why}")

    store.update_rollout(fleet, record["id"], change)


def cancel_job(state_dir: Path, fleet: str, job_id: str) -> None:
    """Ask ``serve`` to cancel a repair job (it stops the job at its next pass; no version is added)."""
    with _registry(state_dir) as registry:
        if registry is None:
            raise StoreError(f"no trainer state in {state_dir}: pass the --state-dir 'nnoc-trainer serve' uses")
        try:
            job = registry.job(job_id)
        except KeyError:
            raise StoreError(f"no repair job {job_id!r}; 'fleet status {fleet}' lists the jobs") from None
        if job.fleet != fleet:
            raise StoreError(f"job {job_id} belongs to fleet {job.fleet!r}, not {fleet!r}")
        registry.request_cancel(job_id)


def check_source(source: Path) -> None:
    """A ``--from`` folder holding a bundle that verifies (a predeploy or repair output, or a bundle)."""
    from edge_agent.formats.bundle import BundleError, verify_bundle

    bundle_dir = source / "bundle" if (source / "bundle").is_dir() else source
    if not bundle_dir.is_dir():
        raise StoreError(f"--from {source}: no such folder; give a predeploy or repair output folder")
    try:
        verify_bundle(bundle_dir)
    except BundleError as e:
        raise StoreError(f"--from {source}: {e}") from None


def card_of(path: Path | None, source: Path | None) -> ModelCard | None:
    """The model card ``--card`` names, else the one a ``--from`` predeploy folder holds (None: neither)."""
    if path is None and source is not None and (source / CARD_FILE).is_file():
        path = source / CARD_FILE
    if path is None:
        return None
    card = ModelCard.load(path)
    rollout = card.get("rollout", "policy")
    if rollout:
        RolloutPolicy.parse(rollout)  # checked before the fleet exists
    return card


def fleet_command(args: argparse.Namespace) -> dict[str, Any]:
    """Dispatch ``nnoc-trainer fleet ACTION``; StoreError is a ValueError (exit 2 with its message)."""
    from edge_agent.formats.signing import load_private_key

    key = load_private_key(args.signing_key) if args.signing_key else None
    # Only `create` may make a new store; the others name one that exists (a typo is an error, not a new folder).
    store = ModelStore(args.store, key, create=args.action == "create")
    if args.action == "list":
        return {"fleets": store.fleets(), "text": "\n".join(store.fleets()) or "(no fleets)"}
    fleet = args.fleet
    if args.action == "create":
        if args.source is not None:
            check_source(args.source)  # before the fleet exists: a bad --from leaves nothing behind
        card = card_of(args.card, args.source)
        store.create(fleet)
        if card is not None:
            store.set_card(fleet, card.to_dict())
            rollout = card.get("rollout", "policy")
            if rollout:
                store.set_rollout_policy(fleet, RolloutPolicy.parse(rollout).to_dict(), by="card")
        if args.source is not None:
            try:
                version = store.add(fleet, args.source)
            except StoreError:
                store.remove_empty(fleet)
                raise
            store.publish(fleet, version, note="created")
    elif args.action == "publish":
        if args.source is None and args.version is None:
            raise StoreError("publish needs --from DIR (a new bundle) or --version V (a stored one)")
        policy = policy_of(args)
        if args.now and policy is not None:
            raise StoreError("--now publishes at once; it does not go with --rollout")
        if args.source is not None:
            check_source(args.source)
        version = store.add(fleet, args.source) if args.source is not None else args.version
        if args.now:
            store.publish(fleet, version)
        else:
            with _registry(args.state_dir) as registry:
                release(store, registry, fleet, version, by="operator", policy=policy)
    elif args.action == "policy":
        policy = policy_of(args)
        if (policy is None) == (not args.clear):
            raise StoreError("policy takes --rollout POLICY or --rollout-file FILE, or --clear")
        store.set_rollout_policy(fleet, policy.to_dict() if policy is not None else None)
    elif args.action == "card":
        card = card_of(args.card, None)
        if card is None:
            raise StoreError("card needs --card FILE (a model card, as nnoc-trainer init writes it)")
        store.set_card(fleet, card.to_dict())
    elif args.action == "rollout":
        rollout_command(store, fleet, args.rollout_action, args.reason)
    elif args.action == "cancel":
        cancel_job(args.state_dir, fleet, args.job)
    elif args.action == "rollback":
        store.rollback(fleet, args.version)
    st = status(store, args.state_dir, fleet)
    st["text"] = render(st)
    return st
