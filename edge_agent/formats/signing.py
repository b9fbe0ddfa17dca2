"""Ed25519 signatures on bundle manifests (the ``cryptography`` package).

The signature covers the manifest's deterministic protobuf serialisation with the ``signature`` field
cleared; the manifest holds the sha256 and size of every artifact, so a valid signature vouches for every
file. The trainer's model store signs each version it takes in; an agent configured with trusted public
keys refuses a bundle that is unsigned, signed by an unknown key, or whose signature does not verify.

Key files are PEM: PKCS#8 private keys (written 0600) and SubjectPublicKeyInfo public keys. A key's id is
the first 16 hex digits of the sha256 of its raw public bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.formats.errors import BundleError
from protos.nnoc.v1 import bundle_pb2

ALGORITHM = "ed25519"
TrustedKeys = Mapping[str, Ed25519PublicKey]


def key_id(public: Ed25519PublicKey) -> str:
    """Short stable id of a public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signed_bytes(manifest: bundle_pb2.Manifest) -> bytes:
    """What the signature covers: the manifest without its signature, serialised deterministically."""
    body = bundle_pb2.Manifest()
    body.CopyFrom(manifest)
    body.ClearField("signature")
    return body.SerializeToString(deterministic=True)


def sign_manifest(manifest: bundle_pb2.Manifest, private: Ed25519PrivateKey) -> None:
    """Sign ``manifest`` in place."""
    public = private.public_key()
    value = private.sign(signed_bytes(manifest))
    manifest.signature.CopyFrom(bundle_pb2.Signature(algorithm=ALGORITHM, key_id=key_id(public), value=value))


def check_signature(manifest: bundle_pb2.Manifest, trusted: TrustedKeys) -> str:
    """Raise :class:`BundleError` unless a trusted key signed ``manifest``; returns the key id."""
    sig = manifest.signature
    if not manifest.HasField("signature") or not sig.value:
        raise BundleError("the manifest is not signed and this agent only loads signed bundles")
    if sig.algorithm != ALGORITHM:
        raise BundleError(f"signature algorithm {sig.algorithm!r} is not {ALGORITHM!r}")
    public = trusted.get(sig.key_id)
    if public is None:
        raise BundleError(f"signed by key {sig.key_id!r}, which is not among the trusted keys {sorted(trusted)}")
    try:
        public.verify(sig.value, signed_bytes(manifest))
    except InvalidSignature:
        raise BundleError(f"the manifest's signature does not verify with key {sig.key_id}") from None
    return sig.key_id


def generate_keys(directory: Path, name: str = "signing") -> tuple[Path, Path]:
    """Write ``NAME.key`` (private, 0600) and ``NAME.pub`` into ``directory``; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    if key_path.exists():
        raise FileExistsError(f"{key_path} exists; remove it or choose another --name")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    pub_path.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file; a clear error for anything else."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot read signing key {path}: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_trusted_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Public keys (PEM files) by key id."""
    out: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read trusted key {path}: {e}") from e
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path} is not an Ed25519 public key")
        out[key_id(key)] = key
    return out
