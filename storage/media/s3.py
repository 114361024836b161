"""``BlobStore`` on S3-compatible object storage (AWS S3, MinIO, Ceph RGW, ...) with aiobotocore.

Uploads in progress are staged in a local folder by a ``LocalBlobStore`` (composition: its
fsynced appends, offsets and cuts are the local store's) -- or, ``shared`` (cluster mode), in the
bucket by ``S3Staging`` (storage/media/s3_staging.py), whose seal streams the staged segments into
the blob's object. Locally staged, sealing is the local store's too:
it hashes the staging and moves it under its SHA-256. The sealed file is then put as the object
``<prefix>blobs/<sha256>`` (multipart, one ``PART_BYTES`` part in memory at a time; a single put
below that) and the local copy removed. A crash between the two leaves the local copy, which
``read`` serves and the next ``seal`` of the same bytes (or ``delete``) clears.

Reads are ranged GetObjects streamed in ``READ_CHUNK`` pieces (``s3_staging.s3_read``); ``delete`` is DeleteObject.
Every botocore error is mapped to ``StoreError`` (``BlobMissing`` for a missing object) at the
boundary, with the original as ``__cause__``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from bridge.media.blobs import BlobMissing, check_blob_id
from bridge.store import StoreError
from storage.media.local import READ_CHUNK, LocalBlobStore
from storage.media.s3_staging import S3Staging, Segment, chain, copyable, s3_call, s3_read

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

PART_BYTES: Final = 8 * 1024 * 1024
"""Multipart part size (S3's minimum is 5 MiB, except for the last part); the memory one seal holds."""
DEFAULT_REGION: Final = "us-east-1"


@dataclass(frozen=True, slots=True)
class S3Settings:
    """Where the blobs go: the keys of the config's ``media.s3`` section (docs/MEDIA.md).

    ``access_key_id`` with ``secret_access_key_file`` (a file holding the secret key only,
    readable by its owner alone: 0600); both None: botocore's own chain (``AWS_ACCESS_KEY_ID``/
    ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance role)."""

    bucket: str
    endpoint_url: str | None = None
    """Instead of AWS (MinIO, Ceph, a local test server)."""
    region: str | None = None
    """None: ``us-east-1``."""
    prefix: str = ""
    """Put before every key (``chat/`` keeps the blobs of one deployment apart in a shared bucket)."""
    access_key_id: str | None = None
    secret_access_key_file: str | None = None
    verify: bool | str = True
    """TLS verification: true (the system's CAs), false, or a CA bundle's path."""
    addressing_style: Literal["auto", "virtual", "path"] = "auto"
    """``path`` for servers reached by a host name without virtual-host buckets (most MinIO set-ups)."""
    timeout_s: float = 30.0


def read_secret(path: str | os.PathLike[str]) -> str:
    """The secret in ``path`` (surrounding white space dropped); refuses a file that group or
    others may read, or an empty one, naming the fix."""
    file = Path(path)
    try:
        mode = stat.S_IMODE(file.stat().st_mode)
        secret = file.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"S3 secret key file {file}: cannot read: {exc}") from exc
    if mode & 0o077:
        raise ValueError(f"S3 secret key file {file} has mode {mode:o}: run chmod 600 {file} "
                         "(it holds a secret; group and others must not read it)")
    if not secret:
        raise ValueError(f"S3 secret key file {file} is empty")
    return secret


async def open_store(settings: Mapping[str, Any], staging: LocalBlobStore, shared: bool = False) -> S3BlobStore:
    """The S3 store for the config's ``media.s3`` section (chatserver's wiring calls this), its
    uploads staged in S3 when ``shared`` (cluster mode); raises ``ValueError`` naming what to fix
    when the settings, the secret file, the endpoint or the bucket cannot be used."""
    try:
        return await S3BlobStore.open(staging, S3Settings(**settings), shared)
    except (TypeError, StoreError) as exc:
        raise ValueError(str(exc)) from exc


