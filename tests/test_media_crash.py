"""SIGKILL of the broker process in the middle of an upload: no acknowledged byte is lost, the
upload resumes from GET's offset after the restart, and the blob is byte-identical; SIGKILL after
the seal: the blob's reader and waiting device survive (bob downloads it, and his fetch deletes it).
On each backend: the local folder, and S3 (moto's server, a process of its own that outlives the
broker's; the restarted broker uses the same data directory and the same bucket)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatserver.config import build_settings
from tests.helpers import BrokerProcess, Peer
from tests.media_client import (
    Device,
    MediaClient,
    MiB,
    add_device,
    connected,
    file_bytes,
    file_digest,
    media_broker,
)
from tests.media_stores import BACKENDS, backend_settings, stored_blobs

SIZE = 40 * MiB


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    return backend_settings(request, tmp_path / "s3")


def start(data: Path, backend: dict[str, Any]) -> tuple[BrokerProcess, str]:
    broker = BrokerProcess(data, {"media.bind": "127.0.0.1:0", "media.chunk_max_bytes": 8 * MiB, **backend}).start()
    return broker, f"http://127.0.0.1:{broker.ports['media']}/v1/media"


async def test_sigkill_mid_upload_loses_no_acknowledged_byte(tmp_path: Path, backend: dict[str, Any]) -> None:
    data = tmp_path / "data"
    broker, base = start(data, backend)
    broker.add_users({"alice": "alice-pw", "bob": "bob-pw"})
    alice, bob = (device_with_token(broker, user) for user in ("alice", "bob"))
    async with aiohttp.ClientSession() as http:
        client = MediaClient(http, base)
        status, body = await client.create(alice, "bob", SIZE)
        assert status == 201
        upload = body["upload"]
        acknowledged = 0
        for start_at in (0, 8 * MiB):
            assert (await client.patch(alice, upload, start_at, start_at + 8 * MiB))[0] == 204
            acknowledged = start_at + 8 * MiB
        # A third PATCH is on its way when the process is killed.
        host, port = "127.0.0.1", broker.ports["media"]
        reader, writer = await asyncio.open_connection(host, port)
        head = (f"PATCH /v1/media/uploads/{upload} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {alice.auth['Authorization']}\r\nUpload-Offset: {acknowledged}\r\n"
                f"Content-Type: application/offset+octet-stream\r\nContent-Length: {8 * MiB}\r\n\r\n")
        writer.write(head.encode())
        for piece in file_bytes(acknowledged, acknowledged + 5 * MiB):
            writer.write(piece)
            await writer.drain()
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGKILL)
        broker.proc.wait(10)
        writer.transport.abort()
        del reader

    broker, base = start(data, backend)
    try:
        async with aiohttp.ClientSession() as http:
            client = MediaClient(http, base)
            state = await client.offset(alice, upload)
            assert acknowledged <= state["offset"] <= acknowledged + 5 * MiB and state["url"] is None
            sealed = await client.upload(alice, "bob", SIZE, start_offset=state["offset"], upload=upload)
            assert sealed["sha256"] == file_digest(SIZE)
        settings = build_settings({**json.loads(broker.config.read_text()), "data_dir": str(data)})
        assert (await stored_blobs(settings)).get(sealed["sha256"]) == SIZE  # in the bucket (s3) or the folder
    finally:
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGKILL)
        broker.proc.wait(10)

    broker, base = start(data, backend)
    try:
        async with aiohttp.ClientSession() as http:
            client = MediaClient(http, base)
            assert await client.download(bob, sealed["url"]) == (200, sealed["sha256"], SIZE)
            assert await client.fetched(bob, sealed["url"]) == 204
            assert (await client.download(bob, sealed["url"]))[0] == 410  # bob's phone was the one waited for
        assert sealed["sha256"] not in await stored_blobs(settings)
    finally:
        broker.stop()


def device_with_token(broker: BrokerProcess, user: str) -> Device:
    """``user``'s phone logged in once (a recipient from now on), with its device token."""
    peer = Peer(broker.port, user, f"{user}-pw")
    try:
        assert peer.connect() == 0
        assert peer.subscribe() == [1]
        return Device(user, "phone", peer.request("auth.token")["result"]["token"])
    finally:
        peer.close()


async def test_a_death_between_the_last_byte_and_the_seal(tmp_path: Path, backend: dict[str, Any]) -> None:
    """Every byte was made durable but the process died before the seal (hashing a large file
    takes seconds): GET after the restart seals it and names the blob, rather than saying "all
    stored" with no url, which a client could neither finish nor resume."""
    data, size = tmp_path / "data", 3 * MiB + 5
    broker = media_broker(data, **backend)
    async with connected(broker) as client:
        alice, bob = add_device(broker, "alice", "phone"), add_device(broker, "bob", "phone")
        status, body = await client.create(alice, "bob", size)
        assert status == 201
        upload = body["upload"]
        assert (await client.patch(alice, upload, 0, size - 1))[0] == 204
    broker.stop()
    staged = data / "media" / "staging" / upload
    staged.write_bytes(staged.read_bytes() + b"".join(file_bytes(size - 1, size)))  # the last byte, unsealed
    broker = media_broker(data, **backend)
    try:
        async with connected(broker) as client:
            state = await client.offset(alice, upload)
            assert state == {"offset": size, "size": size, "url": f"/v1/media/blobs/{file_digest(size)}"}
            assert await client.download(bob, state["url"]) == (200, file_digest(size), size)
            assert (await client.offset(alice, upload))["url"] == state["url"]  # sealed once
    finally:
        broker.stop()
