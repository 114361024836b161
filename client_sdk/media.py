"""Sending and receiving media files (docs/SDK.md, *Media*): encrypt and upload with resume,
download with resume, verify, decrypt. Blocking; ``Client`` calls these in the caller's thread,
``AsyncClient`` in a worker thread.

Upload rules (docs/MEDIA.md, HTTP API):
1. ``POST /uploads`` with the ciphertext's size reserves the upload; its ``chunk_max`` bounds
   each ``PATCH``. Its ``Idempotency-Key`` makes a POST retried after a lost answer name the
   same upload, not leave an orphan.
2. Each PATCH streams the next ``min(chunk_max, left)`` ciphertext bytes, encrypted from the file
   as they are sent; the server's ``Upload-Offset`` acknowledges them, and the running digest
   is marked there.
3. After a cut (or a ``409 offset_mismatch``), ask ``GET /uploads/<id>`` for the durable offset
   and go on from it, re-encrypting from the segment that holds it; the digest is rewound to its
   last mark and hashes the re-encrypted bytes up to the offset again without sending them.
4. Transient failures (cuts, 429, 5xx) are retried with backoff, at most ``RETRIES`` times in
   a row without progress; anything else raises ``MediaError`` at once.
5. The last PATCH seals the upload: the server's SHA-256 must be the one hashed on the way.
6. An upload that fails for good before its seal (a refusal, retries exhausted, a cancel, the
   file unreadable, ``progress`` raising) is deleted (``DELETE /uploads/<id>``, one try), so
   that it stops counting against the quota and ``media.max_uploads`` at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Final, TypeVar

from client_sdk.backoff import Backoff
from client_sdk.mediabody import BLOB_PATH_PREFIX, SHA256_RE, MediaBody
from client_sdk.mediacrypto import MediaKey, RunningDigest, ciphertext_size, decrypt_to, encrypt_from, sha256_file
from client_sdk.mediahttp import MediaError, MediaHTTP, read_body, read_reply

log = logging.getLogger(__name__)

UPLOADS: Final = "/v1/media/uploads"
RETRIES: Final = 8
PATCH_MAX: Final = 8 * 1024 * 1024
"""At most this many bytes per PATCH whatever the server allows: a cut repeats at most this much."""
Progress = Callable[[int, int], None]
"""``progress(done, total)`` in ciphertext bytes (after a resume ``done`` may step back to where
the server's bytes end); raising from it aborts the transfer."""
T = TypeVar("T")


class Cancelled(MediaError):
    """The transfer was cancelled (an ``AsyncClient`` task was cancelled)."""

    def __init__(self) -> None:
        super().__init__("cancelled", "the transfer was cancelled")


def pause(exc: MediaError, backoff: Backoff, stop: threading.Event | None) -> None:
    """Wait before retrying after the transient ``exc`` (its Retry-After, else the backoff's next
    delay); raises ``exc`` when ``RETRIES`` tries in a row failed, ``Cancelled`` when ``stop`` is set."""
    if not exc.transient or backoff.attempts >= RETRIES:
        raise exc
    delay = backoff.next()  # counts the try, also when the server says how long to wait
    wait = delay if exc.retry_after is None else min(exc.retry_after, backoff.maximum)
    log.info("%s; retrying in %.1fs", exc, wait)
    if stop is None:
        time.sleep(wait)
    elif stop.wait(wait):
        raise Cancelled() from exc


def retrying(step: Callable[[], T], backoff: Backoff, stop: threading.Event | None) -> T:
    """``step()``, again after a pause while it raises a transient ``MediaError`` (rule 4)."""
    while True:
        try:
            return step()
        except MediaError as exc:
            pause(exc, backoff, stop)


class Upload:
    """One file's upload to ``to`` (rules 1-5); ``run()`` returns its ``(url, sha256)``."""

    def __init__(self, http: MediaHTTP, to: str, source: BinaryIO, size: int, key: MediaKey,
                 progress: Progress | None = None, stop: threading.Event | None = None) -> None:
        self._http, self._to, self._source, self._size, self._key = http, to, source, size, key
        self.total = ciphertext_size(size, key.chunk)
        self._progress = progress
        self._stop = stop
        self._digest = RunningDigest()
        self._backoff = Backoff()

    def run(self) -> tuple[str, str]:
        key = {"Idempotency-Key": secrets.token_urlsafe(24)}  # rule 1: a POST repeated names the same upload
        created = retrying(lambda: self._http.call("POST", UPLOADS, {"size": self.total, "to": self._to}, headers=key),
                           self._backoff, self._stop).data
        try:
            upload, offset, chunk_max = str(created["upload"]), int(created["offset"]), int(created["chunk_max"])
        except (TypeError, KeyError, ValueError):
            raise MediaError("bad_response", f"POST {UPLOADS}: unexpected answer {created!r:.200}") from None
        path = f"{UPLOADS}/{upload}"
        try:
            return self._send(path, offset, chunk_max)
        except Exception as exc:
            if not isinstance(exc, MediaError) or exc.code != "digest_mismatch":  # sealed: DELETE is refused
                self._abandon(path)
            raise

    def _abandon(self, path: str) -> None:
        """Rule 6: delete the upload this failed one leaves; best effort (else ``upload_ttl_s`` frees it)."""
        try:
            self._http.call("DELETE", path)
        except MediaError as exc:
            log.info("%s not deleted (%s): the server drops it after media.upload_ttl_s", path, exc)

    def _send(self, path: str, offset: int, chunk_max: int) -> tuple[str, str]:
        """Rules 2-5 from ``offset``: ``(url, sha256)`` of the sealed upload."""
        step = min(max(1, chunk_max), PATCH_MAX)
        sealed: tuple[str, str] | None = None
        while sealed is None:
            try:
                offset, sealed = self._patch(path, offset, min(step, self.total - offset))
                self._backoff.reset()
            except MediaError as exc:
                if exc.code != "offset_mismatch":
                    pause(exc, self._backoff, self._stop)
                offset, sealed = retrying(lambda: self._status(path), self._backoff, self._stop)
            if sealed is None and offset >= self.total:
                raise MediaError("bad_response", f"{path}: all {self.total} bytes stored but the upload is not sealed")
        url, sha = sealed
        if sha != self._digest.hexdigest():
            raise MediaError("digest_mismatch", f"the server stored {sha}, the SDK sent "
                             f"{self._digest.hexdigest()}: did the file change during the upload?")
        return url, sha

    def _status(self, path: str) -> tuple[int, tuple[str, str] | None]:
        """Rule 3: the server's durable offset, and the blob if the upload was sealed already."""
        data = self._http.call("GET", path).data
        fields = data if isinstance(data, dict) else {}
        offset, url = fields.get("offset"), fields.get("url")
        if not isinstance(offset, int) or not 0 <= offset <= self.total:
            raise MediaError("bad_response", f"GET {path}: unexpected answer {data!r:.200}")
        if url is None:
            return offset, None
        self._rehash(offset)
        return offset, _blob(f"GET {path}", url, url.removeprefix(BLOB_PATH_PREFIX) if isinstance(url, str) else None)

    def _rehash(self, until: int) -> None:
        """Hash (without sending) what the server holds before ``until`` and this digest lacks."""
        for _ in self._pieces(until, 0):
            pass

    def _pieces(self, offset: int, length: int) -> Iterator[bytes]:
        """Ciphertext ``[offset, offset + length)`` in pieces, hashing everything from the digest's
        rewound position up to its end; bytes before ``offset`` are hashed only."""
        start = self._digest.rewind(offset)
        position = start
        end = offset + length
        for sealed in encrypt_from(self._key, self._source, self._size, start):
            if self._stop is not None and self._stop.is_set():
                raise Cancelled()
            piece = sealed[: end - position]
            self._digest.feed(position, piece)
            before, position = position, position + len(piece)
            if position > offset:
                yield piece[max(0, offset - before):]
                if self._progress is not None:
                    self._progress(position, self.total)
            if position >= end:
                return

    def _patch(self, path: str, offset: int, length: int) -> tuple[int, tuple[str, str] | None]:
        headers = {"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
        reply = self._http.call("PATCH", path, body=self._pieces(offset, length), headers=headers, length=length)
        if reply.status == 200:
            fields = reply.data if isinstance(reply.data, dict) else {}
            return offset + length, _blob(f"PATCH {path}", fields.get("url"), fields.get("sha256"))
        acked = reply.headers.get("Upload-Offset", "")
        if not acked.isdigit() or int(acked) != offset + length:
            raise MediaError("bad_response", f"PATCH {path}: Upload-Offset {acked!r}, expected {offset + length}")
        self._digest.mark()  # rule 2: the server holds everything hashed so far
        return offset + length, None


def _blob(what: str, url: object, sha: object) -> tuple[str, str]:
    """A sealed upload's ``(url, sha256)`` as the server named them; ``bad_response`` unless it is
    ``/v1/media/blobs/<sha256>`` (what a receiver accepts)."""
    if not isinstance(sha, str) or SHA256_RE.fullmatch(sha) is None or url != BLOB_PATH_PREFIX + sha:
        raise MediaError("bad_response", f"{what}: the sealed upload's url {url!r:.100} "
                         f"is not {BLOB_PATH_PREFIX}<sha256>")
    return BLOB_PATH_PREFIX + sha, sha


def download(http: MediaHTTP, body: MediaBody, dest: Path, progress: Progress | None = None,
             stop: threading.Event | None = None) -> None:
    """Download ``body``'s blob next to ``dest`` (resuming a ``.part`` file left by a cut),
    verify its SHA-256, decrypt it into ``dest`` (a temporary file renamed over it), then tell the
    server this device has it. Raises ``MediaError`` or ``MediaCryptoError``."""
    total = ciphertext_size(body.size, body.key.chunk)
    part = dest.with_name(f".{dest.name}.{body.blob[:16]}.part")
    if _size(part) > total:  # not this blob's: start over
        part.unlink()
    backoff = Backoff()
    while (have := _size(part)) < total:
        try:
            _fetch(http, body, part, have, total, progress, stop)
            backoff.reset()
        except MediaError as exc:
            pause(exc, backoff, stop)
    with open(part, "rb") as f:
        digest = sha256_file(f)
    if digest != body.sha256 or have != total:
        part.unlink()
        raise MediaError("digest_mismatch", f"the downloaded blob's SHA-256 is {digest}, the message says "
                         f"{body.sha256}: the stored blob is not the sender's (downloaded again next time)")
    try:
        _decrypt_into(body, part, dest)
    finally:  # a ciphertext that does not open with this key never will: no stray file
        part.unlink()
    with contextlib.suppress(MediaError):  # the blob then stays until media.ttl_days
        retrying(lambda: http.call("POST", f"{body.url}/fetched"), Backoff(), stop)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fetch(http: MediaHTTP, body: MediaBody, part: Path, have: int, total: int,
           progress: Progress | None, stop: threading.Event | None) -> None:
    """Append the blob's bytes from ``have`` on to ``part`` (a ranged GET); a 200 starts over."""
    conn = http.connect()
    try:
        headers = {"Range": f"bytes={have}-"} if have else {}
        response = http.send(conn, "GET", body.url, headers=headers)
        if response.status not in (200, 206):
            read_reply(response, f"GET {body.url}")  # raises the server's error
        resumed = response.status == 206
        done = have if resumed else 0
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if resumed else os.O_TRUNC), 0o600)
        with os.fdopen(fd, "ab" if resumed else "wb") as out:
            try:
                for piece in read_body(response, f"GET {body.url}"):
                    if stop is not None and stop.is_set():
                        raise Cancelled()
                    if done + len(piece) > total:
                        raise MediaError("bad_response", f"GET {body.url}: more bytes than the {total} expected")
                    out.write(piece)
                    done += len(piece)
                    if progress is not None:
                        progress(done, total)
                if done < total:  # http.client returns b"" at a premature end instead of raising
                    raise MediaError("network", f"GET {body.url}: the connection ended after {done} of {total} bytes")
            finally:
                out.flush()
                os.fsync(out.fileno())
    finally:
        conn.close()


def _decrypt_into(body: MediaBody, part: Path, dest: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with open(part, "rb") as source, os.fdopen(fd, "wb") as sink:
            decrypt_to(body.key, source, body.size, sink)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
