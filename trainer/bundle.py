"""Deployment bundles: ``primary.onnx`` + ``monitor.onnx`` + a protobuf manifest, written atomically."""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path

from google.protobuf import json_format

from protos.nnoc.v1 import bundle_pb2
from trainer.models import InputSpec

MANIFEST_FORMAT = 1
MANIFEST_PB = "manifest.pb"
MANIFEST_JSON = "manifest.json"
ROLES = ("primary", "monitor")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Lowercase hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def input_spec_message(spec: InputSpec) -> bundle_pb2.InputSpec:
    """The manifest's form of an input spec."""
    return bundle_pb2.InputSpec(
        shape=list(spec.shape),
        dtype=spec.dtype,
        layout=spec.layout,
        scale=spec.scale,
        min_value=spec.min_value,
        max_value=spec.max_value,
        input_name=spec.input_name,
        output_name=spec.output_name,
    )


def metrics_message(values: Mapping[str, float | None]) -> bundle_pb2.Metrics:
    """Metrics from a plain dict; known keys go to their fields, other numbers to ``extra``."""
    msg = bundle_pb2.Metrics()
    for key, value in values.items():
        if value is None:
            continue
        if key in ("eval_clean_accuracy", "test_clean_accuracy", "attack_success_rate"):
            setattr(msg, key, float(value))
        else:
            msg.extra[key] = float(value)
    return msg


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bundle(
    dest: Path,
    models: Mapping[str, Path],
    manifest: bundle_pb2.Manifest,
    metrics: Mapping[str, Mapping[str, float | None]] | None = None,
) -> bundle_pb2.Manifest:
    """Write a bundle folder at ``dest`` holding ``models`` (role -> ONNX file) and the completed manifest.

    The folder is assembled in a temporary sibling and renamed into place, so a reader never sees half a
    bundle. An existing ``dest`` is replaced. Returns the manifest as written (hashes and sizes filled in).
    """
    missing = [r for r in ROLES if r not in models]
    if missing:
        raise ValueError(f"a bundle needs a {' and a '.join(missing)} model")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        out = bundle_pb2.Manifest()
        out.CopyFrom(manifest)
        out.format = MANIFEST_FORMAT
        del out.artifacts[:]
        if not out.HasField("created_at"):
            out.created_at.GetCurrentTime()
        out.provenance.setdefault("host", socket.gethostname())
        out.provenance.setdefault("user", getpass.getuser())
        for role in ROLES:
            name = f"{role}.onnx"
            shutil.copyfile(models[role], tmp / name)
            art = out.artifacts.add(
                name=name, role=role, sha256=sha256_file(tmp / name), size=(tmp / name).stat().st_size
            )
            if metrics and role in metrics:
                art.metrics.CopyFrom(metrics_message(metrics[role]))
        (tmp / MANIFEST_PB).write_bytes(out.SerializeToString(deterministic=True))
        (tmp / MANIFEST_JSON).write_text(manifest_json(out))
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
        tmp.rename(dest)
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def manifest_json(manifest: bundle_pb2.Manifest) -> str:
    """The manifest rendered as JSON (for people and tools; ``manifest.pb`` is authoritative)."""
    return json_format.MessageToJson(manifest, preserving_proto_field_name=True, indent=2) + "\n"


def read_manifest(bundle: Path) -> bundle_pb2.Manifest:
    """Read and parse ``bundle/manifest.pb``; a missing or malformed manifest is a clear error."""
    path = bundle / MANIFEST_PB
    if not path.is_file():
        raise ValueError(f"{bundle} is not a bundle: {MANIFEST_PB} is missing")
    msg = bundle_pb2.Manifest()
    try:
        msg.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ValueError(f"{path}: malformed manifest: {e}") from e
    if msg.format > MANIFEST_FORMAT:
        raise ValueError(f"{path}: manifest format {msg.format} is newer than this tool knows ({MANIFEST_FORMAT})")
    return msg


def artifact_path(bundle: Path, manifest: bundle_pb2.Manifest, role: str) -> Path:
    """The file of the artifact with ``role``."""
    for art in manifest.artifacts:
        if art.role == role:
            return bundle / art.name
    raise ValueError(f"{bundle}: no {role} artifact in the manifest")
