"""The media rules (docs/MEDIA.md), pure: no I/O, the time passed in.

Rules:
1. An upload declares its size N and its recipient ``to`` (a user, or a group of the caller's) at
   creation; N must be at most ``max_bytes``. N is charged to the uploader's quota at once (what
   may still arrive counts) and stays charged while the blob lives.
2. A user has at most ``max_uploads`` uploads in progress and ``quota_bytes`` charged.
3. A PATCH writes at the offset stored now (else ``offset_mismatch``, telling the stored offset),
   at most ``chunk_max`` bytes, never past N. The PATCH that reaches N seals the upload.
4. At the seal the blob's readers (the uploader, ``to`` or every member of group ``to``) and its
   waiting devices (every device of those readers but the uploading one) are fixed.
5. A blob is read by its readers only; to anyone else it does not exist (``not_found``).
6. A blob is deleted when its waiting set becomes empty after a ``fetched`` or a device removal,
   or ``ttl`` after its seal, whichever comes first; a blob sealed with nobody waiting lives until
   its ttl. Its size is then given back to the uploader's quota. A deleted blob answers ``gone``
   to its readers until it is forgotten (another ttl later).
7. An upload idle (no PATCH) for ``upload_ttl`` is abandoned: its staging goes, its size is freed.
"""

from __future__ import annotations

import re
import secrets
import zlib
from dataclasses import dataclass, field

from chatproto import is_group_id, is_user_id

# Error codes (docs/MEDIA.md) and their HTTP status.
STATUS = {
    "bad_request": 400, "unauthorized": 401, "not_member": 403, "not_found": 404, "offset_mismatch": 409,
    "gone": 410, "too_large": 413, "quota_exceeded": 413, "range_not_satisfiable": 416, "rate_limited": 429,
}


