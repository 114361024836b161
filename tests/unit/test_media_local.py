"""storage/media/local.py: staging, cuts, sealing into content-addressed files, ranged reads.

The store contract tests take the ``store`` fixture and run against every backend: the local
folder and S3 (storage/media/s3.py on a local moto server, its staging in a local folder, or in
the bucket: storage/media/s3_staging.py)."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import SimpleNamespace

import pytest

from bridge.media.blobs import BlobMissing, BlobStore
from storage.media import local as local_store
from storage.media.local import READ_CHUNK, LocalBlobStore
from tests.media_stores import BLOB_STORES, open_store


@pytest.fixture(params=BLOB_STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    opened = await open_store(request, tmp_path / "media")
    yield opened
    await opened.close()


async def chunks(parts: Iterable[bytes], fail_after: int | None = None) -> AsyncIterator[bytes]:
    for i, part in enumerate(parts):
        if fail_after is not None and i == fail_after:
            raise ConnectionResetError("cut")
        yield part


async def read_all(store: BlobStore, blob: str, start: int, end: int) -> bytes:
    return b"".join([c async for c in store.read(blob, start, end)])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_append_seal_read(store: BlobStore) -> None:
    data = os.urandom(3 * READ_CHUNK + 17)
    assert await store.staged_size("u1") == 0
    assert await store.append("u1", 0, chunks([data[:1000]])) == 1000
    assert await store.append("u1", 1000, chunks([data[1000:5000], data[5000:]])) == len(data)
    assert await store.staged_size("u1") == len(data)
    blob = await store.seal("u1")
    assert blob == hashlib.sha256(data).hexdigest()
    assert await store.staged_size("u1") == 0
    assert await read_all(store, blob, 0, len(data)) == data
    assert await read_all(store, blob, 5, READ_CHUNK + 9) == data[5 : READ_CHUNK + 9]
    assert await read_all(store, blob, len(data) - 1, len(data) + 100) == data[-1:]
    sizes = [len(c) async for c in store.read(blob, 0, len(data))]
    assert max(sizes) <= READ_CHUNK
    await store.delete(blob)
    await store.delete(blob)  # twice is fine
    with pytest.raises(BlobMissing):
        await read_all(store, blob, 0, 1)


async def test_cut_keeps_written_bytes_and_resume_rewrites_from_offset(store: BlobStore) -> None:
    with pytest.raises(ConnectionResetError):
        await store.append("u", 0, chunks([b"a" * 10, b"b" * 10, b"c" * 10], fail_after=2))
    assert await store.staged_size("u") == 20
    # A client that resumes from an earlier offset overwrites the tail.
    assert await store.append("u", 15, chunks([b"X" * 5])) == 20
    assert await store.append("u", 20, chunks([b"Y"])) == 21
    blob = await store.seal("u")
    assert await read_all(store, blob, 0, 21) == b"a" * 10 + b"b" * 5 + b"X" * 5 + b"Y"
    with pytest.raises(ValueError, match="past"):
        await store.append("v", 3, chunks([b"z"]))


async def test_same_content_is_kept_once(store: BlobStore) -> None:
    await store.append("a", 0, chunks([b"same"]))
    await store.append("b", 0, chunks([b"same"]))
    blob = await store.seal("a")
    assert await store.seal("b") == blob
    assert await read_all(store, blob, 0, 4) == b"same"
    assert await store.staged_size("b") == 0


async def test_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = LocalBlobStore(tmp_path / "media")
        await store.append("u", 0, chunks([b"x" * 10]))
        assert mode(tmp_path / "media" / "staging" / "u") == 0o600
        blob = await store.seal("u")
    finally:
        os.umask(old)
    path = store.blob_path(blob)
    assert path.relative_to(tmp_path / "media") == Path("blobs", blob[:2], blob[2:4], blob)
    assert mode(path) == 0o600
    for folder in (path.parent, path.parent.parent, tmp_path / "media" / "blobs", tmp_path / "media"):
        assert mode(folder) == 0o700


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 65, "é"])
async def test_names_cannot_leave_the_folder(store: BlobStore, name: str) -> None:
    with pytest.raises(ValueError):
        await store.append(name, 0, chunks([b"x"]))
    with pytest.raises(ValueError):
        await store.staged_size(name)
    with pytest.raises(ValueError):
        await store.delete(name)
    with pytest.raises(ValueError):
        await store.delete("A" * 64)  # upper-case hex is not a blob id


async def test_discard(store: BlobStore) -> None:
    await store.append("u", 0, chunks([b"x"]))
    await store.discard("u")
    await store.discard("u")
    assert await store.staged_size("u") == 0


async def test_the_digest_names_the_blob_the_seal_makes(store: BlobStore) -> None:
    data = os.urandom(READ_CHUNK + 5)
    await store.append("u", 0, chunks([data[:100], data[100:]]))
    assert await store.digest("u") == hashlib.sha256(data).hexdigest()
    assert await store.seal("u") == hashlib.sha256(data).hexdigest()
    assert await read_all(store, hashlib.sha256(data).hexdigest(), 0, len(data)) == data


async def test_a_digest_after_a_restart_hashes_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(READ_CHUNK + 5)
    await LocalBlobStore(tmp_path / "media").append("u", 0, chunks([data]))
    after = LocalBlobStore(tmp_path / "media")  # the digest was in the old process's memory
    made: list[object] = []

    def sha256() -> object:
        made.append(hashlib.sha256())
        return made[-1]

    monkeypatch.setattr(local_store, "hashlib", SimpleNamespace(sha256=sha256))
    assert await after.digest("u") == await after.seal("u") == hashlib.sha256(data).hexdigest()
    assert len(made) == 1  # the seal used what the digest read


async def test_the_seal_hashes_the_file_after_a_restart(tmp_path: Path) -> None:
    data = os.urandom(READ_CHUNK + 5)
    before = LocalBlobStore(tmp_path / "media")
    await before.append("u", 0, chunks([data[:100]]))
    after = LocalBlobStore(tmp_path / "media")  # the digest so far was in the old process's memory
    await after.append("u", 100, chunks([data[100:]]))
    assert await after.seal("u") == hashlib.sha256(data).hexdigest()
