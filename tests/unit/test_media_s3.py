"""storage/media/s3.py beyond the shared store contract (tests/unit/test_media_local.py runs that
on S3 too): multipart puts of large blobs under the prefix, the credentials file's checks, a blob
sealed but not yet put, and backend failures mapped to StoreError."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiobotocore.session import get_session

from bridge.store import StoreError
from chatserver.config import ConfigError
from chatserver.media import open_blobs
from chatserver.media_config import MediaSettings
from storage.media.local import LocalBlobStore
from storage.media.s3 import PART_BYTES, S3BlobStore, S3Settings, open_store, read_secret
from testkit.s3_server import ACCESS_KEY, REGION, SECRET_KEY, S3Server
from tests.media_stores import s3_config, s3_settings


async def one(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 1 << 20):
        yield data[i:i + (1 << 20)]


async def objects(server: S3Server, bucket: str) -> dict[str, int]:
    async with get_session().create_client("s3", region_name=REGION, endpoint_url=server.endpoint,
                                           aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY) as s3:
        listed = await s3.list_objects_v2(Bucket=bucket)
        return {o["Key"]: o["Size"] for o in listed.get("Contents", [])}


async def test_a_large_blob_goes_up_in_parts_and_reads_back_in_ranges(s3_server: S3Server, tmp_path: Path) -> None:
    settings = s3_settings(s3_server, tmp_path / "s3")
    store = await S3BlobStore.open(LocalBlobStore(tmp_path / "media"), settings)
    data = os.urandom(2 * PART_BYTES + 12345)
    try:
        await store.append("big", 0, one(data))
        blob = await store.seal("big")
        assert blob == hashlib.sha256(data).hexdigest()
        assert await objects(s3_server, settings.bucket) == {f"chat/blobs/{blob}": len(data)}
        assert not any((tmp_path / "media" / "blobs").rglob(blob)), "the local copy goes once put"
        start, end = PART_BYTES - 5, PART_BYTES + 70_000
        assert b"".join([c async for c in store.read(blob, start, end)]) == data[start:end]
        assert b"".join([c async for c in store.read(blob, 0, 0)]) == b""
        await store.delete(blob)
        assert await objects(s3_server, settings.bucket) == {}
    finally:
        await store.close()


async def test_a_blob_sealed_locally_but_not_put_is_still_served(s3_server: S3Server, tmp_path: Path) -> None:
    """A crash between the local seal and the put leaves the local copy: reads use it, delete removes it."""
    local = LocalBlobStore(tmp_path / "media")
    store = await S3BlobStore.open(local, s3_settings(s3_server, tmp_path / "s3"))
    try:
        await local.append("u", 0, one(b"left behind"))
        blob = await local.seal("u")
        assert b"".join([c async for c in store.read(blob, 0, 4)]) == b"left"
        await store.delete(blob)
        assert not local.blob_path(blob).exists()
    finally:
        await store.close()


async def test_the_secret_file_must_be_private_and_not_empty(s3_server: S3Server, tmp_path: Path) -> None:
    config = s3_config(s3_server, tmp_path / "s3")
    secret = Path(config["secret_access_key_file"])
    local = LocalBlobStore(tmp_path / "media")
    os.chmod(secret, 0o640)
    with pytest.raises(ValueError, match="chmod 600"):
        await open_store(config, local)
    os.chmod(secret, 0o600)
    assert read_secret(secret) == SECRET_KEY
    store = await open_store(config, local)  # the wiring's entry point
    await store.close()
    with open(secret, "w") as f:  # noqa: ASYNC230 (a test's tiny file)
        f.write(" \n")
    with pytest.raises(ValueError, match="empty"):
        read_secret(secret)
    with pytest.raises(ValueError, match="cannot read"):
        read_secret(tmp_path / "missing")
    with pytest.raises(ValueError, match="go together"):
        await open_store({**config, "access_key_id": None}, local)
    with pytest.raises(ValueError, match="unexpected keyword"):
        await open_store({**config, "colour": "blue"}, local)


async def test_a_missing_bucket_or_endpoint_is_a_store_error(s3_server: S3Server, tmp_path: Path) -> None:
    good = s3_settings(s3_server, tmp_path / "s3")
    local = LocalBlobStore(tmp_path / "media")
    with pytest.raises(StoreError, match="no-such-bucket does not exist"):
        await S3BlobStore.open(local, S3Settings(**{**_fields(good), "bucket": "no-such-bucket"}))
    with pytest.raises(ValueError, match="no-such-bucket does not exist"):
        await open_store({**_fields(good), "bucket": "no-such-bucket"}, local)
    with pytest.raises(StoreError):
        await S3BlobStore.open(local, S3Settings(**{**_fields(good), "endpoint_url": "http://127.0.0.1:9",
                                                    "timeout_s": 2.0}))


def _fields(settings: S3Settings) -> dict[str, object]:
    return {name: getattr(settings, name) for name in S3Settings.__slots__}


async def test_the_config_wires_the_s3_backend_and_refuses_a_readable_secret(
        s3_server: S3Server, tmp_path: Path) -> None:
    config = s3_config(s3_server, tmp_path / "s3")
    settings = MediaSettings.model_validate({"backend": "s3", "s3": {**config, "addressing_style": "path"}})
    store = await open_blobs(settings, tmp_path / "data")
    try:
        assert isinstance(store, S3BlobStore)
        await store.append("u", 0, one(b"wired"))
        blob = await store.seal("u")
        assert await objects(s3_server, config["bucket"]) == {f"chat/blobs/{blob}": 5}
    finally:
        await store.close()
    os.chmod(config["secret_access_key_file"], 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        await open_blobs(settings, tmp_path / "data")
