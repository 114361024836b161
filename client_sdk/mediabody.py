"""The body of a ``type: "media"`` message (docs/MEDIA.md, *The media message*): build and parse.

It travels inside the end-to-end encrypted payload, so only the sender and the recipients
see the key. A recipient parses what any member or peer sent: ``parse_media_body`` checks
every field and raises ``MediaBodyError`` (a ``ValueError``) naming the bad one, never
anything else, for whatever bytes arrive.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from client_sdk.errors import ChatError
from client_sdk.mediacrypto import MAX_SEGMENTS, MediaKey, segments

MEDIA_TYPE: Final = "media"
BODY_VERSION: Final = 1
MAX_BODY_CHARS: Final = 48 * 1024
"""Fits an encrypted body under the server's default ``limits.max_body_bytes`` (64 KiB, base64)."""
MAX_THUMBNAIL_BYTES: Final = 24 * 1024
MAX_NAME_CHARS: Final = 255
MIN_CHUNK, MAX_CHUNK = 1024, 1 << 24
DEFAULT_MIME: Final = "application/octet-stream"
BLOB_PATH_PREFIX: Final = "/v1/media/blobs/"
SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
MIME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_NAME_BAD: Final = re.compile(r"[\x00-\x1f\x7f/\\]")


class MediaBodyError(ChatError, ValueError):
    """A media message body is not of the documented form (what a hostile sender could send)."""


@dataclass(frozen=True, slots=True)
class MediaBody:
    """A media message's content: where the ciphertext is, how to check and decrypt it, and what it is."""

    url: str
    key: MediaKey
    sha256: str
    size: int
    mime: str = DEFAULT_MIME
    name: str | None = None
    thumbnail: bytes | None = None

    @property
    def blob(self) -> str:
        """The blob id: the ciphertext's SHA-256 (hex)."""
        return self.url.removeprefix(BLOB_PATH_PREFIX)

    def encode(self) -> str:
        """The JSON body to send with ``type="media"``; checks the fields like ``parse`` does."""
        if self.thumbnail is not None and len(self.thumbnail) > MAX_THUMBNAIL_BYTES:
            raise MediaBodyError(f"media body: 'thumbnail' is {len(self.thumbnail)} bytes, "
                                 f"at most {MAX_THUMBNAIL_BYTES}: make it smaller")
        fields: dict[str, Any] = {
            "v": BODY_VERSION, "url": self.url, "key": _b64(self.key.key), "nonce": _b64(self.key.prefix),
            "chunk": self.key.chunk, "sha256": self.sha256, "size": self.size, "mime": self.mime,
            "name": self.name, "thumbnail": None if self.thumbnail is None else _b64(self.thumbnail),
        }
        text = json.dumps(fields, separators=(",", ":"))
        parse_media_body(text)  # the same rules both ways: a body this SDK sends always parses
        return text


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MediaBodyError(f"media body: {name!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _bytes(obj: dict[str, Any], name: str, limit: int) -> bytes:
    text = _field(obj, name, str)
    if len(text) > limit * 4 // 3 + 4:
        raise MediaBodyError(f"media body: {name!r} is longer than {limit} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MediaBodyError(f"media body: {name!r} is not base64") from None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return False
    return True


def parse_media_body(text: str | bytes) -> MediaBody:
    """The ``MediaBody`` in a received message body; raises ``MediaBodyError`` naming what is wrong."""
    if len(text) > MAX_BODY_CHARS:
        raise MediaBodyError(f"media body longer than {MAX_BODY_CHARS} characters")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise MediaBodyError("media body is not JSON") from None
    if not isinstance(obj, dict):
        raise MediaBodyError("media body is not a JSON object")
    if obj.get("v") != BODY_VERSION or isinstance(obj.get("v"), bool):
        raise MediaBodyError(f"media body version {obj.get('v')!r} is not {BODY_VERSION}: update the app")
    sha = _field(obj, "sha256", str)
    if SHA256_RE.fullmatch(sha) is None:
        raise MediaBodyError("media body: 'sha256' is not 64 lowercase hex digits")
    url = _field(obj, "url", str)
    if url != BLOB_PATH_PREFIX + sha:
        raise MediaBodyError(f"media body: 'url' is not {BLOB_PATH_PREFIX}<sha256>")
    chunk = _field(obj, "chunk", int)
    if not MIN_CHUNK <= chunk <= MAX_CHUNK:
        raise MediaBodyError(f"media body: 'chunk' {chunk} outside {MIN_CHUNK}..{MAX_CHUNK}")
    size = _field(obj, "size", int)
    if not 0 <= size <= (MAX_SEGMENTS - 1) * chunk or segments(size, chunk) >= MAX_SEGMENTS:
        raise MediaBodyError(f"media body: 'size' {size} out of range")
    try:
        key = MediaKey(_bytes(obj, "key", 64), _bytes(obj, "nonce", 64), chunk)
    except ValueError as exc:
        raise MediaBodyError(f"media body: {exc}") from None
    mime = obj.get("mime", DEFAULT_MIME)
    if not isinstance(mime, str) or MIME_RE.fullmatch(mime) is None:
        raise MediaBodyError("media body: 'mime' is not a type/subtype")
    name = obj.get("name")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS
                             or _NAME_BAD.search(name) or name in (".", "..") or not _utf8(name)):
        raise MediaBodyError(f"media body: 'name' must be 1-{MAX_NAME_CHARS} characters, "
                             "no path separators or control characters")
    thumbnail = None if obj.get("thumbnail") is None else _bytes(obj, "thumbnail", MAX_THUMBNAIL_BYTES)
    if thumbnail is not None and len(thumbnail) > MAX_THUMBNAIL_BYTES:
        raise MediaBodyError(f"media body: 'thumbnail' is longer than {MAX_THUMBNAIL_BYTES} bytes")
    return MediaBody(url, key, sha, size, mime, name, thumbnail)
