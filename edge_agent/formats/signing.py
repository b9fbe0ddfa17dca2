"""Ed25519 signatures on bundle manifests and rollback orders (the ``cryptography`` package).

A signature is a DSSE envelope (the in-toto/Sigstore signing envelope): it signs the pre-authentication encoding
``PAE(payload_type, body)`` of the exact bytes it carries (``Signature.signed_body``), so that verifying never
depends on re-serialising a protobuf message (which protobuf does not promise to keep stable across versions or
unknown fields). For a manifest the body is the manifest without its signature; the manifest an agent acts on must
equal it. The manifest holds the sha256 and size of every artifact, so a valid signature vouches for every file.
Bundles signed before envelopes (``Signature.envelope`` empty: the signature covers the deterministic
re-serialisation) still verify. The trainer's model store signs each version it takes in; an agent configured with
trusted public keys refuses a bundle that is unsigned, signed by an unknown key, or whose signature does not verify.

A rollback order (``RollbackOrder``: fleet, the version to go back to, the version it applies from, when it was
issued and until when it holds) is signed the same way; an agent with trusted keys goes back to an older version
only on such an order (:func:`check_rollback_order`).

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
from protos.nnoc.v1 import bundle_pb2, model_service_pb2

ALGORITHM = "ed25519"
ENVELOPE = "dsse-v1"
MANIFEST_TYPE = "application/vnd.nnoc.manifest+protobuf"
ROLLBACK_TYPE = "application/vnd.nnoc.rollback-order+protobuf"
TrustedKeys = Mapping[str, Ed25519PublicKey]


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding: ``DSSEv1 LEN(type) type LEN(body) body``, lengths in ASCII decimal."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


def sign_envelope(payload_type: str, body: bytes, private: Ed25519PrivateKey) -> bundle_pb2.Signature:
    """A DSSE signature over ``body`` (carried in the signature, exactly as signed)."""
    return bundle_pb2.Signature(
        algorithm=ALGORITHM,
        key_id=key_id(private.public_key()),
        value=private.sign(pae(payload_type, body)),
        envelope=ENVELOPE,
        payload_type=payload_type,
        signed_body=body,
    )


def check_envelope(sig: bundle_pb2.Signature, payload_type: str, trusted: TrustedKeys) -> bytes:
    """The body a trusted key signed in ``sig`` for ``payload_type``; :class:`BundleError` otherwise."""
    if sig.algorithm != ALGORITHM:
        raise BundleError(f"signature algorithm {sig.algorithm!r} is not {ALGORITHM!r}")
    if sig.envelope != ENVELOPE or sig.payload_type != payload_type:
        raise BundleError(
            f"expected a {ENVELOPE} signature of a {payload_type}, got {sig.envelope!r} {sig.payload_type!r}"
        )
    public = trusted.get(sig.key_id)
    if public is None:
        raise BundleError(f"signed by key {sig.key_id!r}, which is not among the trusted keys {sorted(trusted)}")
    try:
        public.verify(sig.value, pae(payload_type, sig.signed_body))
    except InvalidSignature:
        raise BundleError(f"the signature does not verify with key {sig.key_id}") from None
    return bytes(sig.signed_body)


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
    """Sign ``manifest`` in place (a DSSE envelope over the manifest without its signature)."""
    manifest.signature.CopyFrom(sign_envelope(MANIFEST_TYPE, signed_bytes(manifest), private))


def check_signature(manifest: bundle_pb2.Manifest, trusted: TrustedKeys) -> str:
    """Raise :class:`BundleError` unless a trusted key signed ``manifest``; returns the key id."""
    sig = manifest.signature
    if not manifest.HasField("signature") or not sig.value:
        raise BundleError("the manifest is not signed and this agent only loads signed bundles")
    if sig.envelope:
        body = check_envelope(sig, MANIFEST_TYPE, trusted)
        signed, unsigned = bundle_pb2.Manifest(), bundle_pb2.Manifest()
        try:
            signed.ParseFromString(body)
        except Exception:  # protobuf's DecodeError
            raise BundleError("the signed manifest does not parse") from None
        unsigned.CopyFrom(manifest)
        unsigned.ClearField("signature")
        if signed != unsigned:
            raise BundleError("the manifest differs from the one its signature covers")
        return sig.key_id
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


def sign_rollback_order(order: model_service_pb2.RollbackOrder, private: Ed25519PrivateKey) -> bundle_pb2.Signature:
    """A signature of ``order`` (its serialised bytes are in the signature's body, exactly as signed)."""
    return sign_envelope(ROLLBACK_TYPE, order.SerializeToString(deterministic=True), private)


def check_rollback_order(sig: bundle_pb2.Signature, trusted: TrustedKeys) -> model_service_pb2.RollbackOrder:
    """The rollback order a trusted key signed; :class:`BundleError` when there is none or it does not verify."""
    if not sig.value:
        raise BundleError("an older version needs a signed rollback order, and this notice carries none")
    order = model_service_pb2.RollbackOrder()
    try:
        order.ParseFromString(check_envelope(sig, ROLLBACK_TYPE, trusted))
    except BundleError as e:
        raise BundleError(f"rollback order: {e}") from None
    except Exception:  # protobuf's DecodeError
        raise BundleError("the signed rollback order does not parse") from None
    return order
