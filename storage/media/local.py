"""``BlobStore`` in a folder of the data directory: the embedded default.

Layout under ``root`` (0700 folders, 0600 files, whatever the umask)::

    staging/<upload>                 an upload in progress, written in place at its offset
    blobs/<h[0:2]>/<h[2:4]>/<h>      a sealed blob, named by the SHA-256 ``h`` of its bytes

The SHA-256 of an upload is computed as its bytes are written (in memory, per upload in progress),
so the seal does not read the file again; after a restart (the digest is lost) or a write that
failed, ``digest`` (or the seal) hashes the file, once: ``digest`` keeps what it computed for the seal.

Durability: ``append`` fsyncs the staging file before it returns, also when its chunks fail
midway (the bytes already written are kept: a resumed upload continues after them). ``seal``
hashes the staging, fsyncs it, renames it into its fan-out folder (atomic on one filesystem)
and fsyncs that folder, so a crash leaves either the staging or the whole blob.

File work that may wait on the disk (fsync, hashing, reads) runs in the default executor so
the event loop keeps serving; writes of one received chunk go straight to the page cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bridge.media.blobs import BlobMissing, check_blob_id, check_upload_id
from bridge.store import StoreError
from storage.sqlite.db import DIR_MODE, FILE_MODE, ensure_private_dir

READ_CHUNK = 256 * 1024  # bytes per read: bounds a download's memory, large enough for speed


class LocalBlobStore:
    """Staging and blobs under ``root`` (created 0700 if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging = root / "staging"
        self._blobs = root / "blobs"
        for folder in (root, self._staging, self._blobs):
            ensure_private_dir(folder)
        self._digests: dict[str, tuple[int, Any]] = {}  # upload -> (bytes hashed from 0, their SHA-256 so far)

    def _staged(self, upload: str) -> Path:
        return self._staging / check_upload_id(upload)

    def blob_path(self, blob: str) -> Path:
        """Where the blob ``blob`` is (or would be) stored."""
        check_blob_id(blob)
        return self._blobs / blob[:2] / blob[2:4] / blob

    async def append(self, upload: str, offset: int, chunks: AsyncIterator[bytes]) -> int:
        fd = self._open_at(upload, offset)
        # The digest follows the writes from offset 0, so that the seal need not read the file again.
        hashed = self._digests.pop(upload, None)
        digest = hashed[1] if hashed is not None and hashed[0] == offset else hashlib.sha256() if offset == 0 else None
        written = offset
        try:
            async for chunk in chunks:  # its errors (a cut) pass through unchanged
                try:
                    written += _write_all(fd, chunk, upload)
                except StoreError:
                    digest = None  # part of the chunk may be written: the seal reads the file
                    raise
                if digest is not None:
                    digest.update(chunk)
        finally:
            try:  # also on a cut: what reached the file is kept and made durable
                await asyncio.to_thread(os.fsync, fd)
            except OSError as exc:
                raise StoreError(f"cannot sync the staging of upload {upload}: {exc}") from exc
            finally:
                os.close(fd)
                if digest is not None:
                    self._digests[upload] = (written, digest)
        return written

    def _open_at(self, upload: str, offset: int) -> int:
        """The staging's descriptor, positioned at ``offset`` with anything after it dropped."""
        path = self._staged(upload)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise StoreError(f"cannot open the staging of upload {upload}: {exc}") from exc
        try:
            size = os.fstat(fd).st_size
            if offset > size:
                raise ValueError(f"offset {offset} is past the {size} bytes staged for upload {upload}")
            if offset < size:
                os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError):
                raise StoreError(f"cannot open the staging of upload {upload}: {exc}") from exc
            raise
        return fd

    async def staged_size(self, upload: str) -> int:
        try:
            return self._staged(upload).stat().st_size
        except FileNotFoundError:
            return 0

    async def digest(self, upload: str) -> str:
        src = self._staged(upload)
        try:
            hashed = await asyncio.to_thread(_hash, src, self._digests.get(upload))
        except OSError as exc:
            raise StoreError(f"cannot hash upload {upload}: {exc}") from exc
        self._digests[upload] = hashed  # the seal that follows uses it
        return str(hashed[1].hexdigest())

    async def seal(self, upload: str) -> str:
        src = self._staged(upload)
        hashed = self._digests.pop(upload, None)
        try:
            return await asyncio.to_thread(self._seal, src, hashed)
        except OSError as exc:
            raise StoreError(f"cannot seal upload {upload}: {exc}") from exc

    def _seal(self, src: Path, hashed: tuple[int, Any] | None) -> str:
        blob = str(_hash(src, hashed)[1].hexdigest())
        with open(src, "rb", buffering=0) as f:
            os.fsync(f.fileno())
        dest = self.blob_path(blob)
        for folder in (dest.parent.parent, dest.parent):
            if not folder.is_dir():
                with contextlib.suppress(FileExistsError):
                    folder.mkdir(mode=DIR_MODE)
        if dest.exists():  # the same bytes were sealed before: keep one copy
            src.unlink()
        else:
            os.replace(src, dest)
        _fsync_dir(dest.parent)
        _fsync_dir(self._staging)
        return blob

    async def discard(self, upload: str) -> None:
        self._digests.pop(upload, None)
        with contextlib.suppress(FileNotFoundError):
            self._staged(upload).unlink()

    async def read(self, blob: str, start: int, end: int) -> AsyncIterator[bytes]:
        path = self.blob_path(blob)
        try:
            f = await asyncio.to_thread(open, path, "rb", buffering=0)
        except FileNotFoundError as exc:
            raise BlobMissing(f"blob {blob} is not stored") from exc
        except OSError as exc:
            raise StoreError(f"cannot open blob {blob}: {exc}") from exc
        try:
            f.seek(start)
            pos = start
            while pos < end:
                data = await asyncio.to_thread(f.read, min(READ_CHUNK, end - pos))
                if not data:
                    return
                pos += len(data)
                yield data
        finally:
            f.close()

    async def delete(self, blob: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(blob).unlink()

    async def close(self) -> None:
        """Nothing is held open between calls."""


def _hash(src: Path, hashed: tuple[int, Any] | None) -> tuple[int, Any]:
    """``(size, SHA-256)`` of the staging ``src``: ``hashed`` if it covers the whole file, else the
    file read again (the digest was lost in a restart, or broken off by a failed write)."""
    with open(src, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if hashed is not None and hashed[0] == size:
            return hashed
        digest = hashlib.sha256()
        buf = bytearray(READ_CHUNK)
        while n := f.readinto(buf):
            digest.update(memoryview(buf)[:n])
        return size, digest


def _write_all(fd: int, chunk: bytes, upload: str) -> int:
    view = memoryview(chunk)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise StoreError(f"cannot write the staging of upload {upload}: {exc}") from exc
    return len(chunk)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
