"""What the shared media store of cluster mode adds (``bridge.cluster.media.SharedMediaStore``,
storage/redis/media.py): the uploads in progress, quota and creation rate checked where the upload is
recorded,
charges moved and freed across the uploader's and the blob's shards exactly once (a retried script, a
crash between two), idle uploads ended once whichever node sweeps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import cast

import pytest

from bridge.media import core
from bridge.media.core import MediaLimits, Upload
from bridge.store import StoreError
from storage.redis import media as redis_media
from storage.redis.media import RedisMediaStore
from tests.stores.backends import Backend, RedisBackend
from tests.stores.test_media import LIMITS, A, B, upload

STORE_BACKENDS = ["redis"]
QUOTA = 100
SHARED = replace(LIMITS, quota_bytes=QUOTA, min_charge=0, uploads_burst=100)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[RedisMediaStore]:
    redis = cast(RedisBackend, backend)
    opened = await RedisMediaStore.open(redis.startup_nodes, redis.prefix)
    try:
        yield opened
    finally:
        await opened.close()


async def admit(store: RedisMediaStore, u: Upload, limits: MediaLimits = SHARED) -> tuple[str, int] | None:
    """None if ``u`` is recorded (now or before), else the refusal."""
    found = await store.admit(u, core.charge(u.size, limits), limits)
    return None if isinstance(found, Upload) else found


async def in_use(store: RedisMediaStore, user: str = "alice") -> int:
    """Bytes charged to ``user``, as a refusal tells them (an upload of the whole quota asked for)."""
    refused = await admit(store, upload(user, size=QUOTA + 1), replace(SHARED, max_uploads=0))
    assert refused is not None and refused[0] == "quota"
    return refused[1]


async def test_quota_and_uploads_in_progress_are_checked_where_recorded(store: RedisMediaStore) -> None:
    first, second = upload(size=40), upload(size=40)
    assert await admit(store, first) is None
    assert await admit(store, first) is None  # a retry: recorded once, charged once
    assert await admit(store, upload(size=70)) == ("quota", 40)
    assert await admit(store, second) is None
    assert await admit(store, upload(size=1)) == ("uploads", 80)
    assert await admit(store, upload("carol", size=100)) is None  # per user
    assert (await store.stats())[2] == 3
    with pytest.raises(ValueError, match="shard"):
        await store.admit(Upload("zz", "alice", "phone", "bob", 1, 0, 0), 1, SHARED)


async def test_charges_move_to_the_blob_and_are_freed_once(store: RedisMediaStore) -> None:
    first, twin = upload(size=30), upload(size=30)
    await admit(store, first)
    await admit(store, twin)
    found = await store.upload(first.id, "alice.phone", 55)
    assert found is not None and found.touched_ms == 55 and await store.upload(first.id[:-1], "alice.phone", 55) is None
    assert await store.upload(first.id, "alice.laptop", 99) is None  # another device's: neither read nor touched
    assert {u.id: u.touched_ms for u in (await store.load())[0]}[first.id] == 55
    assert await store.seal(first.id, core.seal(first, A, {"bob": ["phone"]}, [], 100, LIMITS))
    assert await store.seal(first.id, core.seal(first, A, {"bob": ["phone"]}, [], 100, LIMITS))  # a retry
    assert await store.upload(first.id, "alice.phone", 56) is None  # sealed: no longer in progress
    assert not await store.seal(twin.id, core.seal(twin, A, {"bob": ["tv"]}, [], 200, LIMITS))  # stored once
    assert await in_use(store) == 30
    assert await store.stats() == (30, 1, 0)
    assert await store.fetched(A, "bob.phone") is None
    assert await store.fetched(A, "bob.tv") is not None
    assert await in_use(store) == 0 and await store.stats() == (0, 0, 0)
    assert await store.fetched(A, "bob.tv") is None


async def test_a_release_cut_off_by_a_crash_is_finished_by_a_later_sweep(store: RedisMediaStore,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    first = upload(size=30)
    await admit(store, first)
    await store.seal(first.id, core.seal(first, A, {"bob": ["phone"]}, [], 100, LIMITS))

    async def crashed(blob: object) -> None:
        raise ConnectionError("the node died between the two scripts")

    monkeypatch.setattr(store, "_release", crashed)
    with pytest.raises(ConnectionError):
        await store.fetched(A, "bob.phone")
    monkeypatch.undo()
    assert await in_use(store) == 30  # the blob is deleted, its charge still held
    assert await store.expire(0) == []
    assert await in_use(store) == 30  # not before the grace
    monkeypatch.setattr(redis_media, "RELEASE_GRACE_MS", 0)
    await store.expire(0)
    assert await in_use(store) == 0
    await store.expire(0)  # once
    assert await in_use(store) == 0


async def test_idle_uploads_end_once_and_are_given_until_dropped(store: RedisMediaStore) -> None:
    idle, busy = upload(touched=0), upload(touched=0)
    await admit(store, idle)
    await admit(store, busy)
    await store.touch_upload(busy.id, 5_000)
    await store.sealing(busy.id, A)  # its seal began, then was cut off
    assert await store.abandon(1_000) == [(idle.id, None)]
    assert await store.abandon(1_000) == [(idle.id, None)]  # its staging is not discarded yet
    assert await store.upload(idle.id, "alice.phone", 2_000) is None
    await store.drop_upload(idle.id)
    assert await store.abandon(1_000) == []
    assert await in_use(store) == 25  # busy's
    assert await store.abandon(5_000) == [(busy.id, A)]
    assert await store.abandon(5_000) == [(busy.id, A)]  # the digest stays until the drop, its bytes to check
    await store.drop_upload(busy.id)
    assert await store.abandon(5_000) == []
    assert await in_use(store) == 0 and (await store.stats())[2] == 0


async def test_a_removed_device_is_not_waited_for_in_any_shard(store: RedisMediaStore) -> None:
    first, second = upload(size=10), upload(size=10)
    for u, sha in ((first, A), (second, B)):
        await admit(store, u)
        await store.seal(u.id, core.seal(u, sha, {"bob": ["phone", "tv"]}, [], 0, LIMITS))
    assert await store.remove_devices(["bob.tv"]) == []
    done = await store.remove_devices(["bob.phone"])
    assert sorted(b.sha256 for b in done) == [A, B]
    assert await in_use(store) == 0 and await store.waiting_devices() == set()


async def test_a_release_refused_by_redis_still_deletes_and_is_finished_later(store: RedisMediaStore,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    first = upload(size=30)
    await admit(store, first)
    await store.seal(first.id, core.seal(first, A, {"bob": ["phone"]}, [], 100, LIMITS))
    run = store.run

    async def failing(name: str, keys: list[str], args: list[str | int]) -> object:
        if name == "media.release":
            raise StoreError("redis media.release: still failing after 6 s")
        return await run(name, keys, args)

    monkeypatch.setattr(store, "run", failing)
    done = await store.fetched(A, "bob.phone")
    assert done is not None and done.sha256 == A, "the caller still learns of the deletion (to delete the bytes)"
    monkeypatch.undo()
    assert await in_use(store) == 30
    monkeypatch.setattr(redis_media, "RELEASE_GRACE_MS", 0)
    await store.expire(0)
    assert await in_use(store) == 0


async def test_a_recorded_id_answers_its_upload_charging_nothing(store: RedisMediaStore) -> None:
    first = upload(size=30)
    assert await store.admit(first, 30, SHARED) is first
    again = Upload(first.id, "alice", "phone", "carol", 99, 5, 5)  # an Idempotency-Key repeated
    assert await store.admit(again, 99, SHARED) == first
    assert await in_use(store) == 30 and (await store.stats())[2] == 1


async def test_the_minimum_charge_is_taken_kept_by_the_blob_and_freed(store: RedisMediaStore) -> None:
    limits = replace(SHARED, min_charge=20)
    tiny, other = upload(size=5), upload(size=5)
    assert await admit(store, tiny, limits) is None
    assert await admit(store, other, limits) is None
    assert await in_use(store) == 40
    await store.seal(tiny.id, core.seal(tiny, A, {"bob": ["phone"]}, [], 0, limits))
    assert await in_use(store) == 40 and await store.stats() == (5, 1, 1)  # the blob holds tiny's charge
    await store.drop_upload(other.id)  # deleted by its device
    assert await in_use(store) == 20
    assert await store.fetched(A, "bob.phone") is not None
    assert await in_use(store) == 0


async def test_the_creation_rate_is_one_bucket_per_user_that_expires_full(store: RedisMediaStore) -> None:
    limits = replace(SHARED, uploads_burst=3, uploads_per_minute=6, max_uploads=10, quota_bytes=1000)
    for _ in range(3):
        assert await admit(store, upload(size=1), limits) is None
    assert await admit(store, upload(size=1), limits) == ("rate", 3)
    assert await admit(store, upload("carol", size=1), limits) is None  # per user
    assert await admit(store, upload(size=2000), replace(limits, uploads_burst=100)) == ("quota", 3)
    bucket = store.key("mur", f"mu{core.user_shard('alice')}", "alice")
    ttl = int(await store.command("test.pttl", "PTTL", bucket))
    assert 29_000 < ttl <= 30_000  # 3 tokens at 6 a minute: full (so gone) in 30 s
