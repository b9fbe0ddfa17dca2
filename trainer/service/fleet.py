"""``nnoc-trainer fleet``: operator commands on the model store and the trainer service's state.

They work on the store directly (atomic, locked against concurrent writers); a running ``serve`` notices a
change of a fleet's current version within a fraction of a second and pushes it to the fleet's agents.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from trainer.service.collector import quarantine_size
from trainer.service.registry import Registry
from trainer.service.store import ModelStore, StoreError


def status(store: ModelStore, state_dir: Any, fleet: str) -> dict[str, Any]:
    """A fleet's versions (with quarantine sizes), devices, jobs and history."""
    state = store.state(fleet)
    quarantine_root = state_dir / "quarantine"
    out: dict[str, Any] = {
        "fleet": fleet,
        "current": state.current,
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
    lines = [f"fleet {st['fleet']}: current v{st['current']}", "", "version  current  quarantine"]
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
        store.create(fleet)
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
        version = store.add(fleet, args.source) if args.source is not None else args.version
        store.publish(fleet, version)
    elif args.action == "rollback":
        store.rollback(fleet, args.version)
    st = status(store, args.state_dir, fleet)
    st["text"] = render(st)
    return st
