"""The media service: the shell around ``bridge.media.core`` (the rules), a ``MediaStore`` (the
records) and a ``BlobStore`` (the bytes). The HTTP handlers (chatserver/media_http.py) parse a
request, call one method here with the authenticated caller, and map ``MediaError`` to a status.

In memory: the uploads in progress (few: ``max_uploads`` per user), each user's charged bytes and
upload-creation rate, a lock per upload (one PATCH, or the DELETE, at a time) and one per content
being sealed (``_seal``); in cluster mode ``bridge/cluster/media.py`` overrides the hooks ``_begin``,
``_in_progress`` and ``_abandon`` to keep them in the shared store instead. Everything else is read
from the store per request. One supervised loop (``media_sweep``) drops removed devices from waiting
sets, abandoned uploads and expired blobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

from bridge.background import Supervisor, cancel
from bridge.clock import Clock
from bridge.locks import KeyedLocks
from bridge.media import core
from bridge.media.blobs import BlobMissing, BlobStore, check_blob_id
from bridge.media.core import Blob, MediaError, MediaLimits, Upload, Usage
from bridge.media.store import MediaStore
from bridge.messaging.store import UserLookup
from bridge.store import StoreError
from chatproto import is_group_id

log = logging.getLogger(__name__)

LOCK_WAIT_S = 10.0  # a PATCH (or GET) waits this long for the PATCH writing the upload now
Members = Callable[[str], Awaitable[tuple[str, ...]]]
"""A group's members now (none: no such group)."""


@dataclass(slots=True)
class MediaCounters:
    """For the metrics: bytes received and sent, refusals by code, what is stored now."""

    bytes_in: int = 0
    bytes_out: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    stored_bytes: int = 0
    blobs: int = 0

    def refused(self, code: str) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1


@dataclass(frozen=True, slots=True)
class Download:
    blob: Blob
    start: int
    end: int
    partial: bool
    chunks: AsyncIterator[bytes]


