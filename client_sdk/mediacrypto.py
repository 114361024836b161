"""Media encryption (docs/MEDIA.md, *Encryption format*): pure, no I/O beyond the file objects given.

Rules:
1. Each file gets a random 32-byte AES-256-GCM key and a random 8-byte nonce prefix.
2. The plaintext is cut into segments of ``chunk`` bytes (64 KiB); the last may be shorter, and
   an empty file is one empty segment (so even it is authenticated).
3. Segment i is ``AES-256-GCM(key, nonce = prefix || uint32-BE(i), segment, aad = AAD_PREFIX +
   (b"\\x01" if last else b"\\x00"))``: ciphertext then the 16-byte tag. The index in the nonce
   makes a reordered segment fail; the last-flag makes a truncated file fail (its new last
   segment was sealed as not-last).
4. The ciphertext is the segments one after another, so its size follows from the plaintext
   size (``ciphertext_size``) and segment i starts at ``i * (chunk + 16)``: an upload can be
   re-encrypted from any segment (``encrypt_from``), identically, to resume it without state.
   The file must not change meanwhile (the same nonce would then seal other bytes); the digest
   check at the end of an upload catches a change.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from client_sdk.errors import ChatError

KEY_BYTES: Final = 32
NONCE_PREFIX_BYTES: Final = 8
TAG_BYTES: Final = 16
SEGMENT_BYTES: Final = 65536
MAX_SEGMENTS: Final = 2 ** 32  # the index is 4 bytes of the nonce
AAD_PREFIX: Final = b"chat-media-v1"


class MediaCryptoError(ChatError):
    """The media ciphertext does not decrypt: wrong key, truncated, reordered or altered."""


@dataclass(frozen=True, slots=True)
class MediaKey:
    """What decrypts one file: the AES key, the nonce prefix and the segment size."""

    key: bytes
    prefix: bytes
    chunk: int = SEGMENT_BYTES

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES or len(self.prefix) != NONCE_PREFIX_BYTES:
            raise ValueError(f"a media key is {KEY_BYTES} bytes and its nonce prefix {NONCE_PREFIX_BYTES}")
        if not 1 <= self.chunk <= 2 ** 24:
            raise ValueError(f"segment size {self.chunk} out of range")

    @classmethod
    def random(cls) -> MediaKey:
        return cls(os.urandom(KEY_BYTES), os.urandom(NONCE_PREFIX_BYTES))


def segments(size: int, chunk: int = SEGMENT_BYTES) -> int:
    """How many segments a plaintext of ``size`` bytes makes (rule 2: at least one)."""
    if size < 0:
        raise ValueError("size must be >= 0")
    return max(1, -(-size // chunk))


def ciphertext_size(size: int, chunk: int = SEGMENT_BYTES) -> int:
    """Bytes of ciphertext for ``size`` bytes of plaintext."""
    return size + segments(size, chunk) * TAG_BYTES


def _nonce(mk: MediaKey, index: int) -> bytes:
    if not 0 <= index < MAX_SEGMENTS:
        raise ValueError("file too large for this segment size")
    return mk.prefix + struct.pack(">I", index)


def _aad(last: bool) -> bytes:
    return AAD_PREFIX + (b"\x01" if last else b"\x00")


def _read_exactly(source: BinaryIO, n: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        part = source.read(n)
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def encrypt_from(mk: MediaKey, source: BinaryIO, size: int, start: int = 0) -> Iterator[bytes]:
    """The ciphertext of the ``size``-byte plaintext in ``source`` from ciphertext byte ``start``
    on, one segment (or the rest of one) at a time; ``source`` is seeked to the segment holding
    ``start`` (rule 4). Raises ValueError if the file is shorter than ``size``."""
    total = ciphertext_size(size, mk.chunk)
    if not 0 <= start <= total:
        raise ValueError(f"start {start} outside the ciphertext (0..{total})")
    count = segments(size, mk.chunk)
    first, skip = divmod(start, mk.chunk + TAG_BYTES)
    if first == count:  # start == total: nothing left
        return
    aead = AESGCM(mk.key)
    source.seek(first * mk.chunk)
    for index in range(first, count):
        want = min(mk.chunk, size - index * mk.chunk)
        plain = _read_exactly(source, want)
        if len(plain) != want:
            raise ValueError(f"the file is shorter than its declared {size} bytes (did it change?)")
        sealed = aead.encrypt(_nonce(mk, index), plain, _aad(index == count - 1))
        yield sealed[skip:] if skip else sealed
        skip = 0


def decrypt_to(mk: MediaKey, source: BinaryIO, size: int, sink: BinaryIO) -> int:
    """Decrypt the ciphertext in ``source`` (from its current position) of a ``size``-byte
    plaintext into ``sink``; returns the bytes written. Raises MediaCryptoError for a wrong key
    or any altered, reordered, missing or extra byte (nothing after the first bad segment is
    written; the caller discards ``sink``)."""
    aead = AESGCM(mk.key)
    count = segments(size, mk.chunk)
    written = 0
    for index in range(count):
        want = min(mk.chunk, size - index * mk.chunk) + TAG_BYTES
        sealed = _read_exactly(source, want)
        if len(sealed) != want:
            raise MediaCryptoError(f"the ciphertext ends inside segment {index} of {count} (truncated)")
        try:
            plain = aead.decrypt(_nonce(mk, index), sealed, _aad(index == count - 1))
        except InvalidTag:
            raise MediaCryptoError(f"segment {index} of {count} does not decrypt: wrong key, "
                                   "or the ciphertext was altered, reordered or truncated") from None
        sink.write(plain)
        written += len(plain)
    if source.read(1):
        raise MediaCryptoError("bytes after the last segment: the ciphertext is not this file's")
    return written


def sha256_file(source: BinaryIO, block: int = 1 << 20) -> str:
    """The SHA-256 (hex) of ``source`` from its current position to its end."""
    digest = hashlib.sha256()
    while part := source.read(block):
        digest.update(part)
    return digest.hexdigest()


class RunningDigest:
    """The SHA-256 of a ciphertext hashed as it is sent, which survives a resume.

    ``feed`` takes bytes at a ciphertext offset and hashes only those not hashed yet (a resumed
    stream repeats some). ``mark`` records the hash state at an offset the server acknowledged;
    ``rewind`` returns to the last mark at or before an offset (or to 0), which is where a
    resumed stream must start so that every byte is hashed once, in order.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.offset = 0
        self._mark: tuple[int, hashlib._Hash] = (0, hashlib.sha256())

    def feed(self, offset: int, data: bytes) -> None:
        if offset > self.offset:
            raise ValueError(f"a gap in the hashed stream: {self.offset} hashed, bytes at {offset}")
        new = data[self.offset - offset:]
        self._hash.update(new)
        self.offset += len(new)

    def mark(self) -> None:
        """Everything hashed so far is acknowledged by the server."""
        self._mark = (self.offset, self._hash.copy())

    def rewind(self, offset: int) -> int:
        """Go back to hash again from the mark (or 0 if ``offset`` is before it); returns where."""
        start, state = self._mark if self._mark[0] <= offset else (0, hashlib.sha256())
        self._hash, self.offset = state.copy(), start
        return start

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
