"""The media records (``bridge.media.store.MediaStore``): uploads in progress, seals into one blob per
content with its readers and waiting devices, deletion after the last fetch, a device removal or the
ttl, records forgotten later. SQLite (one process) and Redis (cluster mode) alike."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bridge.media import core
from bridge.media.core import MediaLimits, Upload
from bridge.media.store import MediaStore
from tests.stores.backends import Backend

LIMITS = MediaLimits(max_bytes=100, chunk_max=10, quota_bytes=100, max_uploads=2, upload_ttl_ms=1000, ttl_ms=10_000,
                     min_charge=20, uploads_per_minute=60, uploads_burst=5)
A, B = "a" * 64, "b" * 64


def upload(user: str = "alice", to: str = "bob", size: int = 25, touched: int = 0) -> Upload:
    return Upload(core.new_upload_id(user), user, "phone", to, size, 0, touched)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[MediaStore]:
    opened = await backend.media()
    try:
        yield opened
    finally:
        await opened.close()


async def test_uploads_seal_into_one_blob_per_content(store: MediaStore, backend: Backend) -> None:
    first, second = upload(), upload("carol")
    await store.add_upload(first)
    await store.add_upload(second)
    await store.touch_upload(first.id, 7)
    uploads, owners, count, stored = await store.load()
    assert sorted((u.id, u.touched_ms) for u in uploads) == sorted([(first.id, 7), (second.id, 0)])
    assert (owners, count, stored) == ({}, 0, 0)
    assert await store.seal(first.id, core.seal(first, A, {"bob": ["phone", "laptop"]}, ["phone", "tv"], 100, LIMITS))
    # The same bytes from carol: one blob, more readers and waiting devices; carol's charge is not kept.
    assert not await store.seal(second.id, core.seal(second, A, {"bob": ["ipad"]}, [], 200, LIMITS))
    blob = await store.blob(A)
    assert blob is not None and (blob.owner, blob.size, blob.created_ms, blob.deleted) == ("alice", 25, 100, False)
    assert await store.is_reader(A, "carol") and await store.is_reader(A, "bob") and not await store.is_reader(A, "eve")
    found = await store.sealed(first.id)
    assert found is not None and found[0].user == "alice" and found[1] == A
    assert await store.sealed("0nosuchupload") is None and await store.sealed("..") is None
    again = await backend.media()  # another handle (a restart, another node) sees the same records
    try:
        assert await again.load() == ([], {"alice": 25}, 1, 25)
        assert await again.waiting_devices() == {"bob.phone", "bob.laptop", "bob.ipad", "alice.tv"}
    finally:
        await again.close()


async def test_deleted_after_the_last_fetch_or_device_removal(store: MediaStore) -> None:
    first = upload()
    await store.add_upload(first)
    await store.seal(first.id, core.seal(first, A, {"bob": ["phone", "laptop"]}, [], 100, LIMITS))
    assert await store.fetched(A, "bob.phone") is None
    assert await store.fetched(A, "bob.phone") is None  # again: nothing
    assert await store.fetched(A, "eve.phone") is None
    assert await store.remove_devices(["bob.tv"]) == []
    [done] = await store.remove_devices(["bob.laptop"])
    assert (done.sha256, done.owner, done.size) == (A, "alice", 25)
    blob = await store.blob(A)
    assert blob is not None and blob.deleted  # answers gone until forgotten
    assert await store.fetched(A, "bob.laptop") is None
    assert await store.waiting_devices() == set()
    assert await store.load() == ([], {}, 0, 0)
    assert await store.forget(blob.expires_ms) == []
    assert await store.forget(blob.expires_ms + 1) == [A]
    assert await store.blob(A) is None and not await store.is_reader(A, "bob")


async def test_expiry_and_sealed_uploads_forgotten(store: MediaStore) -> None:
    first, second = upload(), upload()
    for u in (first, second):
        await store.add_upload(u)
    await store.seal(first.id, core.seal(first, A, {"bob": ["phone"]}, [], 0, LIMITS))
    await store.seal(second.id, core.seal(second, B, {"bob": ["phone"]}, [], 5_000, LIMITS))
    assert await store.expire(LIMITS.ttl_ms - 1) == []
    [expired] = await store.expire(LIMITS.ttl_ms)
    assert expired.sha256 == A
    assert await store.waiting_devices() == {"bob.phone"}  # for B only
    assert await store.expire(LIMITS.ttl_ms) == []
    assert sorted(await store.sealed_uploads(5_001)) == sorted([first.id, second.id])
    assert await store.sealed_uploads(0) == []
    await store.drop_upload(first.id)
    assert await store.sealed(first.id) is None
    assert await store.sealed_uploads(10**6) == [second.id]


async def test_a_deleted_blob_uploaded_again_is_a_new_blob(store: MediaStore) -> None:
    first, second = upload(), upload("carol")
    await store.add_upload(first)
    await store.seal(first.id, core.seal(first, A, {"bob": ["phone"]}, [], 0, LIMITS))
    assert await store.fetched(A, "bob.phone") is not None
    await store.add_upload(second)
    assert await store.seal(second.id, core.seal(second, A, {"bob": ["phone"]}, [], 50, LIMITS))
    blob = await store.blob(A)
    assert blob is not None and (blob.owner, blob.created_ms, blob.deleted) == ("carol", 50, False)
    assert await store.forget(10**9) == []  # live again: not forgotten
    assert (await store.load())[1:] == ({"carol": 25}, 1, 25)


async def test_a_dropped_upload_in_progress_is_gone(store: MediaStore) -> None:
    first = upload()
    await store.add_upload(first)
    await store.drop_upload(first.id)
    await store.drop_upload(first.id)  # twice is fine
    assert await store.load() == ([], {}, 0, 0)
    assert await store.sealed(first.id) is None


async def test_the_digest_of_a_seal_begun_is_loaded_with_its_upload(store: MediaStore, backend: Backend) -> None:
    first = upload()
    await store.add_upload(first)
    await store.sealing(first.id, A)
    await store.sealing(first.id, B)  # sent again as other bytes: the last digest
    again = await backend.media()  # a restart finds it
    try:
        assert [u.sealing for u in (await again.load())[0]] == [B]
    finally:
        await again.close()
    await store.seal(first.id, core.seal(first, B, {"bob": ["phone"]}, [], 0, LIMITS))
    await store.sealing(first.id, A)  # sealed: not in progress any more, nothing changes
    found = await store.sealed(first.id)
    assert found is not None and found[1] == B and (await store.load())[0] == []


async def test_a_blob_keeps_its_charge(store: MediaStore) -> None:
    tiny = upload(size=5)
    await store.add_upload(tiny)
    await store.seal(tiny.id, core.seal(tiny, A, {"bob": ["phone"]}, [], 0, LIMITS))
    blob = await store.blob(A)
    assert blob is not None and (blob.size, blob.charge) == (5, LIMITS.min_charge)
    assert await store.load() == ([], {"alice": LIMITS.min_charge}, 1, 5)
    [done] = await store.remove_devices(["bob.phone"])
    assert done.charge == LIMITS.min_charge
