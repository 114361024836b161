"""The media metadata in the Redis Cluster (cluster mode): ``bridge.media.store.MediaStore``, and what
``bridge.cluster.media.SharedMediaStore`` adds so that every node serves every upload and blob.

Two kinds of shard, 16 of each, so every operation is one script on one slot:

- the uploader's shard ``mu<c>`` (c = ``core.user_shard(user)``, also the first character of each of
  the user's upload ids, so an id alone finds its record): an upload and the uploader's usage change
  together when an upload starts (the count of uploads in progress, the quota and the creation rate
  are checked and charged there, atomically for every node), is sealed, abandoned or deleted.
- the blob's shard ``mb<c>`` (c = the first hex digit of its SHA-256): a blob, its readers, the
  devices it waits for and the shard's indexes change together on a seal, a ``fetched``, a device
  removal or an expiry.

Keys (``{prefix}`` the cluster's key prefix):

- ``{prefix}mup:{mu<c>}:<upload>``  hash: user, device, to, size, created, touched, sealing (the digest its
  seal moves the bytes under, written first), blob (once sealed)
- ``{prefix}mui:{mu<c>}``           sorted set: uploads in progress -> touched (ms), to find idle ones
- ``{prefix}mus:{mu<c>}``           sorted set: sealed uploads -> sealed at, to forget their answer
- ``{prefix}mud:{mu<c>}``           set: abandoned uploads whose staging is not yet discarded
- ``{prefix}muh:{mu<c>}``           hash: those of them whose seal began -> its ``sealing`` digest
- ``{prefix}muq:{mu<c>}``           hash: ``<user>:n`` uploads in progress, ``<user>:u`` their charges,
  ``<user>:b`` charges of live blobs, ``n`` the shard's uploads in progress
- ``{prefix}muc:{mu<c>}:<user>``    hash: each charge of the user (``core.charge``: at least
  ``min_charge``), ``u:<upload>`` or ``b:<sha>:<created>`` -> bytes; a charge is freed once (the field
  goes), so freeing twice is harmless
- ``{prefix}mur:{mu<c>}:<user>``    hash: the user's creation-rate bucket, tokens and stamp (ms, Redis's
  clock); it expires once full again, so an idle user has none
- ``{prefix}mb:{mb<c>}:<sha>``      hash: owner, size, created, expires, deleted 0/1, upload (its maker),
  charge
- ``{prefix}mbr:{mb<c>}:<sha>``     set: readers (users); ``mbw:...:<sha>`` set: devices still to fetch
- ``{prefix}mbd:{mb<c>}:<client>``  set: the shard's blobs the device must fetch; ``mbv:{mb<c>}`` set:
  devices with some
- ``{prefix}mbx:{mb<c>}``           sorted set: live blobs -> expires; ``mbg:{mb<c>}``: deleted blobs ->
  expires (to forget)
- ``{prefix}mbp:{mb<c>}``           sorted set: releases pending, ``<sha>:<created>:<owner>`` -> deleted at
- ``{prefix}mbt:{mb<c>}``           hash: bytes, blobs (the shard's live blobs, for the metrics)

Across the two shards (docs/MEDIA.md, "Cluster mode"): a seal writes the blob first, then the upload
(a crash between leaves a blob whose charge is never taken: under-counted, never leaked). A deletion
marks the blob and records a pending release in one script, then frees the owner's charge and drops
the pending entry: a crash between is finished by the next ``expire`` of any node, after
``RELEASE_GRACE_MS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Final, TypeVar

from bridge.media.core import Blob, MediaLimits, Sealed, Upload, user_shard
from bridge.store import StoreError
from storage.redis import media_scripts as lua
from storage.redis.client import RedisStore

HEX: Final = "0123456789abcdef"
SHARD_LIMIT: Final = 500  # entries one sweep script handles per shard (the rest: next round)
RELEASE_GRACE_MS: Final = 60_000
"""A release pending this long was cut off by a crash (the normal path takes a few ms): finish it."""
T = TypeVar("T")


def _blob(fields: Sequence[str]) -> Blob:
    sha, owner, size, created, expires, cost = fields[:6]
    return Blob(sha, owner, int(size), int(created), int(expires), int(cost), True)


def _charge(blob: Blob) -> str:
    return f"b:{blob.sha256}:{blob.created_ms}"


class RedisMediaStore(RedisStore):
    SCRIPTS: ClassVar[dict[str, str]] = {
        "media.add_upload": lua.ADD_UPLOAD, "media.upload": lua.UPLOAD, "media.drop_upload": lua.DROP_UPLOAD,
        "media.abandon": lua.ABANDON, "media.sealing": lua.SEALING, "media.seal_upload": lua.SEAL_UPLOAD,
        "media.release": lua.RELEASE,
        "media.usage": lua.USAGE, "media.uploads": lua.UPLOADS, "media.seal_blob": lua.SEAL_BLOB,
        "media.fetched": lua.FETCHED, "media.remove_devices": lua.REMOVE_DEVICES, "media.expire": lua.EXPIRE,
        "media.forget": lua.FORGET, "media.pending": lua.PENDING}

    # --- keys and scripts ------------------------------------------------------------------

    def _run(self, name: str, tag: str, kind: str, *args: str | int) -> Awaitable[Any]:
        """Script ``name`` on the slot of ``tag`` (``mu<c>`` or ``mb<c>``); ``kind`` names one key of it."""
        return self.run(name, [self.key(kind, tag)], [self._prefix, f"{{{tag}}}", *args])

    @staticmethod
    def _upload_tag(upload: str) -> str | None:
        """The shard of an upload id (None: not an id of this store's, so no such upload)."""
        return f"mu{upload[0]}" if upload[:1] in HEX and upload else None

    @staticmethod
    def _blob_tag(sha256: str) -> str:
        return f"mb{sha256[0]}"

    async def _each_shard(self, kind: str, call: Callable[[str], Awaitable[T]]) -> list[T]:
        return list(await asyncio.gather(*(call(f"{kind}{c}") for c in HEX)))

    # --- uploads -----------------------------------------------------------------------------

    async def add_upload(self, upload: Upload) -> None:
        await self.admit(upload, upload.size, None)

    async def admit(self, upload: Upload, cost: int, limits: MediaLimits | None) -> Upload | tuple[str, int]:
        """Record the upload charged ``cost`` unless a limit refuses it (core.refusal's order: uploads in
        progress, quota, then a token of the creation rate, taken only if the rest passed): then
        ``(limit, bytes in use)``. An id recorded already answers its upload instead, charging nothing.
        ``limits`` None: no limit."""
        tag = self._upload_tag(upload.id)
        if tag != f"mu{user_shard(upload.user)}":
            raise ValueError(f"upload id {upload.id!r} does not name the shard of {upload.user} (core.new_upload_id)")
        bounds = (0, 0, 0, "0") if limits is None else (
            limits.quota_bytes, limits.max_uploads, limits.uploads_burst, repr(limits.uploads_per_minute / 60_000))
        r = await self._run("media.add_upload", tag, "mui", upload.id, upload.user, upload.device, upload.to,
                            upload.size, cost, upload.created_ms, upload.touched_ms, *bounds)
        if r[0] == "ok":
            return upload
        if r[0] == "exists":
            return Upload(upload.id, r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]))
        return str(r[0]), int(r[1])

    async def _record(self, upload: str, now_ms: int, sealed: bool, client_id: str = "") -> tuple[Upload, str] | None:
        tag = self._upload_tag(upload)
        if tag is None:
            return None
        r = await self._run("media.upload", tag, "mui", upload, now_ms, int(sealed), client_id)
        if r is None:
            return None
        return Upload(upload, r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5]), r[7] or None), str(r[6])

    async def upload(self, upload: str, client_id: str, now_ms: int) -> Upload | None:
        """The upload in progress of the device ``client_id``, now touched; None if there is none."""
        found = await self._record(upload, now_ms, False, client_id)
        return found[0] if found is not None else None

    async def touch_upload(self, upload: str, now_ms: int) -> None:
        await self._record(upload, now_ms, False)

    async def drop_upload(self, upload: str) -> None:
        if (tag := self._upload_tag(upload)) is not None:
            await self._run("media.drop_upload", tag, "mui", upload)

    async def abandon(self, before_ms: int) -> list[tuple[str, str | None]]:
        """Uploads in progress last touched at or before ``before_ms`` end, their charges freed; returns
        them and those abandoned before whose staging was not discarded yet (``drop_upload`` each after),
        each with its ``Upload.sealing``."""
        found = await self._each_shard("mu", lambda tag: self._run("media.abandon", tag, "mui", before_ms,
                                                                   SHARD_LIMIT))
        return [(str(r[i]), str(r[i + 1]) or None) for r in found for i in range(0, len(r), 2)]

    async def sealing(self, upload: str, sha256: str) -> None:
        if (tag := self._upload_tag(upload)) is not None:
            await self._run("media.sealing", tag, "mui", upload, sha256)

    async def seal(self, upload: str, sealed: Sealed) -> bool:
        blob = sealed.blob
        new, created = await self._run(
            "media.seal_blob", self._blob_tag(blob.sha256), "mbx", blob.sha256, blob.owner, blob.size,
            blob.created_ms, blob.expires_ms, upload, json.dumps(sorted(sealed.readers)),
            json.dumps(sorted(sealed.waiting)), blob.charge)
        if (tag := self._upload_tag(upload)) is not None:
            await self._run("media.seal_upload", tag, "mui", upload, blob.sha256, new,
                            f"b:{blob.sha256}:{created}", blob.created_ms, blob.charge)
        return bool(new)

    async def sealed(self, upload: str) -> tuple[Upload, str] | None:
        return await self._record(upload, 0, True)

    async def sealed_uploads(self, before_ms: int) -> list[str]:
        found = await self._each_shard("mu", lambda tag: self.command(
            "media.sealed_uploads", "ZRANGE", self.key("mus", tag), "-inf", f"({before_ms}", "BYSCORE", "LIMIT", "0",
            str(SHARD_LIMIT)))
        return [str(upload) for shard in found for upload in shard]

    # --- blobs -------------------------------------------------------------------------------

    async def blob(self, sha256: str) -> Blob | None:
        tag = self._blob_tag(sha256)
        r = await self.command("media.blob", "HMGET", self.key("mb", tag, sha256), "owner", "size", "created",
                               "expires", "deleted", "charge")
        if r[0] is None:
            return None
        return Blob(sha256, r[0], int(r[1]), int(r[2]), int(r[3]), int(r[5] or r[1]), r[4] == "1")

    async def is_reader(self, sha256: str, user: str) -> bool:
        key = self.key("mbr", self._blob_tag(sha256), sha256)
        return bool(await self.command("media.is_reader", "SISMEMBER", key, user))

    async def fetched(self, sha256: str, client_id: str) -> Blob | None:
        reply = await self._run("media.fetched", self._blob_tag(sha256), "mbx", sha256, client_id)
        if reply is None:
            return None
        done = _blob(reply)
        await self._release(done)
        return done

    async def remove_devices(self, client_ids: list[str]) -> list[Blob]:
        if not client_ids:
            return []
        found = await self._each_shard("mb", lambda tag: self._run("media.remove_devices", tag, "mbx", *client_ids))
        return await self._released(found)

    async def expire(self, now_ms: int) -> list[Blob]:
        """Also finishes the releases a crash cut off (pending for ``RELEASE_GRACE_MS``)."""
        found = await self._each_shard("mb", lambda tag: self._run("media.expire", tag, "mbx", now_ms, SHARD_LIMIT))
        expired = await self._released(found)
        pending = await self._each_shard("mb", lambda tag: self._run("media.pending", tag, "mbx", RELEASE_GRACE_MS,
                                                                     SHARD_LIMIT))
        for shard in pending:
            for member in shard:
                sha, created, owner = str(member).split(":")
                await self._release(Blob(sha, owner, 0, int(created), 0, 0, True))
        return expired

    async def _released(self, replies: list[Any]) -> list[Blob]:
        blobs = [_blob(reply[i:i + 6]) for reply in replies for i in range(0, len(reply), 6)]
        for blob in blobs:
            await self._release(blob)
        return blobs

    async def _release(self, blob: Blob) -> None:
        """Free the deleted blob's charge on its owner's shard, then drop its pending release. A failure
        is left to the pending release (finished by a later ``expire``): the deletion it follows has
        happened, and the caller must still delete the blob's bytes."""
        with contextlib.suppress(StoreError):
            await self._run("media.release", f"mu{user_shard(blob.owner)}", "mui", blob.owner, _charge(blob))
            await self.command("media.released", "ZREM", self.key("mbp", self._blob_tag(blob.sha256)),
                               f"{blob.sha256}:{blob.created_ms}:{blob.owner}")

    async def forget(self, before_ms: int) -> list[str]:
        found = await self._each_shard("mb", lambda tag: self._run("media.forget", tag, "mbx", before_ms,
                                                                   SHARD_LIMIT))
        return [str(sha) for shard in found for sha in shard]

    # --- whole views -------------------------------------------------------------------------

    async def load(self) -> tuple[list[Upload], dict[str, int], int, int]:
        rows = await self._each_shard("mu", lambda tag: self._run("media.uploads", tag, "mui"))
        uploads = [Upload(r[i], r[i + 1], r[i + 2], r[i + 3], int(r[i + 4]), int(r[i + 5]), int(r[i + 6]),
                          r[i + 7] or None) for r in rows for i in range(0, len(r), 8)]
        usage = await self._each_shard("mu", lambda tag: self._run("media.usage", tag, "mui"))
        owners = {str(u[i]): int(u[i + 1]) for u in usage for i in range(1, len(u), 2)}
        stored, count, _ = await self.stats()
        return uploads, owners, count, stored

    async def stats(self) -> tuple[int, int, int]:
        """Bytes and count of the live blobs, and the uploads in progress, over the whole cluster."""
        totals = await self._each_shard("mb", lambda tag: self.command(
            "media.stats", "HMGET", self.key("mbt", tag), "bytes", "blobs"))
        uploads = await self._each_shard("mu", lambda tag: self.command(
            "media.stats", "HGET", self.key("muq", tag), "n"))
        return (sum(int(t[0] or 0) for t in totals), sum(int(t[1] or 0) for t in totals),
                sum(int(n or 0) for n in uploads))

    async def waiting_devices(self) -> set[str]:
        found = await self._each_shard("mb", lambda tag: self.command("media.waiting", "SMEMBERS",
                                                                      self.key("mbv", tag)))
        return {str(device) for shard in found for device in shard}
