"""Deployment bundles, the format both sides share: ``primary.onnx`` + ``monitor.onnx`` + a protobuf manifest.

The trainer writes bundles (:func:`write_bundle`, atomically: a temp folder renamed into place); the model store
signs them; agents and the store verify them (:func:`verify_bundle`: names, sizes, sha256, the JSON rendering,
and with trusted keys the Ed25519 signature). ``manifest.pb`` is authoritative; ``manifest.json`` is a rendering
for people that must say the same. No torch and no trainer imports here.
"""

from __future__ import annotations

import getpass
import hashlib
import math
import os
import shutil
import socket
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format

from edge_agent.formats.errors import BundleError
from edge_agent.formats.preprocess import GOLDEN_NAME, check_golden, golden_pair
from edge_agent.formats.signing import check_signature
from edge_agent.formats.spec import image_shape_of, preprocess_of
from edge_agent.formats.untrusted import regular_file
from protos.nnoc.v1 import bundle_pb2

MANIFEST_FORMAT = 1
MANIFEST_PB = "manifest.pb"
MANIFEST_JSON = "manifest.json"  # a rendering for people; must say what manifest.pb says
ROLES = ("primary", "monitor")
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few kB; a larger one is refused before it is read
MAX_GOLDEN_ARRAY_BYTES = 64 << 20  # each array of the golden pair (a picture and its model input)

__all__ = [
    "MANIFEST_FORMAT", "MANIFEST_JSON", "MANIFEST_PB", "ROLES", "BundleError", "VerifiedBundle", "fsync_dir",
    "manifest_json", "metrics_message", "read_manifest", "sha256_file", "verify_bundle", "write_bundle",
]  # fmt: skip


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Lowercase hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle: Path) -> bundle_pb2.Manifest:
    """Read and parse ``bundle/manifest.pb``; a missing, malformed or too new manifest is a BundleError."""
    path = bundle / MANIFEST_PB
    if not path.is_file():
        raise BundleError(f"{bundle} is not a bundle: {MANIFEST_PB} is missing")
    try:
        regular_file(path, MAX_MANIFEST_BYTES)
    except BundleError as e:
        raise BundleError(f"{bundle}: {e}") from None
    msg = bundle_pb2.Manifest()
    try:
        msg.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf raises DecodeError and friends
        raise BundleError(f"{path}: malformed manifest ({e})") from e
    if msg.format > MANIFEST_FORMAT:
        raise BundleError(f"{path}: manifest format {msg.format} is newer than this tool knows ({MANIFEST_FORMAT})")
    return msg


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle folder whose files matched their manifest when it was verified."""

    path: Path
    manifest: bundle_pb2.Manifest

    def model_path(self, role: str) -> Path:
        """The ONNX file playing ``role`` ("primary" or "monitor")."""
        for art in self.manifest.artifacts:
            if art.role == role:
                return self.path / art.name
        raise BundleError(f"{self.path}: no {role} model in the manifest")

    @property
    def version(self) -> int:
        """The bundle's version number."""
        return int(self.manifest.version)