class S3BlobStore:
    """Blobs in ``settings.bucket``; uploads staged by ``staging``. Make it with ``open()``."""

    def __init__(self, staging: LocalBlobStore, client: S3Client, settings: S3Settings,
                 close: Callable[[], Awaitable[Any]], shared: bool = False) -> None:
        self._local = staging
        self._s3 = client
        self._bucket = settings.bucket
        self._prefix = settings.prefix
        self._close = close
        self._shared = S3Staging(client, settings.bucket, settings.prefix) if shared else None

    @classmethod
    async def open(cls, staging: LocalBlobStore, settings: S3Settings, shared: bool = False) -> S3BlobStore:
        """Connect (lazily: the first request opens the HTTP connection) and check the bucket exists;
        ``shared``: stage uploads in the bucket (storage/media/s3_staging.py), not in ``staging``."""
        if (settings.access_key_id is None) != (settings.secret_access_key_file is None):
            raise ValueError("S3: access_key_id and secret_access_key_file go together")
        secret = None if settings.secret_access_key_file is None else read_secret(settings.secret_access_key_file)
        config = AioConfig(connect_timeout=settings.timeout_s, read_timeout=settings.timeout_s,
                           retries={"max_attempts": 3, "mode": "standard"},
                           s3={"addressing_style": settings.addressing_style})
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(get_session().create_client(
            "s3", region_name=settings.region or DEFAULT_REGION, endpoint_url=settings.endpoint_url,
            verify=settings.verify, aws_access_key_id=settings.access_key_id, aws_secret_access_key=secret,
            config=config))
        store = cls(staging, client, settings, stack.aclose, shared)
        try:
            await s3_call(f"bucket {settings.bucket}", client.head_bucket(Bucket=settings.bucket))
        except BlobMissing as exc:
            await stack.aclose()
            raise StoreError(f"S3: bucket {settings.bucket} does not exist at {settings.endpoint_url or 'AWS'}: "
                             "create it (the server does not)") from exc
        except BaseException:
            await stack.aclose()
            raise
        return store

    def _key(self, blob: str) -> str:
        return f"{self._prefix}blobs/{check_blob_id(blob)}"

    # --- staging: the local store's, or in S3 (shared) ----------------------------------

    async def append(self, upload: str, offset: int, chunks: AsyncIterator[bytes]) -> int:
        if self._shared is not None:
            return await self._shared.append(upload, offset, chunks)
        return await self._local.append(upload, offset, chunks)

    async def staged_size(self, upload: str) -> int:
        if self._shared is not None:
            return await self._shared.staged_size(upload)
        return await self._local.staged_size(upload)

    async def discard(self, upload: str) -> None:
        if self._shared is not None:
            await self._shared.discard(upload)
        await self._local.discard(upload)

    # --- blobs -------------------------------------------------------------------------

    async def digest(self, upload: str) -> str:
        if self._shared is not None:
            return await self._shared.digest(upload)
        return await self._local.digest(upload)

    async def seal(self, upload: str) -> str:
        if self._shared is not None:  # hashed (in memory, or read again), then copied into its object
            blob = await self._shared.digest(upload)
            if not await self._exists(blob):
                pieces = chain(await self._shared.segments(upload))
                if copyable(pieces):  # inside S3: no byte passes through this node
                    await self._multipart(blob, lambda upload_id: self._copy_parts(blob, upload_id, pieces))
                else:
                    await self._put(blob, self._shared.staged(upload))
            await self._shared.discard(upload)
            return blob
        blob = await self._local.seal(upload)  # hashed, fsynced, moved under its digest
        if not await self._exists(blob):
            await self._put(blob, _file_pieces(self._local.blob_path(blob)))
        await self._local.delete(blob)
        return blob

    async def _exists(self, blob: str) -> bool:
        try:
            await s3_call(f"blob {blob}", self._s3.head_object(Bucket=self._bucket, Key=self._key(blob)))
        except BlobMissing:
            return False
        return True

    async def _put(self, blob: str, pieces: AsyncIterator[bytes]) -> None:
        """``pieces`` become the blob's object: one put up to ``PART_BYTES``, else a multipart upload
        (one part in memory at a time)."""
        first = await _gather(pieces, PART_BYTES)
        if len(first) < PART_BYTES:
            await s3_call(f"put blob {blob}", self._s3.put_object(Bucket=self._bucket, Key=self._key(blob), Body=first))
            return
        await self._multipart(blob, lambda upload_id: self._upload_parts(blob, upload_id, first, pieces))

    async def _multipart(self, blob: str, send: Callable[[str], AsyncIterator[CompletedPartTypeDef]]) -> None:
        """A multipart upload of the blob's object whose parts ``send(upload id)`` sends, in order."""
        key, what = self._key(blob), f"put blob {blob}"
        started = await s3_call(what, self._s3.create_multipart_upload(Bucket=self._bucket, Key=key))
        upload_id = started["UploadId"]
        try:
            parts = [part async for part in send(upload_id)]
            await s3_call(what, self._s3.complete_multipart_upload(
                Bucket=self._bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}))
        except BaseException:
            with contextlib.suppress(StoreError):  # else the parts stay billed until a lifecycle rule
                await s3_call(what, self._s3.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id))
            raise

    async def _upload_parts(self, blob: str, upload_id: str, first: bytes,
                            pieces: AsyncIterator[bytes]) -> AsyncIterator[CompletedPartTypeDef]:
        data, number = first, 1
        while data:
            part = await s3_call(f"put blob {blob}", self._s3.upload_part(
                Bucket=self._bucket, Key=self._key(blob), UploadId=upload_id, PartNumber=number, Body=data))
            yield {"ETag": part["ETag"], "PartNumber": number}
            data, number = await _gather(pieces, PART_BYTES), number + 1

    async def _copy_parts(self, blob: str, upload_id: str,
                          pieces: list[tuple[Segment, int, int]]) -> AsyncIterator[CompletedPartTypeDef]:
        for number, (segment, start, end) in enumerate(pieces, 1):
            part = await s3_call(f"put blob {blob}", self._s3.upload_part_copy(
                Bucket=self._bucket, Key=self._key(blob), UploadId=upload_id, PartNumber=number,
                CopySource={"Bucket": self._bucket, "Key": segment.key},
                CopySourceRange=f"bytes={start - segment.start}-{end - segment.start - 1}"))
            yield {"ETag": part["CopyPartResult"]["ETag"], "PartNumber": number}

    async def read(self, blob: str, start: int, end: int) -> AsyncIterator[bytes]:
        if self._local.blob_path(blob).exists():  # sealed, not yet put (a crash between the two)
            async for piece in self._local.read(blob, start, end):
                yield piece
            return
        if start >= end:
            await s3_call(f"blob {blob}", self._s3.head_object(Bucket=self._bucket, Key=self._key(blob)))
            return
        async for piece in s3_read(self._s3, self._bucket, self._key(blob), start, end, f"blob {blob}"):
            yield piece

    async def delete(self, blob: str) -> None:
        await self._local.delete(blob)
        await s3_call(f"delete blob {blob}", self._s3.delete_object(Bucket=self._bucket, Key=self._key(blob)))

    async def close(self) -> None:
        await self._close()
        await self._local.close()


async def _gather(pieces: AsyncIterator[bytes], size: int) -> bytes:
    """The next ``size`` bytes of ``pieces`` (fewer at their end)."""
    data = bytearray()
    while len(data) < size:
        try:
            data += await anext(pieces)
        except StopAsyncIteration:
            break
    return bytes(data)


async def _file_pieces(path: Path) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb")
    with f:
        while data := await asyncio.to_thread(f.read, READ_CHUNK):
            yield data
