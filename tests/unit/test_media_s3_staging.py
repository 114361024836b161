"""storage/media/s3_staging.py: uploads staged in the bucket (cluster mode), beyond the blob store
contract (tests/unit/test_media_local.py runs that on it as ``s3-shared``): an upload begun by one
node is resumed and sealed by another; two nodes writing the same offsets at once both keep what
they acknowledged; writes larger than a segment; the chain of segments; the seal copying full
segments inside S3."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.media import s3_staging
from storage.media.local import LocalBlobStore
from storage.media.s3 import S3BlobStore, S3Settings
from storage.media.s3_staging import SEGMENT_BYTES as SEGMENT
from storage.media.s3_staging import Segment, chain, copyable
from testkit.s3_server import S3Server
from tests.media_stores import s3_settings
from tests.unit.test_media_s3 import objects, one


async def node(settings: S3Settings, root: Path) -> S3BlobStore:
    return await S3BlobStore.open(LocalBlobStore(root), settings, shared=True)


def test_the_chain_takes_the_furthest_reaching_segment_and_stops_at_a_gap() -> None:
    a, b, c, d = Segment(0, 10, "a"), Segment(5, 30, "b"), Segment(5, 20, "c"), Segment(40, 50, "d")
    assert chain([d, c, b, a]) == [(a, 0, 10), (b, 10, 30)]
    assert chain([Segment(3, 9, "x")]) == []
    mib = 1024 * 1024
    assert copyable([(a, 0, 5 * mib), (b, 5 * mib, 5 * mib + 1)]) and copyable([(a, 0, 1)])
    assert not copyable([(a, 0, 5 * mib - 1), (b, 5 * mib - 1, 6 * mib)]) and not copyable([])


async def test_an_upload_begun_on_one_node_is_resumed_and_sealed_on_another(s3_server: S3Server,
                                                                           tmp_path: Path) -> None:
    settings = s3_settings(s3_server, tmp_path / "s3")
    first, second = await node(settings, tmp_path / "a"), await node(settings, tmp_path / "b")
    data = os.urandom(3_000_000)
    try:
        assert await first.append("up1", 0, one(data[:1_200_000])) == 1_200_000
        assert await second.staged_size("up1") == 1_200_000
        assert await second.append("up1", 1_200_000, one(data[1_200_000:])) == len(data)
        blob = await second.seal("up1")  # the digest is not in this node's memory: read again
        assert blob == hashlib.sha256(data).hexdigest()
        assert await objects(s3_server, settings.bucket) == {f"chat/blobs/{blob}": len(data)}, "staging gone"
        assert b"".join([c async for c in first.read(blob, 0, len(data))]) == data
    finally:
        await first.close()
        await second.close()


async def test_two_nodes_writing_the_same_offsets_at_once_both_keep_what_they_acknowledged(
        s3_server: S3Server, tmp_path: Path) -> None:
    settings = s3_settings(s3_server, tmp_path / "s3")
    first, second = await node(settings, tmp_path / "a"), await node(settings, tmp_path / "b")
    data = os.urandom(3000)
    both_listed = asyncio.Event()
    waiting = 0

    async def after_both(part: bytes) -> AsyncIterator[bytes]:
        nonlocal waiting
        waiting += 1
        if waiting == 2:
            both_listed.set()
        await both_listed.wait()  # each append read the staging (1000 bytes) before either writes
        yield part

    try:
        await first.append("up", 0, one(data[:1000]))
        ends = await asyncio.gather(first.append("up", 1000, after_both(data[1000:3000])),
                                    second.append("up", 1000, after_both(data[1000:2000])))
        assert sorted(ends) == [2000, 3000]
        assert await second.staged_size("up") == 3000
        assert await second.seal("up") == hashlib.sha256(data).hexdigest()
    finally:
        await first.close()
        await second.close()


async def test_a_write_larger_than_a_segment_and_a_cut_inside_one(s3_server: S3Server, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_staging, "SEGMENT_BYTES", 1000)
    settings = s3_settings(s3_server, tmp_path / "s3")
    store = await node(settings, tmp_path / "a")
    data = os.urandom(4500)
    try:
        assert await store.append("up", 0, one(data)) == 4500
        assert sorted((await objects(s3_server, settings.bucket)).values()) == [500, 1000, 1000, 1000, 1000]
        assert await store.append("up", 2500, one(b"x" * 10)) == 2510  # drops what lay past 2500
        assert await store.seal("up") == hashlib.sha256(data[:2500] + b"x" * 10).hexdigest()
        await store.append("gone", 0, one(data))
        await store.discard("gone")
        assert await store.staged_size("gone") == 0
    finally:
        await store.close()


async def test_the_seal_copies_full_segments_inside_s3_and_streams_small_ones(
        s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = s3_settings(s3_server, tmp_path / "s3")
    store = await node(settings, tmp_path / "a")
    streamed: list[str] = []
    put = store._put

    async def counting(blob: str, pieces: AsyncIterator[bytes]) -> None:
        streamed.append(blob)
        await put(blob, pieces)

    monkeypatch.setattr(store, "_put", counting)
    data = os.urandom(2 * SEGMENT + 1000)
    try:
        for start in range(0, len(data), SEGMENT):  # full PATCHes: segments of 8 MiB, and the tail
            await store.append("full", start, one(data[start:start + SEGMENT]))
        blob = await store.seal("full")
        assert blob == hashlib.sha256(data).hexdigest() and streamed == []
        assert await objects(s3_server, settings.bucket) == {f"chat/blobs/{blob}": len(data)}
        assert b"".join([c async for c in store.read(blob, 0, len(data))]) == data
        small = data[:3 * 1_000_000]
        for start in range(0, len(small), 1_000_000):  # 1 MB PATCHes: below S3's smallest part
            await store.append("small", start, one(small[start:start + 1_000_000]))
        assert await store.seal("small") == hashlib.sha256(small).hexdigest() and len(streamed) == 1
    finally:
        await store.close()
