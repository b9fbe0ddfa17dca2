"""CURVE (CurveZMQ) for the quarantine uplink: key files and the collector's allow-list.

Keys are ZeroMQ certificate files as ``zmq.auth.create_certificates`` writes them: ``NAME.key`` (public) and
``NAME.key_secret`` (public + secret). The collector holds its secret file and a folder of the agents'
public files (the allow-list); an agent holds its own secret file and the collector's public file. A
connection from a key not on the list is refused during the handshake (ZAP) and logged by the collector.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)


class CurveError(ValueError):
    """Unreadable or unsuitable CURVE key files."""


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` into ``directory``; returns (public, secret)."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / f"{name}.key_secret").exists():
        raise FileExistsError(f"{directory / name}.key_secret exists; remove it or choose another name")
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise CurveError(f"cannot read CURVE key {path}: {e}") from e
    if secret is None:
        raise CurveError(f"{path} holds no secret key (pass the .key_secret file)")
    return public, secret


def load_public(path: Path) -> bytes:
    """The z85 public key of a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise CurveError(f"cannot read CURVE public key {path}: {e}") from e
    return public


def configure_client(sock: zmq.Socket, secret_file: Path, server_public_file: Path) -> None:
    """Make ``sock`` a CURVE client with its own key pair, trusting the server's public key."""
    public, secret = load_secret(secret_file)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = load_public(server_public_file)


class AllowList:
    """ZAP credentials provider: accept the public keys found in a folder of ``.key`` files."""

    def __init__(self, folder: Path, on_denied: Callable[[str], None] | None = None) -> None:
        if not folder.is_dir():
            raise CurveError(f"CURVE allow-list {folder} is not a folder of .key files")
        self.keys = {load_public(p) for p in sorted(folder.glob("*.key"))}
        self.on_denied = on_denied
        log.info("CURVE allow-list: %d agent keys from %s", len(self.keys), folder)

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator for each handshake."""
        if key in self.keys:
            return True
        log.warning("refused a CURVE connection: key %s is not on the allow-list", key.decode(errors="replace"))
        if self.on_denied is not None:
            self.on_denied(key.decode(errors="replace"))
        return False


def start_server_auth(
    context: zmq.Context, sock: zmq.Socket, secret_file: Path, allow: AllowList
) -> ThreadAuthenticator:
    """Make ``sock`` a CURVE server checked against ``allow``; returns the running authenticator."""
    public, secret = load_secret(secret_file)
    auth = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=allow)
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    return auth
