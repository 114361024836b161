"""Where media bytes live: a staging area for uploads in progress and sealed, content-addressed blobs.

``storage/media/local.py`` keeps them in a folder of the data directory (the embedded default),
``storage/media/s3.py`` in S3-compatible object storage (staging stays local). The media service
(``bridge/media/service.py``) owns every decision (offsets, sizes, who may read, when a blob goes);
a store only moves bytes, and checks names so that no id can reach outside its folder.

Names: an upload id is 1-64 characters of ``[A-Za-z0-9_-]``; a blob id is a SHA-256 in lowercase
hex. A store raises ``ValueError`` for any other name, ``BlobMissing`` for a blob it does not hold,
and ``bridge.store.StoreError`` when its backend fails (a full disk, an unreachable bucket).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Protocol

from bridge.store import StoreError

UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
BLOB_ID = re.compile(r"[0-9a-f]{64}")


class BlobMissing(StoreError):
    """The blob is not (or no longer) stored."""


def check_upload_id(upload: str) -> str:
    """``upload`` if it is a valid upload id, else ``ValueError``."""
    if not UPLOAD_ID.fullmatch(upload):
        raise ValueError(f"bad upload id {upload[:80]!r}")
    return upload


def check_blob_id(blob: str) -> str:
    """``blob`` if it is a lowercase SHA-256 hex digest, else ``ValueError``."""
    if not BLOB_ID.fullmatch(blob):
        raise ValueError(f"bad blob id {blob[:80]!r}")
    return blob


class BlobStore(Protocol):
    async def append(self, upload: str, offset: int, chunks: AsyncIterator[bytes]) -> int:
        """Write ``chunks`` at ``offset`` of the upload's staging (created if missing); durable
        (fsync) before returning the new staged size.

        ``offset`` must be at most the staged size (``ValueError`` otherwise); bytes past
        ``offset`` are dropped first, so a repeated write is harmless. If ``chunks`` raises
        midway, what was written is made durable and kept, then the error is re-raised.
        """

    async def staged_size(self, upload: str) -> int:
        """Bytes durably staged (0: none, or no such upload)."""

    async def digest(self, upload: str) -> str:
        """The SHA-256 hex of the complete staging: the name ``seal`` gives its blob next (kept, so that
        the seal does not hash the bytes again). The service records it before the seal moves them."""

    async def seal(self, upload: str) -> str:
        """The complete staging becomes a blob named by its SHA-256 hex, which is returned; the
        staging goes. Sealing content already stored as a blob keeps the one copy."""

    async def discard(self, upload: str) -> None:
        """Drop the upload's staging (nothing if there is none)."""

    def read(self, blob: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of the blob, in bounded chunks (never the whole blob in memory).
        Raises ``BlobMissing`` (on the first iteration) if the blob is not stored."""

    async def delete(self, blob: str) -> None:
        """Remove the blob (nothing if it is not stored)."""

    async def close(self) -> None: ...