class MediaError(Exception):
    """A refused request: ``code`` (a key of ``STATUS``), ``detail`` for the client; ``offset`` for
    ``offset_mismatch``, ``retry_after_s`` for ``rate_limited``, ``size`` (the blob's) for
    ``range_not_satisfiable``."""

    def __init__(self, code: str, detail: str, *, offset: int | None = None, retry_after_s: int | None = None,
                 size: int | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.offset = offset
        self.retry_after_s = retry_after_s
        self.size = size

    @property
    def status(self) -> int:
        return STATUS[self.code]


@dataclass(frozen=True, slots=True)
class MediaLimits:
    max_bytes: int
    chunk_max: int
    quota_bytes: int
    max_uploads: int
    upload_ttl_ms: int
    ttl_ms: int
    retry_after_s: int = 60


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    user: str
    device: str
    to: str
    size: int
    created_ms: int
    touched_ms: int


@dataclass(frozen=True, slots=True)
class Blob:
    sha256: str
    owner: str
    size: int
    created_ms: int
    expires_ms: int
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Sealed:
    """What a seal stores: the blob, who may read it, which devices must fetch it (client ids)."""

    blob: Blob
    readers: frozenset[str]
    waiting: frozenset[str]


def user_shard(user: str) -> str:
    """The uploader's shard, one hex digit: the first character of each of its upload ids, so that
    a store partitioned by uploader (storage/redis/media.py) finds an upload from its id alone."""
    return format(zlib.crc32(user.encode()) % 16, "x")


def new_upload_id(user: str) -> str:
    """A new unguessable upload id of ``user``'s (128 random bits after its shard)."""
    return user_shard(user) + secrets.token_urlsafe(16)


def parse_new_upload(body: object, limits: MediaLimits) -> tuple[int, str]:
    """``(size, to)`` of a ``POST /uploads`` body, or ``bad_request`` / ``too_large``."""
    if not isinstance(body, dict) or set(body) != {"size", "to"}:
        raise MediaError("bad_request", 'the body must be a JSON object {"size": N, "to": "user" or "g:..."}')
    size, to = body["size"], body["to"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise MediaError("bad_request", "size must be a positive integer (bytes of ciphertext)")
    if not isinstance(to, str) or not (is_user_id(to) or is_group_id(to)):
        raise MediaError("bad_request", "to must be a user id or a group id (g:...)")
    if size > limits.max_bytes:
        raise MediaError("too_large", f"size {size} is over the limit of {limits.max_bytes} bytes")
    return size, to


@dataclass(slots=True)
class Usage:
    """Per user: bytes charged (uploads in progress and live blobs) and uploads in progress (rules 1, 2)."""

    charged: dict[str, int] = field(default_factory=dict)
    uploads: dict[str, int] = field(default_factory=dict)

    def admit(self, user: str, size: int, limits: MediaLimits) -> None:
        """Raise ``rate_limited`` or ``quota_exceeded`` if ``user`` may not start an upload of ``size``."""
        if self.uploads.get(user, 0) >= limits.max_uploads:
            raise MediaError("rate_limited", f"{limits.max_uploads} uploads are in progress already: finish "
                             "one or let it expire", retry_after_s=limits.retry_after_s)
        used = self.charged.get(user, 0)
        if used + size > limits.quota_bytes:
            raise MediaError("quota_exceeded", f"{size} more bytes would take you past your quota of "
                             f"{limits.quota_bytes} bytes ({used} in use); they are freed as recipients fetch")

    def start(self, user: str, size: int) -> None:
        self.charged[user] = self.charged.get(user, 0) + size
        self.uploads[user] = self.uploads.get(user, 0) + 1

    def end_upload(self, user: str, size: int, *, keep_charge: bool) -> None:
        """An upload sealed (its blob keeps the charge, unless it was stored already) or abandoned."""
        self.uploads[user] = max(0, self.uploads.get(user, 0) - 1)
        if not keep_charge:
            self.free(user, size)

    def free(self, user: str, size: int) -> None:
        left = self.charged.get(user, 0) - size
        if left > 0:
            self.charged[user] = left
        else:
            self.charged.pop(user, None)


def check_patch(upload: Upload, offset: int, stored: int, length: int | None, limits: MediaLimits) -> None:
    """Rule 3: raise unless a PATCH of ``length`` bytes at ``offset`` may be written now."""
    if length is None:
        raise MediaError("bad_request", "Content-Length is required (chunked bodies are not accepted)")
    if offset != stored:
        raise MediaError("offset_mismatch", f"{stored} bytes are stored: send from there", offset=stored)
    if length > limits.chunk_max:
        raise MediaError("too_large", f"a PATCH carries at most {limits.chunk_max} bytes")
    if offset + length > upload.size:
        raise MediaError("too_large", f"{offset + length} bytes would pass the declared size {upload.size}")


def seal(upload: Upload, sha256: str, to_users: dict[str, list[str]], own_devices: list[str],
         now_ms: int, limits: MediaLimits) -> Sealed:
    """Rule 4. ``to_users``: each reader other than the uploader -> its devices; ``own_devices``:
    the uploader's devices."""
    readers = frozenset({upload.user, *to_users})
    waiting = {f"{user}.{device}" for user, devices in to_users.items() for device in devices}
    waiting.update(f"{upload.user}.{device}" for device in own_devices if device != upload.device)
    blob = Blob(sha256, upload.user, upload.size, now_ms, now_ms + limits.ttl_ms)
    return Sealed(blob, readers, frozenset(waiting))


def readable(blob: Blob | None, is_reader: bool) -> Blob:
    """Rule 5 (and 6 for a deleted blob): the blob if the caller may read it, else the error."""
    if blob is None or not is_reader:
        raise MediaError("not_found", "no such blob")
    if blob.deleted:
        raise MediaError("gone", "the blob was deleted: every recipient fetched it, or it expired")
    return blob


def abandoned(uploads: list[Upload], busy: set[str], now_ms: int, limits: MediaLimits) -> list[Upload]:
    """Rule 7: the uploads idle too long (not one a PATCH is writing now)."""
    return [u for u in uploads if u.id not in busy and now_ms - u.touched_ms >= limits.upload_ttl_ms]


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a one-range ``Range`` header (None: the whole blob), else
    ``range_not_satisfiable`` (also for several ranges, which are not served)."""
    if header is None:
        return None
    found = _RANGE.fullmatch(header.strip())
    if found is None or found.group(1) == found.group(2) == "":
        raise MediaError("range_not_satisfiable", "one range is served: Range: bytes=a-b, a- or -n", size=size)
    first, last = found.group(1), found.group(2)
    if first == "":  # the last n bytes
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = size if last == "" else min(size, int(last) + 1)
    if start >= size or start >= end:
        raise MediaError("range_not_satisfiable", f"the blob has {size} bytes", size=size)
    return start, end
