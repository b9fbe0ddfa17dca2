"""Reading and verifying deployment bundles on the edge (no torch, no trainer imports)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protos.nnoc.v1 import bundle_pb2

MANIFEST_FORMAT = 1
MANIFEST_PB = "manifest.pb"
MANIFEST_JSON = "manifest.json"  # a rendering for people; must say what manifest.pb says
ROLES = ("primary", "monitor")


class BundleError(ValueError):
    """A bundle that must not be loaded; the message says what is wrong."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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
    from google.protobuf import json_format

    rendering = path / MANIFEST_JSON
    if not rendering.is_file():
        return
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

    ``trusted`` (key id -> Ed25519 public key, see :mod:`edge_agent.signing`): also require a valid signature
    by one of them. Raises :class:`BundleError` naming the first problem found.
    """
    manifest_file = path / MANIFEST_PB
    if not manifest_file.is_file():
        raise BundleError(f"{path} is not a bundle: {MANIFEST_PB} is missing")
    manifest = bundle_pb2.Manifest()
    try:
        manifest.ParseFromString(manifest_file.read_bytes())
    except Exception as e:  # protobuf's DecodeError and friends
        raise BundleError(f"{manifest_file}: malformed manifest ({e})") from e
    if manifest.format > MANIFEST_FORMAT:
        raise BundleError(f"{manifest_file}: manifest format {manifest.format} is newer than this agent knows")
    roles = [a.role for a in manifest.artifacts]
    for role in ROLES:
        if roles.count(role) != 1:
            raise BundleError(f"{path}: manifest must list exactly one {role} model, found {roles.count(role)}")
    if len(manifest.input_spec.shape) == 0:
        raise BundleError(f"{path}: manifest has no input spec")
    for art in manifest.artifacts:
        if Path(art.name).name != art.name or art.name in ("", ".", ".."):
            raise BundleError(f"{path}: artifact name {art.name!r} is not a plain file name")
        f = path / art.name
        if not f.is_file():
            raise BundleError(f"{path}: artifact {art.name} is missing")
        if f.stat().st_size != art.size:
            raise BundleError(f"{path}: {art.name} has {f.stat().st_size} bytes, the manifest says {art.size}")
        if _sha256(f) != art.sha256:
            raise BundleError(f"{path}: {art.name} does not match the sha256 in its manifest")
    check_json_rendering(path, manifest)
    if trusted is not None:
        from edge_agent.signing import check_signature

        try:
            check_signature(manifest, trusted)
        except BundleError as e:
            raise BundleError(f"{path}: {e}") from None
    return VerifiedBundle(path, manifest)
