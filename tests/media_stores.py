"""The media blob stores the store contract tests run against: the local folder, and S3 on a
local moto server (the ``s3_server`` session fixture; a bucket of its own per test)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from bridge.media.blobs import BlobStore
from storage.media.local import LocalBlobStore
from storage.media.s3 import S3BlobStore, S3Settings
from testkit.s3_server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

BACKENDS = ["local", "s3"]


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
    return await S3BlobStore.open(local, s3_settings(server, root.parent / "s3"))
