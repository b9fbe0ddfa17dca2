"""The model store: fleets, their bundle versions, the current version of each fleet, and its history.

Layout under the store root (``exports/`` by default)::

    <fleet>/fleet.json               {"current": V, "history": [{"action", "version", "at", "by", "note"}],
                                      "rollout": ID or null, "rollout_policy": {...} or absent,
                                      "card": the fleet's model card (trainer/card.py) or absent}
    <fleet>/rollouts/<ID>.json       a staged rollout's record (trainer/service/rollout.py)
    <fleet>/<V>/bundle/              what agents download: primary.onnx, monitor.onnx, manifest.pb/.json
    <fleet>/<V>/primary.pt, monitor.pt   trainer-side checkpoints the next repair fine-tunes (never pushed)
    <fleet>/<V>/report.json          the predeploy or repair report the version came from, when there is one

A version folder is assembled in ``<fleet>/.staging-*`` and renamed into place; ``fleet.json`` is replaced
atomically (write, fsync, rename). Writers hold an exclusive ``flock`` on ``.lock`` so two publishes never
interleave; readers take no lock and always see a whole version and a consistent ``fleet.json``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.formats.bundle import (
    MANIFEST_JSON,
    MANIFEST_PB,
    BundleError,
    VerifiedBundle,
    fsync_dir,
    manifest_json,
    read_manifest,
    verify_bundle,
)
from edge_agent.formats.names import check_name
from edge_agent.formats.signing import sign_manifest, sign_rollback_order
from protos.nnoc.v1 import bundle_pb2, model_service_pb2

ROLLBACK_ORDER_TTL = 7 * 86400.0  # seconds a rollback order holds: an agent offline longer stays where it is
TEMP_JSON = re.compile(r"\..+\.json\.[0-9a-f]{32}")  # what _write_json writes before its rename

CHECKPOINTS = ("primary.pt", "monitor.pt")


class StoreError(ValueError):
    """A store operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class FleetState:
    """A fleet's current version, its stored versions and its history (oldest first)."""

    name: str
    current: int | None
    versions: list[int]
    history: list[dict[str, Any]]
    rollout: str | None = None  # the rollout that governs the fleet now (active, or aborted and not superseded)
    rollout_policy: dict[str, Any] | None = None  # the fleet's default rollout policy (RolloutPolicy.to_dict)
    card: dict[str, Any] | None = None  # the fleet's model card (trainer.card.ModelCard.to_dict): its repairs' data


