"""CURVE (ZMQ's public-key encryption and authentication) for the KV-event sockets.

Why: the balancer's prefix index believes whatever arrives on a replica's event endpoint. Without
authentication, any process that can bind that address (the replica's port after it died, or a
spoofed host) or sit between the two can publish BlockStored events and poison routing. With
CURVE the replica's PUB and ROUTER sockets are CURVE servers holding a secret key, and the
balancer's SUB and DEALER sockets are clients that know the replica's public key: the handshake
succeeds only with the holder of the matching secret key, so a rogue publisher's messages never
reach the subscriber (ZMQ drops the connection before any message is delivered), and the
traffic is encrypted. Optionally the replica also admits only known client keys (a ZAP handler,
`zmq.auth`).

Keys are Z85 text (40 characters). Files are ZMQ certificates as `zmq.auth.create_certificates`
writes them (`NAME.key` with the public key, `NAME.key_secret` with both) - `kvfleet keys`
makes a pair - or a file holding just the 40-character key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


def is_z85_key(text: str) -> bool:
    return bool(_Z85_KEY.match(text))


def load_public_key(key_or_path: str) -> bytes:
    """A Z85 public key given as itself, or read from a certificate / key file."""
    if is_z85_key(key_or_path):
        return key_or_path.encode()
    public, _ = _read(key_or_path, bare_is_secret=False)
    return public


def load_secret_key(path: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a secret certificate, or a file holding just the secret key."""
    public, secret = _read(path, bare_is_secret=True)
    if secret is None:
        raise ValueError(f"{path} holds no secret key (a `.key_secret` file is needed, not the public `.key`)")
    return public, secret


def _read(path: str, bare_is_secret: bool) -> tuple[bytes, bytes | None]:
    p = Path(path)
    try:
        text = p.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read CURVE key file {path}: {e}") from None
    if is_z85_key(text):  # a bare key: the caller says which kind it expects
        key = text.encode()
        return (zmq.curve_public(key), key) if bare_is_secret else (key, None)
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError, zmq.ZMQError) as e:
        raise ValueError(f"{path} is not a ZMQ certificate: {e}") from None
    if public is None or not is_z85_key(public.decode()):
        raise ValueError(f"{path} holds no CURVE public key")
    return public, secret


@dataclass(frozen=True, slots=True)
class CurveClientKeys:
    """What a subscriber needs: the server's public key and its own keypair (all Z85)."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of that server; call before connect()."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret


def client_keypair(secret_file: str | None) -> tuple[bytes, bytes]:
    """A client's (public, secret) keys: from `secret_file`, or a fresh pair (fine unless the
    server admits only known clients)."""
    return load_secret_key(secret_file) if secret_file is not None else zmq.curve_keypair()


def client_keys(server_key: str | None, keypair: tuple[bytes, bytes]) -> CurveClientKeys | None:
    """The keys for a client of the server with public key `server_key` (Z85); None: no CURVE."""
    if server_key is None:
        return None
    return CurveClientKeys(load_public_key(server_key), *keypair)


def make_server(sock: zmq.Socket, secret: bytes) -> None:
    """Make `sock` a CURVE server with this secret key; call before bind()/connect()."""
    sock.curve_secretkey = secret
    sock.curve_publickey = zmq.curve_public(secret)
    sock.curve_server = True


def write_keypair(directory: str, name: str) -> tuple[str, str]:
    """Write NAME.key (public) and NAME.key_secret (mode 0600) under `directory`; return both paths."""
    os.makedirs(directory, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if os.path.exists(os.path.join(directory, name + suffix)):
            raise ValueError(f"{os.path.join(directory, name + suffix)} exists; not overwriting a key")
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return str(public), str(secret)
