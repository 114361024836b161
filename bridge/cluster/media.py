"""The media service of a cluster node (docs/MEDIA.md, "Cluster mode"): ``MediaService`` whose
uploads in progress and per-user usage live in the shared store instead of one process's memory, so
that any node serves any request -- an upload begun on node A is resumed on node B, a blob sealed on
A is fetched (and then deleted) through B. The bytes must be where every node reads them: S3, with
uploads staged in the bucket (storage/media/s3_staging.py).

What changes against one process:
- an upload starts in one store script that checks the user's uploads in progress, quota and creation
  rate and charges them (``SharedMediaStore.admit``), whichever node the user's uploads went to; an
  ``Idempotency-Key`` names an id on the user's shard, so a repeat on any node finds the upload;
- a DELETE drops the record (its charge freed in the store) after discarding the staging in S3;
- each request reads its upload from the store (and touches it), so a seal or an abandonment on
  another node is seen at once; the lock per upload stays per node (a second node writing the same
  offsets at once is harmless: the staging keeps what each acknowledged, see s3_staging.py);
- every node sweeps: idle uploads end in one script per shard (a second node finds nothing), their
  stagings are discarded (and the blob object a seal cut off left, as ``MediaService._drop`` does),
  and the figures of the metrics are the cluster's, read each round;
- the lock per content that keeps a seal and such a deletion of the same bytes apart is per node: a
  seal of the very same ciphertext on another node at that moment may lose its object (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import Protocol

from bridge.media import core
from bridge.media.core import MediaLimits, Upload, Usage
from bridge.media.service import MediaService
from bridge.media.store import MediaStore
from chatproto import client_id


class SharedMediaStore(MediaStore, Protocol):
    """What a store shared by the nodes adds (storage/redis/media.py); its ``seal``, ``fetched``,
    ``remove_devices`` and ``expire`` keep the owners' charges themselves."""

    async def admit(self, upload: Upload, cost: int, limits: MediaLimits | None) -> Upload | tuple[str, int]:
        """Record the upload charged ``cost`` unless a limit of ``limits`` refuses it: then ``(limit,
        bytes in use)`` (``core.refusal``'s names). An id recorded already answers its upload instead."""

    async def upload(self, upload: str, client_id: str, now_ms: int) -> Upload | None:
        """The upload in progress of the device ``client_id`` (``{user}.{device}``), now touched; None if
        there is none (another device's upload is not touched)."""

    async def abandon(self, before_ms: int) -> list[tuple[str, str | None]]:
        """End the uploads in progress idle since ``before_ms`` (charges freed); the ids whose staging
        is still to discard (``drop_upload`` each once done), each with its ``Upload.sealing``."""

    async def stats(self) -> tuple[int, int, int]:
        """Bytes and count of the live blobs, uploads in progress: the whole cluster's."""


class ClusterMediaService(MediaService):
    _store: SharedMediaStore
    _uploads_now = 0  # the cluster's uploads in progress, as of the last sweep

    async def start(self, devices: set[str]) -> None:
        """Nothing to load (the store is the truth); ``devices`` is not used: a device removed while no
        node ran is not known, and its blobs wait until their ttl (docs/MEDIA.md)."""
        await self._refresh()
        self._loops = [self._supervisor.spawn("media_sweep", self._sweep_round)]

    @property
    def uploads_in_progress(self) -> int:
        return self._uploads_now

    async def _refresh(self) -> None:
        self.counters.stored_bytes, self.counters.blobs, self._uploads_now = await self._store.stats()

    async def _begin(self, upload: Upload) -> Upload:
        cost = core.charge(upload.size, self.limits)
        found = await self._store.admit(upload, cost, self.limits)
        if isinstance(found, Upload):
            return found
        limit, used = found
        raise core.refusal(limit, cost, used, self.limits)

    async def _in_progress(self, user: str, device: str, upload_id: str) -> Upload | None:
        return await self._store.upload(upload_id, client_id(user, device), self._clock.wall_ms())

    async def _abandon(self, now: int) -> None:
        for upload_id, sealing in await self._store.abandon(now - self.limits.upload_ttl_ms):
            await self._drop_stored(upload_id, sealing)
        # The uploads this node met are read from the store again by the next request: forget them, and
        # the one-process usage the base class keeps on seals (unused here: the store holds the usage).
        self._usage = Usage(self.limits)
        for upload_id in list(self._uploads):
            lock = self._locks.get(upload_id)
            if lock is None or not lock.locked():
                del self._uploads[upload_id]
                self._locks.pop(upload_id, None)
        await self._refresh()