class ModelStore:
    """Fleets and versions under ``root``. Safe for one writer process at a time per store and any readers."""

    def __init__(self, root: Path, signing_key: Ed25519PrivateKey | None = None, create: bool = True) -> None:
        """``create=False``: a store that must exist already (read-only commands never make one by mistake)."""
        self.root = root
        self.signing_key = signing_key  # when set, every version taken in is signed (edge_agent.formats.signing)
        if not create and not root.is_dir():
            raise StoreError(f"no model store at {root}: pass --store with the folder 'nnoc-trainer serve' uses")
        root.mkdir(parents=True, exist_ok=True)

    # -- reading -------------------------------------------------------------------------------------------

    def fleets(self) -> list[str]:
        """Names of the fleets in the store."""
        return sorted(d.name for d in self.root.iterdir() if (d / "fleet.json").is_file())

    def _fleet_dir(self, fleet: str) -> Path:
        try:
            check_name(fleet, "fleet name")
        except ValueError as e:
            raise StoreError(str(e)) from None
        return self.root / fleet

    def state(self, fleet: str) -> FleetState:
        """The fleet's state; :class:`StoreError` when there is no such fleet."""
        d = self._fleet_dir(fleet)
        try:
            data = json.loads((d / "fleet.json").read_text())
        except FileNotFoundError:
            raise StoreError(f"no fleet {fleet!r} in {self.root}; create it with 'nnoc-trainer fleet create'") from None
        versions = sorted(int(v.name) for v in d.iterdir() if v.name.isdigit() and (v / "bundle").is_dir())
        return FleetState(
            fleet,
            data.get("current"),
            versions,
            list(data.get("history", [])),
            data.get("rollout"),
            data.get("rollout_policy"),
            data.get("card"),
        )

    def version_dir(self, fleet: str, version: int) -> Path:
        """Folder of a stored version (``bundle/`` and checkpoints inside)."""
        path = self._fleet_dir(fleet) / str(int(version))
        if not (path / "bundle").is_dir():
            raise StoreError(f"fleet {fleet!r} has no version {version}")
        return path

    def bundle(self, fleet: str, version: int | None = None) -> VerifiedBundle:
        """A stored bundle (default: the current one), verified against its manifest."""
        if version is None:
            version = self.state(fleet).current
            if version is None:
                raise StoreError(f"fleet {fleet!r} has no current version")
        try:
            return verify_bundle(self.version_dir(fleet, version) / "bundle")
        except BundleError as e:
            raise StoreError(f"stored bundle {fleet} v{version} fails verification: {e}") from e

    def manifest(self, fleet: str, version: int) -> bundle_pb2.Manifest:
        """A stored version's manifest, read without hashing its models (a stored version never changes)."""
        try:
            return read_manifest(self.version_dir(fleet, version) / "bundle")
        except (OSError, ValueError) as e:
            raise StoreError(f"{fleet} v{version}: cannot read its manifest: {e}") from e

    def artifact(self, fleet: str, version: int, name: str) -> Path:
        """Path of one artifact file of a stored bundle, by its manifest name."""
        bundle_dir = self.version_dir(fleet, version) / "bundle"
        manifest = read_manifest(bundle_dir)
        if name not in {a.name for a in manifest.artifacts}:
            raise StoreError(f"{fleet} v{version} has no artifact {name!r}")
        return bundle_dir / name

    # -- writing -------------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / ".lock").open("a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                self._sweep()
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _sweep(self) -> None:
        """Remove what a writer killed mid-write left (a ``.staging-*`` version folder, a ``.NAME.json.<hex>`` temp
        file). Called holding the lock: every writer holds it, so whatever of this kind exists now is left over."""
        for fleet_dir in (d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for folder in (fleet_dir, fleet_dir / "rollouts"):
                if not folder.is_dir():
                    continue
                for leftover in folder.iterdir():
                    if leftover.name.startswith(".staging-") and leftover.is_dir():
                        shutil.rmtree(leftover, ignore_errors=True)
                    elif TEMP_JSON.fullmatch(leftover.name) and leftover.is_file():
                        leftover.unlink(missing_ok=True)

    def _write_json(self, path: Path, data: Any) -> None:
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
        with tmp.open("w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)

    def _write_state(self, fleet: str, current: int | None, history: list[dict[str, Any]], **changes: Any) -> None:
        """Replace fleet.json; ``changes`` set its other keys (rollout, rollout_policy), the rest are kept."""
        path = self._fleet_dir(fleet) / "fleet.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.update(current=current, history=history, **changes)
        self._write_json(path, {k: v for k, v in data.items() if v is not None or k == "current"})

    def create(self, fleet: str) -> FleetState:
        """Create an empty fleet; an existing fleet is an error."""
        with self._locked():
            d = self._fleet_dir(fleet)
            if (d / "fleet.json").is_file():
                raise StoreError(f"fleet {fleet!r} already exists")
            d.mkdir(parents=True, exist_ok=True)
            self._write_state(fleet, None, [{"action": "create", "version": None, "at": time.time()}])
        return self.state(fleet)

    def remove_empty(self, fleet: str) -> None:
        """Remove a fleet that holds no version yet (a create whose first bundle was refused)."""
        with self._locked():
            if self.state(fleet).versions:
                raise StoreError(f"fleet {fleet!r} holds versions; it is not removed")
            shutil.rmtree(self._fleet_dir(fleet))

    def next_version(self, fleet: str) -> int:
        """The version number a new bundle of this fleet gets: one above every stored version."""
        return max(self.state(fleet).versions, default=0) + 1

    def add(self, fleet: str, run_dir: Path, by: str = "operator") -> int:
        """Copy a predeploy/repair output folder (``bundle/`` + checkpoints) in as a new version; returns it.

        The bundle's manifest must name this fleet and a version above every stored one.
        """
        bundle_dir = run_dir / "bundle" if (run_dir / "bundle").is_dir() else run_dir
        try:
            bundle = verify_bundle(bundle_dir)
        except BundleError as e:
            raise StoreError(str(e)) from e
        manifest = bundle.manifest
        if manifest.fleet != fleet:
            raise StoreError(
                f"{bundle_dir} was made for fleet {manifest.fleet!r}, not {fleet!r} (predeploy takes --fleet NAME)"
            )
        with self._locked():
            state = self.state(fleet)
            if state.versions and bundle.version <= max(state.versions):
                raise StoreError(
                    f"{bundle_dir} is v{bundle.version}; fleet {fleet!r} already holds v{max(state.versions)} "
                    f"(a new bundle must be newer; repair takes --version {max(state.versions) + 1})"
                )
            d = self._fleet_dir(fleet)
            staging = d / f".staging-{uuid.uuid4().hex}"
            try:
                (staging / "bundle").mkdir(parents=True)
                # The manifest's files only, each verified a regular file above: nothing else of the folder (a link
                # to a file outside it) comes into the store, and nothing of it is ever signed.
                for name in (MANIFEST_PB, MANIFEST_JSON, *(a.name for a in manifest.artifacts)):
                    if (bundle_dir / name).is_file() and not (bundle_dir / name).is_symlink():
                        shutil.copyfile(bundle_dir / name, staging / "bundle" / name)
                if self.signing_key is not None:
                    signed = bundle_pb2.Manifest()
                    signed.CopyFrom(manifest)
                    sign_manifest(signed, self.signing_key)
                    (staging / "bundle" / "manifest.pb").write_bytes(signed.SerializeToString(deterministic=True))
                    (staging / "bundle" / "manifest.json").write_text(manifest_json(signed))
                source = bundle_dir.parent if bundle_dir != run_dir else run_dir
                for name in (*CHECKPOINTS, "report.json"):
                    if (source / name).is_file() and not (source / name).is_symlink():
                        shutil.copyfile(source / name, staging / name)
                for f in staging.rglob("*"):
                    if f.is_file():
                        with f.open("rb") as fh:
                            os.fsync(fh.fileno())
                staging.rename(d / str(bundle.version))
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            fsync_dir(d)
            history = [*state.history, {"action": "add", "version": bundle.version, "at": time.time(), "by": by}]
            self._write_state(fleet, state.current, history)
        return bundle.version

    def _set_current(self, fleet: str, version: int, action: str, by: str, note: str = "") -> FleetState:
        with self._locked():
            state = self.state(fleet)
            if version not in state.versions:
                raise StoreError(f"fleet {fleet!r} has no version {version} (stored: {state.versions})")
            self._refuse_during_rollout(state, action)
            if action == "publish" and state.current is not None and version < state.current:
                action = "rollback"  # going back is a rollback, whatever it is called: agents are told so (signed)
            entry = {"action": action, "version": version, "from": state.current, "at": time.time(), "by": by}
            if note:
                entry["note"] = note
            order = None
            if action == "rollback" and state.current is not None:
                order = self.rollback_order_for(fleet, version, state.current)
            # a publish or rollback supersedes an aborted rollout: every device follows the new current version
            self._write_state(fleet, version, [*state.history, entry], rollout=None, rollback_order=order)
        return self.state(fleet)

    def rollback_order_for(self, fleet: str, version: int, from_version: int) -> str | None:
        """A signed order to go back from ``from_version`` to ``version`` (base64 of its DSSE signature), valid for
        :data:`ROLLBACK_ORDER_TTL`; None when the store has no signing key (agents without trusted keys take the
        notice's flag alone)."""
        if self.signing_key is None:
            return None
        now = time.time()
        order = model_service_pb2.RollbackOrder(
            fleet=fleet, version=version, from_version=from_version, issued_at=now, expires_at=now + ROLLBACK_ORDER_TTL
        )
        return base64.b64encode(sign_rollback_order(order, self.signing_key).SerializeToString()).decode()

    def rollback_order(self, fleet: str) -> bytes:
        """The signed order of the fleet's last rollback (serialised Signature; empty when there is none)."""
        data = json.loads((self._fleet_dir(fleet) / "fleet.json").read_text())
        return base64.b64decode(data["rollback_order"]) if data.get("rollback_order") else b""

    def _refuse_during_rollout(self, state: FleetState, action: str) -> None:
        record = self._rollout_record(state.name, state.rollout) if state.rollout else None
        if record is not None and record["state"] in ("running", "paused"):
            raise StoreError(
                f"fleet {state.name!r} has rollout {record['id']} of v{record['target']} {record['state']}: "
                f"'nnoc-trainer fleet rollout abort {state.name}' first, then {action}"
            )

    # -- rollouts ------------------------------------------------------------------------------------------

    def _rollout_path(self, fleet: str, rollout_id: str) -> Path:
        try:
            check_name(rollout_id, "rollout id")
        except ValueError as e:
            raise StoreError(str(e)) from None
        return self._fleet_dir(fleet) / "rollouts" / f"{rollout_id}.json"

    def _rollout_record(self, fleet: str, rollout_id: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self._rollout_path(fleet, rollout_id).read_text()))
        except FileNotFoundError:
            return None

    def rollout(self, fleet: str, rollout_id: str | None = None) -> dict[str, Any] | None:
        """A rollout record (default: the one the fleet points at), or None."""
        if rollout_id is None:
            rollout_id = self.state(fleet).rollout
            if rollout_id is None:
                return None
        return self._rollout_record(fleet, rollout_id)

    def rollouts(self, fleet: str) -> list[dict[str, Any]]:
        """Every rollout of the fleet, oldest first."""
        folder = self._fleet_dir(fleet) / "rollouts"
        records = [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.is_dir() else []
        return sorted(records, key=lambda r: float(r["created"]))

    def start_rollout(self, fleet: str, version: int, make: Callable[[str, int], dict[str, Any]], by: str) -> dict:
        """Start a staged rollout of a stored ``version``; ``make(id, baseline)`` builds the record."""
        with self._locked():
            state = self.state(fleet)
            if version not in state.versions:
                raise StoreError(f"fleet {fleet!r} has no version {version} (stored: {state.versions})")
            if state.current is None:
                raise StoreError(f"fleet {fleet!r} has no current version to roll out from; publish v{version} at once")
            if version == state.current:
                raise StoreError(f"v{version} is already fleet {fleet!r}'s current version")
            self._refuse_during_rollout(state, "start another rollout")
            rollout_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
            record = make(rollout_id, state.current)
            path = self._rollout_path(fleet, rollout_id)
            path.parent.mkdir(exist_ok=True)
            self._write_json(path, record)
            entry = {"action": "rollout", "version": version, "from": state.current, "at": time.time(), "by": by}
            entry["rollout"] = rollout_id
            self._write_state(fleet, state.current, [*state.history, entry], rollout=rollout_id)
        return record

    def update_rollout(self, fleet: str, rollout_id: str, change: Callable[[dict[str, Any]], None]) -> dict:
        """Read, ``change`` in place and write back a rollout record, under the store's lock. A record that became
        completed makes its target current; one that became aborted stays the fleet's rollout (its devices go
        back) until the next publish or rollback."""
        with self._locked():
            record = self._rollout_record(fleet, rollout_id)
            if record is None:
                raise StoreError(f"fleet {fleet!r} has no rollout {rollout_id}")
            before = record["state"]
            change(record)
            record["updated"] = time.time()
            if record["state"] == "aborted" and before != "aborted":  # the devices on the target go back, signed
                record["rollback_order"] = self.rollback_order_for(
                    fleet, int(record["baseline"]), int(record["target"])
                )
            self._write_json(self._rollout_path(fleet, rollout_id), record)
            if record["state"] != before and record["state"] in ("completed", "aborted"):
                state = self.state(fleet)
                entry: dict[str, Any] = {
                    "action": "publish" if record["state"] == "completed" else "abort",
                    "version": record["target"],
                    "from": state.current,
                    "at": time.time(),
                    "by": f"rollout {rollout_id}",
                    "note": record.get("reason", "")[:500],
                }
                if record["state"] == "completed":
                    self._write_state(fleet, int(record["target"]), [*state.history, entry], rollout=None)
                else:
                    self._write_state(fleet, state.current, [*state.history, entry])
        return record

    def set_rollout_policy(self, fleet: str, policy: dict[str, Any] | None, by: str = "operator") -> FleetState:
        """The fleet's default rollout policy (repair jobs publish through it); None: publish at once."""
        with self._locked():
            state = self.state(fleet)
            entry = {"action": "policy", "version": None, "at": time.time(), "by": by}
            self._write_state(fleet, state.current, [*state.history, entry], rollout_policy=policy)
        return self.state(fleet)

    def set_card(self, fleet: str, card: dict[str, Any], by: str = "operator") -> FleetState:
        """Keep the fleet's model card (its repair jobs read that fleet's photos and policies from it)."""
        with self._locked():
            state = self.state(fleet)
            entry = {"action": "card", "version": None, "at": time.time(), "by": by}
            self._write_state(fleet, state.current, [*state.history, entry], card=card)
        return self.state(fleet)

    def publish(self, fleet: str, version: int, by: str = "operator", note: str = "") -> FleetState:
        """Make a stored version current: every subscribed agent of the fleet is told. A version older than the
        current one is recorded, signed and announced as a rollback (agents take an older version only as one)."""
        return self._set_current(fleet, version, "publish", by, note)

    def rollback(self, fleet: str, version: int | None = None, by: str = "operator") -> FleetState:
        """Make an older version current on purpose (default: the version current before this one)."""
        state = self.state(fleet)
        self._refuse_during_rollout(state, "roll back")
        if version is None:
            earlier = [h["version"] for h in state.history if h["action"] in ("publish", "rollback")]
            earlier = [v for v in earlier if v != state.current and v in state.versions]
            if not earlier:
                raise StoreError(f"fleet {fleet!r} has no earlier version to roll back to")
            version = earlier[-1]
        if state.current is not None and version >= state.current:
            raise StoreError(f"rollback goes to an older version; v{version} is not older than v{state.current}")
        return self._set_current(fleet, version, "rollback", by)

    def last_action(self, fleet: str) -> str:
        """The action that made the current version current ("publish" or "rollback")."""
        for entry in reversed(self.state(fleet).history):
            if entry["action"] in ("publish", "rollback"):
                return str(entry["action"])
        return ""
