"""The media endpoint against clients that hold connections open (slowloris) through the real
broker over loopback: a head that never ends, a body that stops coming, a download nobody reads,
and more connections than ``media.max_connections``. Each is closed within
``media.idle_timeout_s``; what a stalled PATCH delivered is kept; others are served meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from tests.helpers import BrokerThread
from tests.media_client import MiB, add_device, connected, file_bytes, media_broker

IDLE_S = 0.5
WITHIN_S = 10.0  # a generous bound on "closed soon after the idle timeout" on a loaded machine


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    b = media_broker(tmp_path / "data", **{"media.idle_timeout_s": IDLE_S, "media.max_connections": 3})
    yield b
    b.stop()


async def closed_by_server(reader: asyncio.StreamReader) -> float:
    """Seconds until the server closes the connection (everything it sent is read and dropped)."""
    started = time.monotonic()
    async with asyncio.timeout(WITHIN_S):
        while await reader.read(65536):
            pass
    return time.monotonic() - started


async def test_a_head_that_never_ends_is_closed(broker: BrokerThread) -> None:
    reader, writer = await asyncio.open_connection(*broker.address("media"))
    writer.write(b"GET /v1/media/blobs/x HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    assert await closed_by_server(reader) >= IDLE_S * 0.8
    writer.close()


async def test_a_stalled_patch_is_closed_and_keeps_what_arrived(broker: BrokerThread) -> None:
    alice = add_device(broker, "alice", "phone")
    add_device(broker, "bob", "phone")
    async with connected(broker) as client:
        upload = (await client.create(alice, "bob", 4 * MiB))[1]["upload"]
        reader, writer = await asyncio.open_connection(*broker.address("media"))
        head = (f"PATCH /v1/media/uploads/{upload} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {alice.auth['Authorization']}\r\nUpload-Offset: 0\r\n"
                f"Content-Type: application/offset+octet-stream\r\nContent-Length: {4 * MiB}\r\n\r\n")
        writer.write(head.encode() + b"".join(file_bytes(0, MiB)))
        await writer.drain()  # 1 of 4 MiB, then silence
        await closed_by_server(reader)
        writer.close()
        assert (await client.offset(alice, upload))["offset"] == MiB  # resumable from there
        sealed = await client.upload(alice, "bob", 4 * MiB, start_offset=MiB, upload=upload)
        assert sealed["size"] == 4 * MiB


async def test_a_download_nobody_reads_is_closed(broker: BrokerThread) -> None:
    alice, bob = add_device(broker, "alice", "phone"), add_device(broker, "bob", "phone")
    size = 48 * MiB  # far more than the socket buffers of both ends hold
    async with connected(broker) as client:
        url = (await client.upload(alice, "bob", size))["url"]
        reader, writer = await asyncio.open_connection(*broker.address("media"), limit=2**20)
        transport = cast(asyncio.Transport, writer.transport)
        writer.write((f"GET {url} HTTP/1.1\r\nHost: x\r\nAuthorization: {bob.auth['Authorization']}\r\n\r\n")
                     .encode())
        await writer.drain()
        transport.pause_reading()  # nothing read: the server's writes stop making progress
        await asyncio.sleep(IDLE_S * 4)  # a stall on purpose: the condition under test is time passing
        transport.resume_reading()
        got = 0
        async with asyncio.timeout(WITHIN_S):
            while chunk := await reader.read(2**20):
                got += len(chunk)
        assert got < size, "the server gave up on the reader rather than sending everything"
        writer.close()
        assert (await client.download(bob, url))[0] == 200  # the next reader is served


async def test_connections_beyond_the_cap_are_closed_at_once(broker: BrokerThread) -> None:
    address = broker.address("media")
    held = [await asyncio.open_connection(*address) for _ in range(3)]
    reader, writer = await asyncio.open_connection(*address)
    assert await closed_by_server(reader) < IDLE_S  # before the idle timeout could have closed it
    writer.close()
    # The held ones send nothing: the idle timeout closes them (the server forgets each before its
    # FIN leaves), and there is room again.
    for held_reader, held_writer in held:
        await closed_by_server(held_reader)
        held_writer.close()
    alice = add_device(broker, "alice", "phone")
    add_device(broker, "bob", "phone")
    async with connected(broker) as client:
        assert (await client.create(alice, "bob", 10))[0] == 201