class MediaService:
    def __init__(self, store: MediaStore, blobs: BlobStore, users: UserLookup, members: Members,
                 limits: MediaLimits, sweep_s: float, *, clock: Clock, supervisor: Supervisor) -> None:
        self._store = store
        self._blobs = blobs
        self._users = users
        self._members = members
        self.limits = limits
        self._sweep_s = sweep_s
        self._clock = clock
        self._supervisor = supervisor
        self._uploads: dict[str, Upload] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # sha256 -> a lock: a seal moves and records the bytes holding it, a drop decides whether they go
        # (``_unsealed``), so the two never interleave in this process.
        self._contents = KeyedLocks()
        self._usage = Usage(limits)
        self._removed: list[str] = []  # devices to drop from waiting sets (the sweep does it)
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self.counters = MediaCounters()

    @property
    def uploads_in_progress(self) -> int:
        return len(self._uploads)

    async def start(self, devices: set[str]) -> None:
        """Load the records; ``devices`` (every client id now) drops the devices removed meanwhile."""
        uploads, owners, count, stored = await self._store.load()
        now = self._clock.wall_ms()
        for upload in uploads:  # the time down does not count as idle
            self._uploads[upload.id] = replace(upload, touched_ms=max(upload.touched_ms, now))
            self._usage.start(upload.user, core.charge(upload.size, self.limits))
        for owner, cost in owners.items():
            self._usage.charged[owner] = self._usage.charged.get(owner, 0) + cost
        self.counters.stored_bytes, self.counters.blobs = stored, count
        self._removed = sorted(await self._store.waiting_devices() - devices)
        self._loops = [self._supervisor.spawn("media_sweep", self._sweep_round)]
        self._wake.set()

    async def close(self) -> None:
        await cancel(self._loops)

    # --- requests (the caller is authenticated) ----------------------------------------------

    async def create(self, user: str, device: str, body: object, key: str | None = None) -> tuple[Upload, int]:
        """A new upload, or the one ``key`` (``Idempotency-Key``) made already: ``(upload, offset)``."""
        size, to = core.parse_new_upload(body, self.limits)
        upload_id = core.new_upload_id(user) if key is None else core.keyed_upload_id(user, device, key)
        if is_group_id(to):
            if user not in await self._members(to):
                raise MediaError("not_member", f"you are not a member of {to}")
        elif await self._users.user_devices(to) is None:
            raise MediaError("not_found", f"no user {to}")
        if key is not None:
            await self._answer_if_sealed(upload_id)
        now = self._clock.wall_ms()
        new = Upload(upload_id, user, device, to, size, now, now)
        try:
            upload = await self._begin(new)
        except StoreError:
            if key is not None:  # its row is there: sealed since the look above
                await self._answer_if_sealed(upload_id)
            raise
        if upload is new:
            return new, 0
        core.check_replay(upload, size, to)  # a repeat: the key's upload exists
        # A PATCH may be sealing it now (the staging moving away): answer from what that PATCH left.
        async with self._locked(upload, busy="a PATCH of this upload is in progress: retry once it ended"):
            if await self._in_progress(user, device, upload_id) is not None:
                return upload, await self._blobs.staged_size(upload_id)
        await self._answer_if_sealed(upload_id)
        raise MediaError("not_found", "the upload was abandoned meanwhile: POST it again")

    async def _answer_if_sealed(self, upload_id: str) -> None:
        """Rule 8: a repeated POST whose upload is sealed is answered ``sealed``, naming its blob."""
        if (found := await self._store.sealed(upload_id)) is not None:
            raise MediaError("sealed", "this Idempotency-Key's upload is complete", blob=found[1])

    async def status(self, user: str, device: str, upload_id: str) -> tuple[int, int, str | None]:
        """``(offset, size, blob)`` of the caller's upload (blob: once sealed)."""
        upload = await self._in_progress(user, device, upload_id)
        if upload is not None:
            async with self._locked(upload):
                if await self._in_progress(user, device, upload_id):  # not sealed or abandoned while this waited
                    stored = await self._blobs.staged_size(upload_id)
                    if stored < upload.size:
                        return stored, upload.size, None
                    # Every byte stored but not sealed: the process died between the two. Seal now, or
                    # the client (told "all stored, no url") could neither finish nor resume.
                    return stored, upload.size, await self._seal(upload)
        upload, blob = await self._sealed(user, device, upload_id)
        return upload.size, upload.size, blob

    async def delete(self, user: str, device: str, upload_id: str) -> None:
        """Rule 7: the caller's upload in progress goes at once (its staging, its charge); a sealed
        one is refused (``sealed``, naming its blob)."""
        upload = await self._in_progress(user, device, upload_id)
        if upload is not None:
            async with self._locked(upload, busy="a PATCH of this upload is in progress: retry once it ended"):
                if await self._in_progress(user, device, upload_id):  # not sealed or abandoned while this waited
                    await self._drop(upload)
                    log.info("media: upload %s of %s deleted by its device", upload_id, user)
                    return
        _, blob = await self._sealed(user, device, upload_id)
        raise MediaError("sealed", f"the upload is complete: its blob {blob} is deleted once every recipient "
                         "fetched it, or after media.ttl_days", blob=blob)

    async def patch(self, user: str, device: str, upload_id: str, offset: int, length: int | None,
                    chunks: AsyncIterator[bytes]) -> tuple[int, str | None]:
        """Append the body; ``(new offset, blob once sealed)``. Bytes of a body cut midway are kept."""
        upload = await self._in_progress(user, device, upload_id)
        if upload is None:
            raise MediaError("not_found", "no such upload in progress for this device")
        async with self._locked(upload):
            if not await self._in_progress(user, device, upload_id):  # sealed or abandoned while this waited
                raise MediaError("not_found", "the upload is no longer in progress: GET it to learn its url")
            core.check_patch(upload, offset, await self._blobs.staged_size(upload_id), length, self.limits)
            try:
                stored = await self._blobs.append(upload_id, offset, self._count_in(chunks))
            finally:
                self._uploads[upload_id] = replace(upload, touched_ms=self._clock.wall_ms())
            await self._store.touch_upload(upload_id, self._clock.wall_ms())
            if stored < upload.size:
                return stored, None
            return stored, await self._seal(upload)

    async def download(self, user: str, sha256: str, range_header: str | None) -> Download:
        blob = await self._readable(user, sha256)
        span = core.parse_range(range_header, blob.size)
        start, end = span if span is not None else (0, blob.size)
        chunks = self._blobs.read(sha256, start, end)
        try:
            first = await anext(chunks)  # a missing file fails here, before any header is sent
        except BlobMissing:
            raise MediaError("gone", "the blob is no longer stored") from None
        except StopAsyncIteration:
            first = b""
        return Download(blob, start, end, span is not None, self._count_out(first, chunks))

    async def fetched(self, user: str, device: str, sha256: str) -> None:
        """The device has the blob (and checked its digest): it is no longer waited for."""
        try:
            blob = await self._readable(user, sha256)
        except MediaError as exc:
            if exc.code == "gone":
                return  # said again after the deletion: nothing to do
            raise
        done = await self._store.fetched(blob.sha256, f"{user}.{device}")
        if done is not None:
            await self._deleted([done])

    def remove_device(self, user: str, device: str) -> None:
        """``devices.remove``: the device leaves every waiting set (soon: the sweep does it)."""
        self._removed.append(f"{user}.{device}")
        self._wake.set()

    # --- inside ------------------------------------------------------------------------------

    async def _begin(self, upload: Upload) -> Upload:
        """Admit the new upload against its user's limits, charge it and record it; if its id is
        recorded already (an ``Idempotency-Key`` repeated), that upload instead, charging nothing."""
        # From here to the first await: checked and recorded at once, so concurrent POSTs see each other.
        if (same := self._uploads.get(upload.id)) is not None:
            return same
        cost = self._usage.admit(upload.user, upload.size, self._clock.monotonic())
        self._uploads[upload.id] = upload
        try:
            await self._store.add_upload(upload)
        except BaseException:
            if self._uploads.pop(upload.id, None) is not None:
                self._usage.end_upload(upload.user, cost, keep_charge=False)
            raise
        return upload

    async def _in_progress(self, user: str, device: str, upload_id: str) -> Upload | None:
        """The caller's upload if it is in progress."""
        upload = self._uploads.get(upload_id)
        return upload if upload is not None and (upload.user, upload.device) == (user, device) else None

    async def _sealed(self, user: str, device: str, upload_id: str) -> tuple[Upload, str]:
        """The caller's sealed upload and its blob, else ``not_found``."""
        found = await self._store.sealed(upload_id) if len(upload_id) <= 64 else None
        if found is None or (found[0].user, found[0].device) != (user, device):
            raise MediaError("not_found", "no such upload of this device (it may have expired or been deleted)")
        return found

    @contextlib.asynccontextmanager
    async def _locked(self, upload: Upload, busy: str | None = None) -> AsyncIterator[None]:
        """Hold the upload's lock; waiting too long raises ``offset_mismatch`` (a PATCH learns where to
        go on), or ``busy`` with that detail."""
        lock = self._locks.setdefault(upload.id, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), LOCK_WAIT_S)
        except TimeoutError:
            if busy is not None:
                raise MediaError("busy", busy, retry_after_s=math.ceil(LOCK_WAIT_S)) from None
            raise MediaError("offset_mismatch", "another PATCH of this upload is in progress",
                             offset=await self._blobs.staged_size(upload.id)) from None
        try:
            yield
        finally:
            lock.release()
            if not lock.locked() and upload.id not in self._uploads:
                self._locks.pop(upload.id, None)

    async def _count_in(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.counters.bytes_in += len(chunk)
            yield chunk

    async def _count_out(self, first: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            self.counters.bytes_out += len(first)
            yield first
            async for chunk in chunks:
                self.counters.bytes_out += len(chunk)
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]  # an async generator (BlobStore.read)

    async def _seal(self, upload: Upload) -> str:
        """Two steps that no transaction spans: the staging becomes the blob's bytes, then the store
        records the blob. The digest is written on the upload first, so that a death between the two
        leaves a record naming the bytes: dropping the upload deletes them (``_drop``)."""
        sha256 = await self._blobs.digest(upload.id)
        if upload.sealing not in (None, sha256):  # a seal cut off before, of other bytes: those are not kept
            await self._unsealed(upload.sealing)
        await self._store.sealing(upload.id, sha256)
        upload = self._began_sealing(upload, sha256)
        if is_group_id(upload.to):
            users = [m for m in await self._members(upload.to) if m != upload.user]
        else:
            users = [upload.to] if upload.to != upload.user else []
        to_users = {u: await self._users.user_devices(u) or [] for u in users}
        own = await self._users.user_devices(upload.user) or []
        async with self._contents.hold(sha256):
            if (moved := await self._blobs.seal(upload.id)) != sha256:
                # The staging changed since it was hashed (not while this holds the upload's lock): the
                # record names what was moved, so the drop or the next seal of this upload deletes it.
                await self._store.sealing(upload.id, moved)
                self._began_sealing(upload, moved)
                raise StoreError(f"upload {upload.id} changed while it was sealed: send it again")
            sealed = core.seal(upload, sha256, to_users, own, self._clock.wall_ms(), self.limits)
            new = await self._store.seal(upload.id, sealed)
        self._uploads.pop(upload.id, None)
        self._usage.end_upload(upload.user, sealed.blob.charge, keep_charge=new)
        if new:
            self.counters.stored_bytes += upload.size
            self.counters.blobs += 1
        log.info("media: upload %s of %s sealed as %s (%d bytes, %d devices waiting)", upload.id, upload.user,
                 sha256, upload.size, len(sealed.waiting))
        return sha256

    def _began_sealing(self, upload: Upload, sha256: str) -> Upload:
        """The upload as it is now recorded: its seal moves the bytes under ``sha256``."""
        upload = replace(upload, sealing=sha256)
        if upload.id in self._uploads:  # one process: dropped later from here
            self._uploads[upload.id] = upload
        return upload

    async def _delete_unless_live(self, sha256: str) -> bool:
        """The bytes of ``sha256`` go unless a live blob is made of them, checked under the lock a seal holds
        while it moves and records them: a blob marked deleted (or forgotten) as a seal of the same bytes
        kept the one copy there was and recorded a live blob keeps them. True if they went."""
        async with self._contents.hold(sha256):
            if not core.orphaned(await self._store.blob(sha256)):
                return False
            await self._blobs.delete(sha256)
            return True

    async def _unsealed(self, sha256: str) -> None:
        """A seal began moving bytes under ``sha256`` for an upload that goes without its seal recorded
        (the process died between, or the upload was sent again as other bytes): the bytes go, unless a
        live blob is made of them (the same bytes sealed by another upload). In cluster mode another
        node sealing the same bytes at this moment is not seen (docs/ARCHITECTURE.md)."""
        if await self._delete_unless_live(sha256):
            log.info("media: blob %s deleted: a seal of it was cut off, and no blob record names it", sha256)

    async def _readable(self, user: str, sha256: str) -> Blob:
        try:
            check_blob_id(sha256)
        except ValueError:
            raise MediaError("not_found", "no such blob") from None
        blob = await self._store.blob(sha256)
        return core.readable(blob, blob is not None and await self._store.is_reader(sha256, user))

    async def _deleted(self, blobs: list[Blob]) -> None:
        """The blobs were marked deleted in the store: their files go, their charges are freed."""
        for blob in blobs:
            await self._delete_unless_live(blob.sha256)
            self._usage.free(blob.owner, blob.charge)
            self.counters.stored_bytes -= blob.size
            self.counters.blobs -= 1

    async def _drop(self, upload: Upload) -> None:
        """An upload in progress goes (abandoned or deleted), its charge freed, and the bytes a seal
        of it cut off left (``Upload.sealing``)."""
        await self._drop_stored(upload.id, upload.sealing)
        if self._uploads.pop(upload.id, None) is not None:
            self._usage.end_upload(upload.user, core.charge(upload.size, self.limits), keep_charge=False)

    async def _drop_stored(self, upload_id: str, sealing: str | None) -> None:
        """The upload's staging, the bytes a seal of it cut off left, then its row, in that order."""
        await self._blobs.discard(upload_id)  # first: a crash leaves a row whose staging is gone, dropped later
        if sealing is not None:  # before the row, which names the bytes until they are checked
            await self._unsealed(sealing)
        await self._store.drop_upload(upload_id)

    async def _sweep_round(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self._sweep_s)
        self._wake.clear()
        removed, self._removed = self._removed, []
        if removed:
            try:
                await self._deleted(await self._store.remove_devices(removed))
            except BaseException:
                self._removed.extend(removed)  # tried again next round
                raise
        now = self._clock.wall_ms()
        await self._abandon(now)
        await self._deleted(await self._store.expire(now))
        for upload_id in await self._store.sealed_uploads(now - self.limits.upload_ttl_ms):
            await self._store.drop_upload(upload_id)
        for sha256 in await self._store.forget(now - self.limits.ttl_ms):
            await self._delete_unless_live(sha256)  # again: a crash may have come between the mark and the delete

    async def _abandon(self, now: int) -> None:
        """Rule 7: drop the uploads idle too long."""
        busy = {upload for upload, lock in self._locks.items() if lock.locked()}
        for upload in core.abandoned(list(self._uploads.values()), busy, now, self.limits):
            lock = self._locks.get(upload.id)
            if self._uploads.get(upload.id) != upload or (lock is not None and lock.locked()):
                continue  # a PATCH came meanwhile
            await self._drop(upload)
            self._locks.pop(upload.id, None)  # not held: ``busy`` left it out
            log.info("media: upload %s of %s abandoned after %d s idle", upload.id, upload.user,
                     self.limits.upload_ttl_ms // 1000)
