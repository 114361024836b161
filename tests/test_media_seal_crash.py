"""A death between the two steps of a seal: the staging became the blob's bytes (a file of the
folder, an object of the bucket) but the store never recorded the blob. The store's ``seal`` raising
once stands for the process dying there: that service is then dropped unused, and a new one starts
on the same data (the same folder, media.db or Redis prefix, and bucket), as after a restart.

Whatever comes next, the bytes are kept once and only while needed: the upload abandoned or deleted
takes them with it; the client coming back seals them once; the same bytes sealed by another upload
keep them, also when that seal is under way as the drop decides, or as a blob of those bytes is
deleted. Through the real service and stores: SQLite with the local folder or S3, and Redis (cluster
mode) with S3 staging in the bucket.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bridge.clock import Clock
from bridge.cluster.media import ClusterMediaService
from bridge.media.blobs import BlobMissing, BlobStore
from bridge.media.core import MediaError, MediaLimits, Sealed
from bridge.media.service import MediaService
from bridge.media.store import MediaStore
from storage.media.local import LocalBlobStore
from storage.media.s3 import S3BlobStore, S3Settings
from storage.redis.media import RedisMediaStore
from storage.sqlite.media import SqliteMediaStore
from tests.helpers import WAIT_S
from tests.media_stores import s3_settings

LIMITS = MediaLimits(max_bytes=1 << 20, chunk_max=1 << 20, quota_bytes=1 << 24, max_uploads=4, upload_ttl_ms=60_000,
                     ttl_ms=86_400_000, min_charge=1, uploads_per_minute=600, uploads_burst=10)
DATA = os.urandom(100_000)
SHA = hashlib.sha256(DATA).hexdigest()
DEVICES = {"alice": ["phone"], "bob": ["phone"]}
KEY = "alice-key-0000001"  # an Idempotency-Key
STACKS = ["sqlite+local", "sqlite+s3", "redis+s3-shared"]


class Died(Exception):
    """The process dies here."""


class ManualClock(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1_700_000_000_000

    def wall_ms(self) -> int:
        return self.now

    def monotonic(self) -> float:
        return self.now / 1000


class Rounds:
    """A supervisor that runs no loop: the test runs a service's rounds itself, when it chooses."""

    def __init__(self) -> None:
        self.rounds: dict[str, Callable[[], Awaitable[object]]] = {}

    def spawn(self, task: str, one_round: Callable[[], Awaitable[object]]) -> asyncio.Task[None]:
        self.rounds[task] = one_round
        return asyncio.create_task(asyncio.Event().wait())

    def failed(self, task: str, exc: BaseException) -> None:
        raise AssertionError(f"{task} failed") from exc

    def succeeded(self, task: str) -> None:
        pass


class Users:
    async def user_devices(self, name: str) -> list[str] | None:
        return DEVICES.get(name)


async def no_group(group: str) -> tuple[str, ...]:
    return ()


@dataclass
class Node:
    service: MediaService
    store: MediaStore
    blobs: BlobStore
    rounds: Rounds

    async def sweep(self) -> None:
        await self.rounds.rounds["media_sweep"]()


@dataclass
class Stack:
    """One kind of deployment's data; ``node()`` starts a process's service on it (again: a restart)."""

    kind: str
    root: Path
    clock: ManualClock
    s3: S3Settings | None
    redis: list[tuple[str, int]]
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:12]}:")

    async def _stores(self) -> tuple[MediaStore, BlobStore]:
        local = LocalBlobStore(self.root / "media")
        blobs: BlobStore = local if self.s3 is None else await S3BlobStore.open(local, self.s3, "shared" in self.kind)
        if self.kind.startswith("redis"):
            return await RedisMediaStore.open(self.redis, self.prefix), blobs
        return await SqliteMediaStore.open(self.root / "data"), blobs

    @asynccontextmanager
    async def node(self) -> AsyncIterator[Node]:
        store, blobs = await self._stores()
        kind = ClusterMediaService if self.kind.startswith("redis") else MediaService
        rounds = Rounds()
        service = kind(store, blobs, Users(), no_group, LIMITS, 0.0, clock=self.clock, supervisor=rounds)
        try:
            await service.start({"alice.phone", "bob.phone"})
            yield Node(service, store, blobs, rounds)
        finally:
            await service.close()
            await blobs.close()
            await store.close()


