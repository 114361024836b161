"""The media blob stores the store contract tests run against: the local folder, and S3 on a
local moto server (the ``s3_server`` session fixture; a bucket of its own per test)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session

from bridge.media.blobs import BlobStore
from chatserver.config import Settings
from storage.media.local import LocalBlobStore
from storage.media.s3 import S3BlobStore, S3Settings
from testkit.s3_server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

BACKENDS = ["local", "s3"]
BLOB_STORES = [*BACKENDS, "s3-shared"]
"""The blob store contract: also S3 with its uploads staged in the bucket (cluster mode)."""


def s3_config(server: S3Server, root: Path) -> dict[str, str]:
    """A new bucket on ``server`` and the ``media.s3`` config keys for it, with a 0600 secret
    key file under ``root``."""
    bucket = f"media-{secrets.token_hex(6)}"
    server.make_bucket(bucket)
    root.mkdir(parents=True, exist_ok=True)
    secret = root / "s3-secret"
    secret.write_text(SECRET_KEY + "\n")
    secret.chmod(0o600)
    return {"bucket": bucket, "endpoint_url": server.endpoint, "region": REGION, "prefix": "chat/",
            "access_key_id": ACCESS_KEY, "secret_access_key_file": str(secret)}


def s3_settings(server: S3Server, root: Path) -> S3Settings:
    return S3Settings(**s3_config(server, root))


async def open_store(request: pytest.FixtureRequest, root: Path) -> BlobStore:
    """The store ``request.param`` names, over a local folder ``root``."""
    local = LocalBlobStore(root)
    if request.param == "local":
        return local
    server: S3Server = request.getfixturevalue("s3_server")
    return await S3BlobStore.open(local, s3_settings(server, root.parent / "s3"), request.param == "s3-shared")



def backend_settings(request: pytest.FixtureRequest, root: Path) -> dict[str, Any]:
    """Broker config overrides for the backend ``request.param`` names (``{}``: the local folder)."""
    if request.param == "local":
        return {}
    server: S3Server = request.getfixturevalue("s3_server")
    return {"media.backend": "s3", "media.s3": s3_config(server, root)}


async def stored_blobs(settings: Settings) -> dict[str, int]:
    """Every blob the broker's backend holds, by id, with its size (sealed, not yet put: local)."""
    found = {p.name: p.stat().st_size for p in (settings.data_path / "media" / "blobs").rglob("*") if p.is_file()}
    s3 = settings.media.s3
    if settings.media.backend == "s3" and s3 is not None:
        async with get_session().create_client(
                "s3", region_name=REGION, endpoint_url=s3.endpoint_url, aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY) as client:
            listed = await client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{s3.prefix}blobs/")
            found.update({o["Key"].rsplit("/", 1)[1]: o["Size"] for o in listed.get("Contents", [])})
    return found
