"""The media endpoint through the real broker over loopback sockets (docs/MEDIA.md): a 50 MB
ciphertext-like file to one user and to a 20-member group, cut and resumed, ranged downloads,
deletion after the last fetch, refusals."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import BrokerThread
from tests.media_client import (
    Device,
    MediaClient,
    MiB,
    add_device,
    charged,
    connected,
    create_group,
    file_digest,
    media_broker,
)
from tests.media_stores import BACKENDS, backend_settings, stored_blobs
from tests.test_listeners import make_cert

SIZE = 50 * MiB


@pytest.fixture(params=BACKENDS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerThread]:
    """On each blob backend: the local folder, and S3 (moto's server on loopback)."""
    backend = backend_settings(request, tmp_path / "s3")
    b = media_broker(tmp_path / "data", **{"media.quota_bytes": 200 * MiB, **backend})
    yield b
    b.stop()


@pytest.fixture
async def client(broker: BrokerThread) -> AsyncIterator[MediaClient]:
    async with connected(broker) as made:
        yield made


def metric(broker: BrokerThread, name: str) -> float:
    assert broker.app.media is not None
    counters = broker.app.media.service.counters
    return float({"stored": counters.stored_bytes, "blobs": counters.blobs, "charged": charged(broker)}[name])


async def test_alice_to_bob_cut_resumed_ranged_fetched(broker: BrokerThread, client: MediaClient) -> None:
    alice, alice2 = add_device(broker, "alice", "phone"), add_device(broker, "alice", "laptop")
    bob = add_device(broker, "bob", "phone")
    status, body = await client.create(alice, "bob", SIZE)
    assert status == 201 and body["offset"] == 0 and body["chunk_max"] == 8 * MiB
    upload = body["upload"]
    # 24 MiB, then a PATCH cut after 2 of its 8 MiB (halfway through the file): what arrived is kept.
    for start in (0, 8 * MiB, 16 * MiB):
        assert (await client.patch(alice, upload, start, start + 8 * MiB))[0] == 204
    await client.cut_patch(broker.address("media"), alice, upload, 24 * MiB, 8 * MiB, 2 * MiB)
    offset = await _settled_offset(client, alice, upload)
    assert 24 * MiB <= offset <= 26 * MiB
    sealed = await client.upload(alice, "bob", SIZE, start_offset=offset, upload=upload)
    assert sealed["sha256"] == file_digest(SIZE) and sealed["size"] == SIZE
    assert (await client.offset(alice, upload))["url"] == sealed["url"]
    url = sealed["url"]
    # Whole and ranged downloads are byte-identical.
    assert await client.download(bob, url) == (200, sealed["sha256"], SIZE)
    status, _, length = await client.download(bob, url, 10 * MiB, 20 * MiB - 1)
    assert (status, length) == (206, 10 * MiB)
    parts = [await client.download(bob, url, a, b - 1) for a, b in ((0, 7), (7, SIZE))]
    assert [p[2] for p in parts] == [7, SIZE - 7]
    async with client.http.get(client.base + url.removeprefix("/v1/media"), headers={**bob.auth,
                                                                                      "Range": f"bytes={SIZE}-"}) as r:
        assert (r.status, r.headers["Content-Range"]) == (416, f"bytes */{SIZE}")
    # A stranger sees nothing; the blob goes once bob's phone and alice's laptop said fetched.
    eve = add_device(broker, "eve", "phone")
    assert (await client.download(eve, url))[0] == 404
    assert await client.fetched(eve, url) == 404
    assert metric(broker, "charged") == SIZE
    assert await client.fetched(bob, url) == 204
    assert (await client.download(bob, url))[0] == 200  # alice's laptop has not fetched yet
    assert await client.fetched(alice2, url) == 204
    assert (await client.download(bob, url))[0] == 410
    assert await client.fetched(bob, url) == 204  # said again: harmless
    assert metric(broker, "charged") == 0 and metric(broker, "blobs") == 0
    assert sealed["sha256"] not in await stored_blobs(broker.settings)


async def _settled_offset(client: MediaClient, dev: Device, upload: str) -> int:
    """The offset once the server noticed the cut (GET waits for the PATCH in progress)."""
    return int((await client.offset(dev, upload))["offset"])


async def test_group_upload_is_stored_once_for_all_members(broker: BrokerThread, client: MediaClient) -> None:
    members = [f"m{i:02d}" for i in range(19)]
    devices = {name: add_device(broker, name, "phone") for name in ["alice", *members]}
    group = create_group(broker, "alice", members)
    sealed = await client.upload(devices["alice"], group, SIZE)
    url = sealed["url"]
    assert metric(broker, "blobs") == 1 and metric(broker, "stored") == SIZE
    assert await stored_blobs(broker.settings) == {sealed["sha256"]: SIZE}

    async def member(name: str) -> None:
        assert await client.download(devices[name], url) == (200, sealed["sha256"], SIZE)
        assert await client.fetched(devices[name], url) == 204

    await asyncio.gather(*(member(name) for name in members[:-1]))
    assert metric(broker, "blobs") == 1
    await member(members[-1])
    assert metric(broker, "blobs") == 0 and metric(broker, "charged") == 0
    outsider = add_device(broker, "outsider", "phone")
    status, body = await client.create(outsider, group, 10)
    assert (status, body["error"]) == (403, "not_member")


async def test_refusals_are_clear(tmp_path: Path) -> None:
    broker = media_broker(tmp_path / "data", **{"media.max_bytes": 10 * MiB, "media.chunk_max_bytes": MiB,
                                                "media.quota_bytes": 12 * MiB, "media.max_uploads": 2})
    try:
        async with connected(broker) as client:
            http = client.http
            alice = add_device(broker, "alice", "phone")
            add_device(broker, "bob", "phone")
            assert (await client.create(alice, "bob", 10 * MiB + 1))[1]["error"] == "too_large"
            status, first = await client.create(alice, "bob", 8 * MiB)
            assert status == 201
            status, body = await client.create(alice, "bob", 5 * MiB)
            assert (status, body["error"]) == (413, "quota_exceeded")
            assert (await client.create(alice, "bob", MiB))[0] == 201
            async with http.post(client.base + "/uploads", json={"size": 1, "to": "bob"}, headers=alice.auth) as r:
                assert (r.status, (await r.json())["error"], r.headers["Retry-After"]) == (429, "rate_limited", "60")
            upload = first["upload"]
            status, body = await client.patch(alice, upload, 5, 10)
            assert (status, body) == (409, {"error": "offset_mismatch", "detail": body and body["detail"],
                                            "offset": 0})
            assert (await client.patch(alice, upload, 0, 2 * MiB))[1] == {
                "error": "too_large", "detail": "a PATCH carries at most 1048576 bytes"}
            assert (await client.create(alice, "nobody", 1))[1]["error"] == "not_found"
            for headers in ({}, {"Authorization": "Basic !!"}, {"Authorization": "Bearer x"},
                            Device("alice", "phone", "t" * 43).auth, Device("alice", "phone", "x").auth):
                async with http.get(client.base + f"/uploads/{upload}", headers=headers) as r:
                    assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="media"'
                    assert (await r.json())["error"] == "unauthorized"
            bob = add_device(broker, "bob", "laptop")
            async with http.get(client.base + f"/uploads/{upload}", headers=bob.auth) as r:
                assert r.status == 404  # another user's upload
            async with http.get(client.base + "/blobs/" + "0" * 64, headers=alice.auth) as r:
                assert r.status == 404 and (await r.json())["error"] == "not_found"
            async with http.post(client.base + "/uploads", data=b"{", headers=alice.auth) as r:
                assert (r.status, (await r.json())["error"]) == (400, "bad_request")
    finally:
        broker.stop()


async def test_files_are_private(broker: BrokerThread, client: MediaClient) -> None:
    old = os.umask(0o022)
    try:
        alice = add_device(broker, "alice", "phone")
        add_device(broker, "bob", "phone")
        status, body = await client.create(alice, "bob", 3 * MiB)
        assert status == 201
        await client.patch(alice, body["upload"], 0, MiB)
        root = broker.settings.data_path / "media"
        staged = root / "staging" / body["upload"]
        assert stat.S_IMODE(staged.stat().st_mode) == 0o600
        sealed = await client.upload(alice, "bob", 3 * MiB, start_offset=MiB, upload=body["upload"])
    finally:
        os.umask(old)
    for path in [root, *root.rglob("*")]:
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert stat.S_IMODE((broker.settings.data_path / "media.db").stat().st_mode) == 0o600
    assert sealed["sha256"] in await stored_blobs(broker.settings)


async def test_https_and_metrics(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    broker = media_broker(tmp_path / "data", **{"media.certfile": str(cert), "media.keyfile": str(key),
                                                "metrics.bind": "127.0.0.1:0"})
    try:
        async with connected(broker, ssl.create_default_context(cafile=str(cert))) as client:
            http = client.http
            alice, bob = add_device(broker, "alice", "phone"), add_device(broker, "bob", "phone")
            sealed = await client.upload(alice, "bob", 3 * MiB, chunk=MiB)
            status, digest, _ = await client.download(bob, sealed["url"])
            assert (status, digest) == (200, sealed["sha256"])
            async with http.head(client.base + sealed["url"].removeprefix("/v1/media"), headers=bob.auth) as r:
                assert r.headers["Cache-Control"] == "private, max-age=31536000, immutable"
                assert r.headers["ETag"] == f'"{sealed["sha256"]}"' and r.headers["Accept-Ranges"] == "bytes"
            await client.create(alice, "bob", 10**12)
        mhost, mport = broker.address("metrics")
        async with aiohttp.ClientSession() as http, http.get(f"http://{mhost}:{mport}/metrics") as r:
            scrape = await r.text()
        for line in ("chat_media_stored_bytes 3.145728e+06", "chat_media_blobs 1.0", "chat_media_uploads 0.0",
                     "chat_media_received_bytes_total 3.145728e+06", "chat_media_sent_bytes_total 3.145728e+06",
                     'chat_media_refusals_total{code="too_large"} 1.0'):
            assert line in scrape, line
        assert 'chat_background_failures_total{task="media_sweep"} 0.0' in scrape
    finally:
        broker.stop()