@pytest.fixture(params=STACKS)
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Stack:
    kind = str(request.param)
    s3 = s3_settings(request.getfixturevalue("s3_server"), tmp_path / "s3") if "s3" in kind else None
    redis = request.getfixturevalue("redis_cluster").startup_nodes if kind.startswith("redis") else []
    return Stack(kind, tmp_path, ManualClock(), s3, redis)


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def upload(node: Node, user: str, to: str, data: bytes = DATA) -> tuple[str, str | None]:
    """A whole upload of ``data``: (its id, the blob it was sealed as)."""
    new, _ = await node.service.create(user, "phone", {"size": len(data), "to": to})
    offset, blob = await node.service.patch(user, "phone", new.id, 0, len(data), body(data))
    assert offset == len(data)
    return new.id, blob


async def stored(blobs: BlobStore, sha256: str) -> bool:
    try:
        return bool([piece async for piece in blobs.read(sha256, 0, 1)])
    except BlobMissing:
        return False


async def read(node: Node, user: str, sha256: str) -> bytes:
    got = await node.service.download(user, sha256, None)
    return b"".join([piece async for piece in got.chunks])


async def died_mid_seal(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """alice uploads every byte of ``DATA`` to bob; the process dies after the bytes became the blob,
    before its record. Returns the upload and the blob's id."""
    async with stack.node() as node:
        async def dies(upload: str, sealed: Sealed) -> bool:
            raise Died

        monkeypatch.setattr(node.store, "seal", dies)
        new, _ = await node.service.create("alice", "phone", {"size": len(DATA), "to": "bob"})
        with pytest.raises(Died):
            await node.service.patch("alice", "phone", new.id, 0, len(DATA), body(DATA))
        assert await stored(node.blobs, SHA) and await node.blobs.staged_size(new.id) == 0  # moved, not recorded
        assert await node.store.blob(SHA) is None
    return new.id, SHA


def hold_the_record(node: Node, monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """The next seals' records (the bytes moved already) wait: ``recording`` is set once one waits, and
    they go on once ``release`` is."""
    recording, release = asyncio.Event(), asyncio.Event()
    record = node.store.seal

    async def held(upload_id: str, sealed: Sealed) -> bool:
        recording.set()
        await release.wait()
        return await record(upload_id, sealed)

    monkeypatch.setattr(node.store, "seal", held)
    return recording, release


async def assert_nothing_kept(node: Node, upload_id: str, sha256: str) -> None:
    assert not await stored(node.blobs, sha256)
    assert await node.store.blob(sha256) is None
    assert await node.store.sealed(upload_id) is None
    assert (await node.store.load())[0] == []  # no upload in progress (cluster: none in the store)


async def test_an_abandoned_upload_takes_the_bytes_its_cut_off_seal_moved(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    upload_id, sha256 = await died_mid_seal(stack, monkeypatch)
    async with stack.node() as node:  # the restart; the client never comes back
        await node.sweep()
        assert await stored(node.blobs, sha256)  # not idle long enough yet
        stack.clock.now += LIMITS.upload_ttl_ms
        await node.sweep()
        await assert_nothing_kept(node, upload_id, sha256)
        await node.sweep()  # once
        await assert_nothing_kept(node, upload_id, sha256)


async def test_a_deleted_upload_takes_the_bytes_its_cut_off_seal_moved(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    upload_id, sha256 = await died_mid_seal(stack, monkeypatch)
    async with stack.node() as node:
        await node.service.delete("alice", "phone", upload_id)
        await assert_nothing_kept(node, upload_id, sha256)


async def test_the_client_coming_back_seals_the_bytes_once(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    upload_id, sha256 = await died_mid_seal(stack, monkeypatch)
    async with stack.node() as node:
        assert await node.service.status("alice", "phone", upload_id) == (0, len(DATA), None)  # nothing staged
        offset, blob = await node.service.patch("alice", "phone", upload_id, 0, len(DATA), body(DATA))
        assert (offset, blob) == (len(DATA), sha256)
        assert await node.service.status("alice", "phone", upload_id) == (len(DATA), len(DATA), sha256)
        assert await read(node, "bob", sha256) == DATA
        stack.clock.now += LIMITS.upload_ttl_ms  # past the time an upload in progress would be abandoned
        await node.sweep()
        assert await read(node, "bob", sha256) == DATA
        await node.service.fetched("bob", "phone", sha256)  # the one device waited for: the blob goes
        assert not await stored(node.blobs, sha256)


async def test_the_same_bytes_sealed_by_another_upload_are_kept(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    upload_id, sha256 = await died_mid_seal(stack, monkeypatch)
    async with stack.node() as node:
        assert (await upload(node, "bob", "alice"))[1] == sha256
        stack.clock.now += LIMITS.upload_ttl_ms
        await node.sweep()  # alice's upload is abandoned; bob's blob is made of its bytes
        assert await node.store.sealed(upload_id) is None and (await node.store.load())[0] == []
        assert await read(node, "alice", sha256) == DATA


async def test_a_drop_waits_for_a_seal_of_the_same_bytes_under_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = Stack("sqlite+local", tmp_path, ManualClock(), None, [])  # the lock is the service's: one stack
    upload_id, sha256 = await died_mid_seal(stack, monkeypatch)
    async with stack.node() as node:
        recording, release = hold_the_record(node, monkeypatch)  # bob's seal: bytes moved, record not yet written
        bobs = asyncio.create_task(upload(node, "bob", "alice"))
        await asyncio.wait_for(recording.wait(), WAIT_S)
        delete = asyncio.create_task(node.service.delete("alice", "phone", upload_id))
        await asyncio.wait({delete}, timeout=1.0)
        assert not delete.done()  # its check waits for the seal of the same bytes
        release.set()
        await asyncio.wait_for(bobs, WAIT_S)
        await asyncio.wait_for(delete, WAIT_S)
        assert await read(node, "alice", sha256) == DATA


async def test_a_blob_deleted_while_a_seal_of_the_same_bytes_records_keeps_its_bytes(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """bob fetches the blob alice sent him, its last waiting device (so it is deleted), while his own upload
    of the same bytes is sealed: it kept the one copy there was, and records a live blob of it. The
    deletion decides under the seal's lock, after that record: the bytes stay, for alice to read."""
    async with stack.node() as node:
        _, sha256 = await upload(node, "alice", "bob")
        recording, release = hold_the_record(node, monkeypatch)  # bob's seal: bytes moved, record not yet written
        bobs = asyncio.create_task(upload(node, "bob", "alice"))
        await asyncio.wait_for(recording.wait(), WAIT_S)
        fetched = asyncio.create_task(node.service.fetched("bob", "phone", sha256))
        await asyncio.wait({fetched}, timeout=1.0)  # without the lock, the bytes went here
        release.set()
        assert (await asyncio.wait_for(bobs, WAIT_S))[1] == sha256
        await asyncio.wait_for(fetched, WAIT_S)
        assert await read(node, "alice", sha256) == DATA


async def test_a_post_repeated_while_its_upload_is_sealed_answers_sealed(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """alice's app repeats its POST (same ``Idempotency-Key``) while her last PATCH is sealing the upload:
    the answer waits for that PATCH and says ``sealed`` with the blob (it told her offset 0 of an upload
    that was ending, whose next PATCH then got ``not_found``)."""
    async with stack.node() as node:
        post = {"size": len(DATA), "to": "bob"}
        new, _ = await node.service.create("alice", "phone", post, key=KEY)
        recording, release = hold_the_record(node, monkeypatch)
        sealing = asyncio.create_task(node.service.patch("alice", "phone", new.id, 0, len(DATA), body(DATA)))
        await asyncio.wait_for(recording.wait(), WAIT_S)
        again = asyncio.create_task(node.service.create("alice", "phone", post, key=KEY))
        await asyncio.wait({again}, timeout=0.5)
        release.set()
        assert await asyncio.wait_for(sealing, WAIT_S) == (len(DATA), SHA)
        with pytest.raises(MediaError) as answer:
            await asyncio.wait_for(again, WAIT_S)
        assert (answer.value.code, answer.value.blob) == ("sealed", SHA)
