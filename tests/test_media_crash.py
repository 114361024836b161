"""SIGKILL of the broker process in the middle of an upload: no acknowledged byte is lost, the
upload resumes from GET's offset after the restart, and the blob is byte-identical; SIGKILL after
the seal: the blob's reader and waiting device survive (bob downloads it, and his fetch deletes it)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp

from tests.helpers import BrokerProcess, Peer
from tests.media_client import Device, MediaClient, MiB, file_bytes, file_digest

SIZE = 40 * MiB


def start(data: Path) -> tuple[BrokerProcess, str]:
    broker = BrokerProcess(data, {"media.bind": "127.0.0.1:0", "media.chunk_max_bytes": 8 * MiB}).start()
    return broker, f"http://127.0.0.1:{broker.ports['media']}/v1/media"


async def test_sigkill_mid_upload_loses_no_acknowledged_byte(tmp_path: Path) -> None:
    data = tmp_path / "data"
    broker, base = start(data)
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

    broker, base = start(data)
    try:
        async with aiohttp.ClientSession() as http:
            client = MediaClient(http, base)
            state = await client.offset(alice, upload)
            assert acknowledged <= state["offset"] <= acknowledged + 5 * MiB and state["url"] is None
            sealed = await client.upload(alice, "bob", SIZE, start_offset=state["offset"], upload=upload)
            assert sealed["sha256"] == file_digest(SIZE)
    finally:
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGKILL)
        broker.proc.wait(10)

    broker, base = start(data)
    try:
        async with aiohttp.ClientSession() as http:
            client = MediaClient(http, base)
            assert await client.download(bob, sealed["url"]) == (200, sealed["sha256"], SIZE)
            assert await client.fetched(bob, sealed["url"]) == 204
            assert (await client.download(bob, sealed["url"]))[0] == 410  # bob's phone was the one waited for
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