def check_json_rendering(path: Path, manifest: bundle_pb2.Manifest) -> None:
    """``manifest.json``, where a bundle has one, must say exactly what ``manifest.pb`` (authoritative) says."""

    rendering = path / MANIFEST_JSON
    if not rendering.is_file() and not rendering.is_symlink():
        return
    try:
        regular_file(rendering, MAX_MANIFEST_BYTES * 4)
    except BundleError as e:
        raise BundleError(f"{path}: {e}") from None
    shown = bundle_pb2.Manifest()
    try:
        json_format.Parse(rendering.read_text(), shown)
    except (json_format.ParseError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{path}: {MANIFEST_JSON} is not a manifest ({str(e)[:200]}); rebuild the bundle") from None
    if shown != manifest:
        raise BundleError(
            f"{path}: {MANIFEST_JSON} disagrees with {MANIFEST_PB} (the authoritative manifest): the bundle was "
            "edited after it was made; rebuild or re-publish it"
        )


def verify_bundle(path: Path, trusted: Mapping[str, Any] | None = None) -> VerifiedBundle:
    """Parse ``path/manifest.pb`` and check each artifact's name, size and sha256.

    ``trusted`` (key id -> Ed25519 public key, see :mod:`edge_agent.formats.signing`): also require a valid signature
    by one of them. Raises :class:`BundleError` naming the first problem found.
    """
    manifest = read_manifest(path)
    roles = [a.role for a in manifest.artifacts]
    for role in ROLES:
        if roles.count(role) != 1:
            raise BundleError(f"{path}: manifest must list exactly one {role} model, found {roles.count(role)}")
    if len(manifest.input_spec.shape) == 0:
        raise BundleError(f"{path}: manifest has no input spec")
    try:
        preprocess_of(manifest.input_spec)
        image_shape_of(manifest.input_spec)
    except ValueError as e:  # PreprocessError: a block the edge could not apply
        raise BundleError(f"{path}: the manifest's preprocessing: {e}") from None
    for art in manifest.artifacts:
        if Path(art.name).name != art.name or art.name in ("", ".", ".."):
            raise BundleError(f"{path}: artifact name {art.name!r} is not a plain file name")
        f = path / art.name
        if not f.is_file() and not f.is_symlink():
            raise BundleError(f"{path}: artifact {art.name} is missing")
        try:
            size = regular_file(f, art.size)  # lstat: no symlink is followed, nothing larger is read
        except BundleError as e:
            raise BundleError(f"{path}: {e}") from None
        if size != art.size:
            raise BundleError(f"{path}: {art.name} has {size} bytes, the manifest says {art.size}")
        if sha256_file(f) != art.sha256:
            raise BundleError(f"{path}: {art.name} does not match the sha256 in its manifest")
    check_json_rendering(path, manifest)
    check_golden_artifact(path, manifest)
    if trusted is not None:
        try:
            check_signature(manifest, trusted)
        except BundleError as e:
            raise BundleError(f"{path}: {e}") from None
    return VerifiedBundle(path, manifest)


def check_golden_artifact(path: Path, manifest: bundle_pb2.Manifest) -> None:
    """Where the bundle carries a golden pair (all made since the preprocessing block), preprocess its picture here
    and compare with what the trainer computed: a BundleError when the two sides disagree."""
    golden = [a for a in manifest.artifacts if a.role == "golden"]
    if not golden:
        return
    try:
        check_npz_sizes(path / golden[0].name, MAX_GOLDEN_ARRAY_BYTES)
        with np.load(path / golden[0].name, allow_pickle=False) as data:
            picture, expected = data["picture"], data["expected"]
    except (OSError, KeyError, ValueError, MemoryError, zipfile.BadZipFile) as e:
        raise BundleError(f"{path}: {golden[0].name} is not a golden pair ({e})") from None
    try:
        check_golden(preprocess_of(manifest.input_spec), image_shape_of(manifest.input_spec), picture, expected)
    except ValueError as e:
        raise BundleError(f"{path}: {e}") from None


def check_npz_sizes(path: Path, max_bytes: int) -> None:
    """Each array of the ``.npz`` at ``path`` declares at most ``max_bytes`` in its header (read before any array
    is allocated: a header may declare a terabyte); a ValueError otherwise."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                elif version in ((2, 0), (3, 0)):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                else:
                    raise ValueError(f"{info.filename}: npy format {version} is not known")
                nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
                if nbytes > max_bytes:
                    raise ValueError(f"{info.filename} declares {nbytes} bytes, more than {max_bytes}")


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
        picture, expected = golden_pair(preprocess_of(out.input_spec), image_shape_of(out.input_spec))
        with (tmp / GOLDEN_NAME).open("wb") as golden:
            np.savez(golden, picture=picture, expected=expected)
        out.artifacts.add(
            name=GOLDEN_NAME,
            role="golden",
            sha256=sha256_file(tmp / GOLDEN_NAME),
            size=(tmp / GOLDEN_NAME).stat().st_size,
        )
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
