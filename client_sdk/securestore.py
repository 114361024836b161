"""Encryption at rest for the local store: one 32-byte key, AES-256-GCM per value.

Where the key comes from (``store_key``):
- the app passes a secret (``store_secret``): the key is scrypt(secret, salt),
  with a random salt kept in the store itself. A wrong secret is detected by a
  sealed check value and refused (``StoreError``); the secret is never stored.
- no secret and a store file: a random key kept in a key file beside the store
  (``<store>.key``, mode 0600). This keeps the database file alone (a backup, a
  copy synced somewhere) unreadable; anyone who can read the whole directory
  can read both. Apps should pass a secret from the platform's key store.
- an in-memory store: a random key that lives as long as the process.

``Sealer.seal(text, where)`` binds each value to its place (``where``: table
and row id) as AES-GCM associated data, so a sealed value copied into another
row does not open. Sealed values are ``"s1:" + base64(nonce || ciphertext)``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from client_sdk.errors import StoreError

PREFIX: Final = "s1:"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
SCRYPT_N: Final = 2 ** 15  # 32 MiB, ~0.1 s: paid once per client start, not per message
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
CHECK_TEXT: Final = "chat-store-key-check"


def derive_key(secret: bytes, salt: bytes, n: int = SCRYPT_N) -> bytes:
    """The store key for ``secret`` (scrypt, 32 bytes)."""
    return hashlib.scrypt(secret, salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, maxmem=256 * n * SCRYPT_R,
                          dklen=KEY_BYTES)


class Sealer:
    """AES-256-GCM with one key; ``seal``/``open`` strings bound to where they are kept."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("the store key must be 32 bytes")
        self._aead = AESGCM(key)
        self._key = key

    def seal(self, text: str, where: str) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, text.encode("utf-8", "surrogatepass"), where.encode())
        return PREFIX + base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, value: str, where: str) -> str:
        """The text sealed at ``where``; raises StoreError if it was altered, moved or sealed with another key."""
        if not value.startswith(PREFIX):
            raise StoreError(f"a value in the local store ({where}) is not sealed")
        try:
            raw = base64.b64decode(value[len(PREFIX):], validate=True)
            plain = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], where.encode())
        except (InvalidTag, ValueError, binascii.Error) as exc:
            raise StoreError(f"a value in the local store ({where}) does not open with this key") from exc
        return plain.decode("utf-8", "surrogatepass")

    def subkey(self, label: str) -> bytes:
        """A 32-byte key for another purpose (the Olm pickle key), independent of the store key."""
        return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=label.encode()).derive(self._key)


def key_file_key(path: Path) -> bytes:
    """Read the random key kept beside the store, creating it (mode 0600) the first time."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key_file(path)
    except OSError as exc:
        raise StoreError(f"cannot create the store key file {path}: {exc}") from exc
    key = secrets.token_bytes(KEY_BYTES)
    with os.fdopen(fd, "w") as out:
        out.write(key.hex())
        out.flush()
        os.fsync(out.fileno())
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the store key file {path}: {exc}") from exc
    if len(key) != KEY_BYTES:
        raise StoreError(f"the store key file {path} does not hold a 32-byte key")
    return key


def as_bytes(secret: str | bytes) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not secret:
        raise ValueError("store_secret must not be empty")
    return secret
