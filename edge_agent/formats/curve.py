"""CURVE (CurveZMQ) for the quarantine uplink: key files and the collector's allow-list.

Keys are ZeroMQ certificate files as ``zmq.auth.create_certificates`` writes them: ``NAME.key`` (public) and
``NAME.key_secret`` (public + secret). The collector holds its secret file and a folder of the agents'
public files (the allow-list); an agent holds its own secret file and the collector's public file. A
connection from a key not on the list is refused during the handshake (ZAP) and logged by the collector.

Each key on the list is bound to one device id, its file's name (``cam-1.key`` belongs to ``cam-1``): the ZAP
handler gives every message from that key the ZeroMQ ``User-Id`` property ``cam-1``, and the collector refuses a
message or stats that claim another device id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from edge_agent.formats.names import check_name

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
    """ZAP credentials provider: accept the public keys found in a folder of ``DEVICE.key`` files."""

    def __init__(self, folder: Path, on_denied: Callable[[str], None] | None = None) -> None:
        if not folder.is_dir():
            raise CurveError(f"CURVE allow-list {folder} is not a folder of .key files")
        self.devices: dict[bytes, str] = {}  # z85 public key -> the one device id it may speak for
        for path in sorted(folder.glob("*.key")):
            try:
                device = check_name(path.stem, "CURVE key file name (the device id it belongs to)")
            except ValueError as e:
                raise CurveError(f"{path}: {e}") from None
            key = load_public(path)
            if key in self.devices:
                raise CurveError(
                    f"{path} holds the same key as {self.devices[key]}.key: one key, one device; make a key per device"
                )
            self.devices[key] = device
        self.on_denied = on_denied
        log.info("CURVE allow-list: %d agent keys from %s", len(self.devices), folder)

    @property
    def keys(self) -> set[bytes]:
        """The allowed z85 public keys."""
        return set(self.devices)

    def device_of(self, key: bytes) -> str:
        """The device id bound to a z85 public key on the list."""
        return self.devices[key]

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator for each handshake."""
        if key in self.devices:
            return True
        log.warning("refused a CURVE connection: key %s is not on the allow-list", key.decode(errors="replace"))
        if self.on_denied is not None:
            self.on_denied(key.decode(errors="replace"))
        return False


class _DeviceAuthenticator(ThreadAuthenticator):
    """ZAP in a thread whose User-Id for an accepted key is the device id bound to it."""

    def __init__(self, context: zmq.Context, allow: AllowList) -> None:
        super().__init__(context, log=logging.getLogger(f"{__name__}.zap"))
        self.allow_list = allow

    def curve_user_id(self, client_public_key: bytes) -> str:
        """The device id of an accepted key (called by pyzmq with the raw 32-byte key)."""
        return self.allow_list.device_of(z85.encode(client_public_key))


def start_server_auth(
    context: zmq.Context, sock: zmq.Socket, secret_file: Path, allow: AllowList
) -> ThreadAuthenticator:
    """Make ``sock`` a CURVE server checked against ``allow``; returns the running authenticator.

    Messages from an accepted key carry the ZeroMQ property ``User-Id`` = the device id bound to the key.
    """
    public, secret = load_secret(secret_file)
    auth = _DeviceAuthenticator(context, allow)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=allow)
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    return auth
