"""Password hashes and device tokens. Pure functions; no storage, no I/O.

Passwords: scrypt (cryptography) with a per-user random salt, stored as
``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>`` so parameters can be raised
later without breaking old hashes. Verification is constant time.

Device tokens: 256 random bits, shown to the device once, stored only as
HMAC-SHA256 under a server secret (a stolen database alone cannot be used to
log in, and a check costs microseconds, so a reconnect storm stays cheap).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Final

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

SCRYPT_LOG2_N: Final = 14  # n = 16384, r = 8: 16 MiB and ~50 ms per hash
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32

TOKEN_PREFIX: Final = "dt1."  # noqa: S105 (a format marker, not a secret)
TOKEN_BYTES: Final = 32
MAX_PASSWORD_BYTES: Final = 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(salt: bytes, log2_n: int, r: int, p: int) -> Scrypt:
    return Scrypt(salt=salt, length=HASH_BYTES, n=1 << log2_n, r=r, p=p)


def hash_password(password: str) -> str:
    """A new salted scrypt hash of ``password`` (slow on purpose)."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P).derive(password.encode("utf-8"))
    return f"scrypt${SCRYPT_LOG2_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a ``hash_password`` result."""
    encoded = password.encode("utf-8")
    if len(encoded) > MAX_PASSWORD_BYTES:
        return False
    try:
        scheme, log2_n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        _scrypt(_unb64(salt), int(log2_n), int(r), int(p)).verify(encoded, _unb64(digest))
    except (ValueError, InvalidKey):
        return False
    return True


def new_server_secret() -> bytes:
    return secrets.token_bytes(32)


def new_device_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def looks_like_token(secret: str) -> bool:
    return secret.startswith(TOKEN_PREFIX) and 40 <= len(secret) <= 64


def token_digest(server_secret: bytes, user: str, device: str, token: str) -> str:
    """Keyed hash of a device token, bound to its user and device."""
    message = f"{user}\x00{device}\x00{token}".encode()
    return hmac.new(server_secret, message, hashlib.sha256).hexdigest()


def token_matches(server_secret: bytes, user: str, device: str, token: str, stored_digest: str) -> bool:
    return hmac.compare_digest(token_digest(server_secret, user, device, token), stored_digest)
