"""Uploads in progress staged in S3 itself (cluster mode): any node can resume an upload another
node began, because no byte of it sits on a node's disk.

Each write is kept as segment objects ``<prefix>staging/<upload>/<start>-<end>`` (16 hex digits
each; at most ``SEGMENT_BYTES`` per object, held in memory while it is put). The staged bytes are
the chain from offset 0: at each offset the segment reaching furthest supplies the bytes
(``chain``), so two nodes writing the same offsets at once (a client that gave up on one node and
resumed on another while the first still wrote) both keep what they acknowledged: a resumed upload
sends the same ciphertext again. A write at an offset below the staged size first drops what lies
past it (segments after it go; one that spans it is cut by a copy of its head).

A PutObject returns once S3 stored the object durably: that is the fsync of the local staging. A body
cut midway keeps what arrived (put as a last segment). The digest is followed in memory while one node
receives an upload from offset 0; otherwise the seal reads the chain once more to hash it. The blob's
object is then assembled inside S3 by a multipart copy of the segments when they are large enough
(``copyable``: what full PATCHes of ``media.chunk_max_bytes`` >= 5 MiB write), else streamed through
the node (s3.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from bridge.media.blobs import BlobMissing, check_upload_id
from bridge.store import StoreError
from storage.media.local import READ_CHUNK

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

SEGMENT_BYTES: Final = 8 * 1024 * 1024
MIN_PART_BYTES: Final = 5 * 1024 * 1024  # S3's smallest part of a multipart upload but the last
MAX_PARTS: Final = 10_000
MISSING: Final = frozenset({"NoSuchKey", "404", "NotFound"})
T = TypeVar("T")


async def s3_call(what: str, request: Awaitable[T]) -> T:
    """``request``, its botocore errors mapped to ``StoreError`` (``BlobMissing`` for a missing key)."""
    try:
        return await request
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in MISSING:
            raise BlobMissing(f"{what} is not stored") from exc
        raise StoreError(f"S3: {what}: {code or exc}") from exc
    except BotoCoreError as exc:  # unreachable endpoint, timeouts, bad credentials file
        raise StoreError(f"S3: {what}: {exc}") from exc


async def s3_read(client: S3Client, bucket: str, key: str, start: int, end: int, what: str) -> AsyncIterator[bytes]:
    """Bytes ``[start, end)`` (``end > start``) of the object ``key``, streamed in ``READ_CHUNK`` pieces."""
    answer = await s3_call(what, client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}"))
    async with answer["Body"] as body:
        while True:
            try:
                piece = await body.read(READ_CHUNK)
            except (TimeoutError, BotoCoreError, OSError, aiohttp.ClientError) as exc:
                raise StoreError(f"S3: reading {what}: {exc}") from exc
            if not piece:
                return
            yield piece


@dataclass(frozen=True, slots=True)
class Segment:
    start: int
    end: int
    key: str


def chain(segments: list[Segment]) -> list[tuple[Segment, int, int]]:
    """The staged bytes as ``(segment, from, to)`` pieces (offsets in the upload) from 0 on, each taken
    from the segment that reaches furthest at ``from``; stops at the first gap."""
    pieces: list[tuple[Segment, int, int]] = []
    pos = 0
    while True:
        covering = [s for s in segments if s.start <= pos < s.end]
        if not covering:
            return pieces
        best = max(covering, key=lambda s: s.end)
        pieces.append((best, pos, best.end))
        pos = best.end


def copyable(pieces: list[tuple[Segment, int, int]]) -> bool:
    """Whether the pieces can be the parts of a multipart copy inside S3: every part but the last at
    least ``MIN_PART_BYTES`` (S3's rule), at most ``MAX_PARTS``. Writes of full 8 MiB PATCHes are."""
    return 0 < len(pieces) <= MAX_PARTS and all(end - start >= MIN_PART_BYTES for _, start, end in pieces[:-1])


class S3Staging:
    def __init__(self, client: S3Client, bucket: str, prefix: str) -> None:
        self._s3 = client
        self._bucket = bucket
        self._prefix = prefix
        self._digests: dict[str, tuple[int, Any]] = {}  # upload -> (bytes hashed from 0, their SHA-256 so far)

    def _folder(self, upload: str) -> str:
        return f"{self._prefix}staging/{check_upload_id(upload)}/"

    async def segments(self, upload: str) -> list[Segment]:
        folder, found, token = self._folder(upload), [], ""
        while True:
            listing = (self._s3.list_objects_v2(Bucket=self._bucket, Prefix=folder, ContinuationToken=token) if token
                       else self._s3.list_objects_v2(Bucket=self._bucket, Prefix=folder))
            page = await s3_call(f"staging of {upload}", listing)
            for item in page.get("Contents", []):
                start, _, end = item["Key"].removeprefix(folder).partition("-")
                found.append(Segment(int(start, 16), int(end, 16), item["Key"]))
            token = page.get("NextContinuationToken", "")
            if not token:
                return found

    async def staged_size(self, upload: str) -> int:
        pieces = chain(await self.segments(upload))
        return pieces[-1][2] if pieces else 0

    async def append(self, upload: str, offset: int, chunks: AsyncIterator[bytes]) -> int:
        segments = await self.segments(upload)
        pieces = chain(segments)
        size = pieces[-1][2] if pieces else 0
        if offset > size:
            raise ValueError(f"offset {offset} is past the {size} bytes staged for upload {upload}")
        if offset < size:
            await self._cut(upload, segments, offset)
        hashed = self._digests.pop(upload, None)
        digest = hashed[1] if hashed is not None and hashed[0] == offset else hashlib.sha256() if offset == 0 else None
        written, buffer = offset, bytearray()
        try:
            async for chunk in chunks:  # its errors (a cut) pass through unchanged, after the put below
                buffer += chunk
                while len(buffer) >= SEGMENT_BYTES:
                    written = await self._put(upload, written, bytes(buffer[:SEGMENT_BYTES]), digest)
                    del buffer[:SEGMENT_BYTES]
        finally:
            if buffer:
                written = await self._put(upload, written, bytes(buffer), digest)
            if digest is not None:
                self._digests[upload] = (written, digest)
        return written

    async def _put(self, upload: str, start: int, data: bytes, digest: Any) -> int:
        end = start + len(data)
        await s3_call(f"staging of {upload}", self._s3.put_object(
            Bucket=self._bucket, Key=f"{self._folder(upload)}{start:016x}-{end:016x}", Body=data))
        if digest is not None:
            digest.update(data)
        return end

    async def _cut(self, upload: str, segments: list[Segment], offset: int) -> None:
        """Drop the staged bytes past ``offset``."""
        for segment in segments:
            if segment.start < offset < segment.end:
                head = b"".join([p async for p in self._read(segment, 0, offset - segment.start)])
                await self._put(upload, segment.start, head, None)
            if segment.end > offset:
                await self._delete(segment.key)

    def _read(self, segment: Segment, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of the segment object (offsets within it)."""
        return s3_read(self._s3, self._bucket, segment.key, start, end, f"segment {segment.key}")

    async def staged(self, upload: str) -> AsyncIterator[bytes]:
        """Every staged byte, in order."""
        for segment, start, end in chain(await self.segments(upload)):
            async for piece in self._read(segment, start - segment.start, end - segment.start):
                yield piece

    async def digest(self, upload: str) -> str:
        """SHA-256 hex of the staged bytes: followed in memory, else read again (and then kept, so the
        seal that follows does not read them a third time; ``discard`` forgets it)."""
        size = await self.staged_size(upload)
        hashed = self._digests.get(upload)
        if hashed is None or hashed[0] != size:
            digest = hashlib.sha256()
            async for piece in self.staged(upload):
                digest.update(piece)
            hashed = self._digests[upload] = (size, digest)
        return str(hashed[1].hexdigest())

    async def discard(self, upload: str) -> None:
        self._digests.pop(upload, None)
        keys = [s.key for s in await self.segments(upload)]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes up to 1000 keys
            await s3_call(f"staging of {upload}", self._s3.delete_objects(
                Bucket=self._bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}))

    async def _delete(self, key: str) -> None:
        await s3_call(f"segment {key}", self._s3.delete_object(Bucket=self._bucket, Key=key))
