"""Test side of the media endpoint: a broker with ``media.bind``, devices with tokens, and an
aiohttp client that uploads from a generator (never a whole big file in memory) and downloads
into a digest."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from chatproto import Caller
from tests.helpers import BrokerThread

MiB = 1024 * 1024
BLOCK = os.urandom(MiB)  # ciphertext-like: incompressible, no plaintext in it


def media_broker(data_dir: Path, **overrides: Any) -> BrokerThread:
    settings = {"media.bind": "127.0.0.1:0", "media.chunk_max_bytes": 8 * MiB, **overrides}
    return BrokerThread(data_dir, settings).start()


@dataclass(frozen=True)
class Device:
    user: str
    device: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        raw = f"{self.user}.{self.device}:{self.token}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def add_device(broker: BrokerThread, user: str, device: str) -> Device:
    """``user`` (made if new) with a logged-in ``device`` and its token."""
    async def make() -> str:
        users = broker.app.users
        if await users.user_devices(user) is None:
            await users.add_user(user, "x")  # no password login in these tests
        await users.record_login(user, device)
        return await broker.app.broker._auth.issue_token(user, device)

    return Device(user, device, broker.call(make()))


def create_group(broker: BrokerThread, creator: str, members: list[str]) -> str:
    groups = broker.app._groups
    assert groups is not None
    op = groups.ops()["group.create"]
    result = broker.call(op(Caller(creator, "setup"), {"name": "team", "members": members}))
    return str(result["group"])


def chunk_bytes(i: int) -> bytes:
    """The i-th MiB of the test file: unique per index, so a misplaced chunk shows."""
    return i.to_bytes(8, "big") + BLOCK[8:]


def file_bytes(start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of the test file, in pieces of at most 1 MiB."""
    pos = start
    while pos < end:
        i, off = divmod(pos, MiB)
        piece = chunk_bytes(i)[off: off + min(MiB - off, end - pos)]
        yield piece
        pos += len(piece)


def file_digest(size: int) -> str:
    digest = hashlib.sha256()
    for piece in file_bytes(0, size):
        digest.update(piece)
    return digest.hexdigest()


async def agen(pieces: Iterator[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


@contextlib.asynccontextmanager
async def connected(broker: BrokerThread, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[MediaClient]:
    """A client of ``broker``'s media endpoint (HTTPS with ``ssl_context``)."""
    host, port = broker.address("media")
    scheme = "https" if ssl_context is not None else "http"
    connector = aiohttp.TCPConnector(ssl=ssl_context) if ssl_context is not None else None
    async with aiohttp.ClientSession(connector=connector) as http:
        yield MediaClient(http, f"{scheme}://{host}:{port}/v1/media")


def charged(broker: BrokerThread) -> int:
    """Bytes charged to every user's quota now."""
    assert broker.app.media is not None
    return sum(broker.app.media.service._usage.charged.values())


class MediaClient:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def create(self, dev: Device, to: str, size: int) -> tuple[int, dict[str, Any]]:
        async with self.http.post(self.base + "/uploads", json={"size": size, "to": to}, headers=dev.auth) as r:
            return r.status, await r.json()

    async def offset(self, dev: Device, upload: str) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/uploads/{upload}", headers=dev.auth) as r:
            assert r.status == 200, await r.text()
            body: dict[str, Any] = await r.json()
            return body

    async def patch(self, dev: Device, upload: str, offset: int, end: int) -> tuple[int, dict[str, Any] | None]:
        headers = {**dev.auth, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream",
                   "Content-Length": str(end - offset)}
        async with self.http.patch(f"{self.base}/uploads/{upload}", data=agen(file_bytes(offset, end)),
                                   headers=headers) as r:
            return r.status, (await r.json() if r.status != 204 else None)

    async def upload(self, dev: Device, to: str, size: int, chunk: int = 8 * MiB, start_offset: int = 0,
                     upload: str | None = None) -> dict[str, Any]:
        if upload is None:
            status, body = await self.create(dev, to, size)
            assert status == 201, body
            upload = str(body["upload"])
        offset = start_offset
        while True:
            status, sealed = await self.patch(dev, upload, offset, min(size, offset + chunk))
            if status == 409:  # a cut PATCH's bytes landed after the GET: go on from the stored offset
                assert sealed is not None and sealed["error"] == "offset_mismatch", sealed
                offset = int(sealed["offset"])
                continue
            offset = min(size, offset + chunk)
            if status == 200:
                assert sealed is not None
                return sealed
            assert status == 204, (status, sealed)

    async def download(self, dev: Device, url: str, start: int = 0, end: int | None = None) -> tuple[int, str, int]:
        """``(status, sha256 of the body, length)`` of ``url`` from ``start`` (to ``end`` inclusive)."""
        headers = dict(dev.auth)
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        digest, length = hashlib.sha256(), 0
        async with self.http.get(self.base.removesuffix("/v1/media") + url, headers=headers) as r:
            if r.status in (200, 206):
                async for piece in r.content.iter_chunked(MiB):
                    digest.update(piece)
                    length += len(piece)
            return r.status, digest.hexdigest(), length

    async def fetched(self, dev: Device, url: str) -> int:
        async with self.http.post(self.base.removesuffix("/v1/media") + url + "/fetched", headers=dev.auth) as r:
            return r.status

    async def cut_patch(self, address: tuple[str, int], dev: Device, upload: str, offset: int, length: int,
                        send: int) -> None:
        """A PATCH declaring ``length`` bytes whose connection closes after ``send`` of them."""
        reader, writer = await asyncio.open_connection(*address)
        head = (f"PATCH /v1/media/uploads/{upload} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {dev.auth['Authorization']}\r\nUpload-Offset: {offset}\r\n"
                f"Content-Type: application/offset+octet-stream\r\nContent-Length: {length}\r\n\r\n")
        writer.write(head.encode())
        for piece in file_bytes(offset, offset + send):
            writer.write(piece)
            await writer.drain()
        writer.transport.abort()
        del reader
