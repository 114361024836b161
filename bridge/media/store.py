"""What the media service keeps about uploads and blobs (the bytes are in a ``BlobStore``).
``storage/sqlite/media.py`` implements it. A failing backend raises ``bridge.store.StoreError``.

Each operation is one transaction, so a crash leaves each record before or after it: an upload
row is written before its first byte is accepted, the digest its seal moves the bytes under is
written on it before they move (``sealing``), and a seal moves the upload to its blob (with
readers and waiting devices) at once.
"""

from __future__ import annotations

from typing import Protocol

from bridge.media.core import Blob, Sealed, Upload


class MediaStore(Protocol):
    async def add_upload(self, upload: Upload) -> None: ...

    async def touch_upload(self, upload: str, now_ms: int) -> None:
        """A PATCH wrote to it: it is not idle."""

    async def drop_upload(self, upload: str) -> None:
        """Forget the upload (abandoned, or its sealed answer kept long enough)."""

    async def sealing(self, upload: str, sha256: str) -> None:
        """The upload in progress is about to be sealed as the blob ``sha256``: recorded (``Upload.sealing``,
        also by ``load``) before the bytes move, so that a death before ``seal`` leaves a record naming
        them, and dropping the upload deletes them."""

    async def seal(self, upload: str, sealed: Sealed) -> bool:
        """The upload now names its blob; store the blob, its readers and waiting devices. If the
        blob is stored and live already (the same bytes), its readers and waiting devices grow and
        False is returned (the upload's charge is not kept); else True. ``Blob.charge`` is stored
        as given (the core computes it) and returned with the blob."""

    async def sealed(self, upload: str) -> tuple[Upload, str] | None:
        """A sealed upload and the blob it became (None: not sealed, or no such upload)."""

    async def sealed_uploads(self, before_ms: int) -> list[str]:
        """Sealed uploads whose answer was last given before ``before_ms`` (to forget)."""

    async def blob(self, sha256: str) -> Blob | None:
        """The blob's record (a deleted one too, until forgotten); None if unknown."""

    async def is_reader(self, sha256: str, user: str) -> bool: ...

    async def fetched(self, sha256: str, client_id: str) -> Blob | None:
        """The device has the blob: it leaves the waiting set. If that emptied the set, the blob is
        marked deleted in the same transaction and returned."""

    async def remove_devices(self, client_ids: list[str]) -> list[Blob]:
        """The devices leave every waiting set; the live blobs whose set became empty are marked
        deleted and returned."""

    async def expire(self, now_ms: int) -> list[Blob]:
        """Mark deleted and return the live blobs whose time is up."""

    async def forget(self, before_ms: int) -> list[str]:
        """Drop the records of blobs deleted whose expiry is before ``before_ms``; their ids."""

    async def load(self) -> tuple[list[Upload], dict[str, int], int, int]:
        """At start: the uploads in progress, each owner's summed ``Blob.charge`` of live blobs, the
        live blobs' count and their summed ``size``."""

    async def waiting_devices(self) -> set[str]:
        """Every device some live blob waits for (at start, to drop removed devices)."""

    async def close(self) -> None: ...
