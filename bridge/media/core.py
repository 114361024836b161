"""The media rules (docs/MEDIA.md), pure: no I/O, the time passed in.

Rules:
1. An upload declares its size N and its recipient ``to`` (a user, or a group of the caller's) at
   creation; N must be at most ``max_bytes``. ``max(N, min_charge)`` is charged to the uploader's
   quota at once (what may still arrive counts; a tiny file costs a record and a file all the
   same) and stays charged while the blob lives.
2. A user has at most ``max_uploads`` uploads in progress and ``quota_bytes`` charged, and creates
   at most ``uploads_burst`` uploads at once, then ``uploads_per_minute``.
3. A PATCH writes at the offset stored now (else ``offset_mismatch``, telling the stored offset),
   at most ``chunk_max`` bytes, never past N. The PATCH that reaches N seals the upload.
4. At the seal the blob's readers (the uploader, ``to`` or every member of group ``to``) and its
   waiting devices (every device of those readers but the uploading one) are fixed.
5. A blob is read by its readers only; to anyone else it does not exist (``not_found``).
6. A blob is deleted when its waiting set becomes empty after a ``fetched`` or a device removal,
   or ``ttl`` after its seal, whichever comes first; a blob sealed with nobody waiting lives until
   its ttl. Its size is then given back to the uploader's quota. A deleted blob answers ``gone``
   to its readers until it is forgotten (another ttl later).
7. An upload idle (no PATCH) for ``upload_ttl`` is abandoned: its staging goes, its charge is freed.
   Its device may delete it sooner (``DELETE``), the same; a sealed upload is not deleted
   (``sealed``): its blob may be read already, and is shared by every upload of the same bytes.
   An upload whose bytes were moved under their digest but whose seal was never recorded (the
   process died between the two) takes those bytes with it, unless a live blob is made of them
   (``orphaned``).
8. A POST with an ``Idempotency-Key`` (the client's random string) names the upload by a digest
   of the caller's device and the key: repeated after a lost answer, it answers the same upload
   (same size and ``to``, else ``bad_request``) and charges nothing again.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import secrets
import zlib
from dataclasses import dataclass

from bridge.limits import RateLimiter
from chatproto import is_group_id, is_user_id

# Error codes (docs/MEDIA.md) and their HTTP status.
STATUS = {
    "bad_request": 400, "unauthorized": 401, "not_member": 403, "not_found": 404, "offset_mismatch": 409,
    "busy": 409, "sealed": 409,
    "gone": 410, "too_large": 413, "quota_exceeded": 413, "range_not_satisfiable": 416, "rate_limited": 429,
}


class MediaError(Exception):
    """A refused request: ``code`` (a key of ``STATUS``), ``detail`` for the client; ``offset`` for
    ``offset_mismatch``, ``retry_after_s`` for ``rate_limited`` and ``busy``, ``size`` (the blob's) for
    ``range_not_satisfiable``, ``blob`` for ``sealed``."""

    def __init__(self, code: str, detail: str, *, offset: int | None = None, retry_after_s: int | None = None,
                 size: int | None = None, blob: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.offset = offset
        self.retry_after_s = retry_after_s
        self.size = size
        self.blob = blob

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
    min_charge: int
    uploads_per_minute: float
    uploads_burst: int
    retry_after_s: int = 60


def charge(size: int, limits: MediaLimits) -> int:
    """Rule 1: the quota bytes an upload (then its blob) of ``size`` costs."""
    return max(size, limits.min_charge)


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    user: str
    device: str
    to: str
    size: int
    created_ms: int
    touched_ms: int
    sealing: str | None = None
    """The SHA-256 its seal moves the bytes under, recorded before they move (None: no seal began)."""


@dataclass(frozen=True, slots=True)
class Blob:
    sha256: str
    owner: str
    size: int
    created_ms: int
    expires_ms: int
    charge: int
    """Bytes charged to the owner's quota while the blob lives (rule 1, fixed at the seal)."""
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


def refusal(limit: str, cost: int, used: int, limits: MediaLimits) -> MediaError:
    """Rule 2: the error of a creation refused by ``limit`` (checked in this order: ``uploads`` in
    progress, ``quota``, creation ``rate``); ``cost`` its charge, ``used`` the bytes charged already."""
    if limit == "uploads":
        return MediaError("rate_limited", f"{limits.max_uploads} uploads are in progress already: finish "
                          "one, DELETE one, or let it expire", retry_after_s=limits.retry_after_s)
    if limit == "quota":
        return MediaError("quota_exceeded", f"{cost} more bytes (at least {limits.min_charge} per file) "
                          f"would take you past your quota of {limits.quota_bytes} bytes ({used} in use); "
                          "they are freed as recipients fetch")
    return MediaError("rate_limited", f"more than {limits.uploads_burst} uploads created at once, or "
                      f"{limits.uploads_per_minute:g} a minute: slow down",
                      retry_after_s=math.ceil(60 / limits.uploads_per_minute))


class Usage:
    """Per user: bytes charged (uploads in progress and live blobs), uploads in progress and the
    rate of upload creation (rules 1, 2)."""

    def __init__(self, limits: MediaLimits) -> None:
        self.limits = limits
        self.charged: dict[str, int] = {}
        self.uploads: dict[str, int] = {}
        self._rate = RateLimiter(limits.uploads_per_minute / 60, limits.uploads_burst)

    def admit(self, user: str, size: int, now_s: float) -> int:
        """Charge a new upload of ``size`` to ``user`` and return the charge, or raise ``rate_limited``
        or ``quota_exceeded`` (charging nothing). Checked and charged at once: no await between, so
        concurrent creations cannot pass a limit together."""
        limits = self.limits
        cost, used = charge(size, limits), self.charged.get(user, 0)
        if self.uploads.get(user, 0) >= limits.max_uploads:
            raise refusal("uploads", cost, used, limits)
        if used + cost > limits.quota_bytes:
            raise refusal("quota", cost, used, limits)
        if not self._rate.allow(user, now_s):
            raise refusal("rate", cost, used, limits)
        self.start(user, cost)
        return cost

    def start(self, user: str, cost: int) -> None:
        """An upload in progress charged ``cost`` (admitted, or loaded at start)."""
        self.charged[user] = self.charged.get(user, 0) + cost
        self.uploads[user] = self.uploads.get(user, 0) + 1

    def end_upload(self, user: str, cost: int, *, keep_charge: bool) -> None:
        """An upload sealed (its blob keeps the charge, unless it was stored already), abandoned or deleted."""
        self.uploads[user] = max(0, self.uploads.get(user, 0) - 1)
        if not keep_charge:
            self.free(user, cost)

    def free(self, user: str, cost: int) -> None:
        left = self.charged.get(user, 0) - cost
        if left > 0:
            self.charged[user] = left
        else:
            self.charged.pop(user, None)


_KEY = re.compile(r"[A-Za-z0-9_-]{16,64}")


def keyed_upload_id(user: str, device: str, key: str) -> str:
    """Rule 8: the upload id an ``Idempotency-Key`` names for this device (not guessable without the key),
    after the user's shard as ``new_upload_id``'s."""
    if _KEY.fullmatch(key) is None:
        raise MediaError("bad_request", "Idempotency-Key must be 16 to 64 characters of A-Z, a-z, 0-9, _ and -")
    digest = hashlib.sha256(f"{user}.{device}\n{key}".encode()).digest()
    return user_shard(user) + base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def check_replay(upload: Upload, size: int, to: str) -> None:
    """Rule 8: a repeated POST must ask for what the first one did."""
    if (upload.size, upload.to) != (size, to):
        raise MediaError("bad_request", f"this Idempotency-Key names an upload of {upload.size} bytes to "
                         f"{upload.to}: use a new key for each file")


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
    blob = Blob(sha256, upload.user, upload.size, now_ms, now_ms + limits.ttl_ms, charge(upload.size, limits))
    return Sealed(blob, readers, frozenset(waiting))


def readable(blob: Blob | None, is_reader: bool) -> Blob:
    """Rule 5 (and 6 for a deleted blob): the blob if the caller may read it, else the error."""
    if blob is None or not is_reader:
        raise MediaError("not_found", "no such blob")
    if blob.deleted:
        raise MediaError("gone", "the blob was deleted: every recipient fetched it, or it expired")
    return blob


def orphaned(blob: Blob | None) -> bool:
    """Rule 7: whether the bytes a dropped upload's seal moved under a digest may go, ``blob`` being
    that digest's record now: yes unless a live blob (the same bytes sealed by another upload) keeps them."""
    return blob is None or blob.deleted


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
