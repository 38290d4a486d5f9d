"""The server's identity: a UUID the vendor binds license files to, and its signing key.

Both are created once in the state folder and never change; the key and the
secret are readable by the service user only.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import stat
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lts_server import logs
from lts_server.store.sql import IdentityRow

if TYPE_CHECKING:
    from lts_server.store.postgres import PostgresStore

UUID_FILE = "server-uuid"
KEY_FILE = "server-key.pem"
SECRET_FILE = "server-secret"
# Names this machine's writers of the usage chain (lts_server/usagechain.py): every node has its own.
NODE_FILE = "node-id"


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    return hashlib.sha256(raw_public(public_key)).hexdigest()[:16]


def raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Identity:
    server_uuid: str
    signing_key: Ed25519PrivateKey
    # Keys the HMAC of session passwords: a stolen database alone cannot test guesses.
    secret: bytes

    @cached_property
    def public_key(self) -> Ed25519PublicKey:
        return self.signing_key.public_key()

    @cached_property
    def key_id(self) -> str:
        return key_id(self.public_key)

    @cached_property
    def public_key_b64(self) -> str:
        return base64.b64encode(raw_public(self.public_key)).decode()

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.signing_key.sign(data)).decode()


def make_state_dir(state_dir: Path) -> None:
    """Create the state folder for the service user only (0700), whatever the umask. An existing one keeps
    its mode (an operator may have opened it to a backup group on purpose; its files are 0600 anyway), but
    one that others may enter is said once at start."""
    if not state_dir.is_dir():
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state_dir, 0o700)
    elif (mode := stat.S_IMODE(state_dir.stat().st_mode)) & 0o077:
        logs.event("identity.state_dir_open", logs.logging.WARNING, path=str(state_dir), mode=f"{mode:04o}",
                   why="other users may list the state folder (its files are 0600); chmod 700 it unless meant")


def generate() -> Identity:
    return Identity(str(uuid.uuid4()), Ed25519PrivateKey.generate(), secrets.token_bytes(32))


def to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def from_pem(pem: bytes, where: str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{where} does not hold an Ed25519 private key")
    return key


async def for_cluster(store: PostgresStore, state_dir: Path) -> Identity:
    """The identity every node of a PostgreSQL cluster shares, kept in the database.

    The first node to start stores its own (the one in its state folder, if it
    has one, so a single server moved to PostgreSQL keeps its UUID; else a new
    one); every later node takes the stored one.
    """
    local = load_or_create(state_dir) if (state_dir / UUID_FILE).exists() else generate()
    row = await store.cluster_identity(IdentityRow(local.server_uuid, to_pem(local.signing_key).decode(),
                                                   local.secret.hex()))
    key = from_pem(row.signing_key_pem.encode(), "the cluster_identity table")
    return Identity(str(uuid.UUID(row.server_uuid)), key, bytes.fromhex(row.secret_hex))


def load_or_create(state_dir: Path) -> Identity:
    make_state_dir(state_dir)
    uuid_path = state_dir / UUID_FILE
    if not uuid_path.exists():
        _write_new(uuid_path, (str(uuid.uuid4()) + "\n").encode(), mode=0o600)
    server_uuid = str(uuid.UUID(uuid_path.read_text().strip()))

    key_path = state_dir / KEY_FILE
    if not key_path.exists():
        _write_new(key_path, to_pem(Ed25519PrivateKey.generate()), mode=0o600)
    key = from_pem(key_path.read_bytes(), str(key_path))

    secret_path = state_dir / SECRET_FILE
    if not secret_path.exists():
        _write_new(secret_path, secrets.token_bytes(32), mode=0o600)
    return Identity(server_uuid, key, secret_path.read_bytes())


def node_id(state_dir: Path) -> str:
    """This machine's node id, made once in the state folder (also on PostgreSQL, where the identity is shared)."""
    make_state_dir(state_dir)
    path = state_dir / NODE_FILE
    if not path.exists():
        _write_new(path, (str(uuid.uuid4()) + "\n").encode(), mode=0o600)
    return str(uuid.UUID(path.read_text().strip()))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that must never be half-written nor replaced: temp file, fsync, link."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away (or a permissive one left them)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process won the race: keep theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
