"""The media sweep and what it frees (abandoned uploads, expired blobs, removed devices), and bad
requests, concurrent and fuzzed, that must neither crash the broker nor stop the sweep."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

from tests.helpers import Peer
from tests.media_client import Device, MiB, add_device, charged, connected, media_broker

FAST = {"media.sweep_s": 0.05, "media.upload_ttl_s": 0.5, "media.ttl_days": 1.5 / 86_400}  # 1.5 s


async def wait_for(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    for _ in range(int(within / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within {within}s")


async def test_sweep_frees_abandoned_uploads_and_expired_blobs(tmp_path: Path) -> None:
    broker = media_broker(tmp_path / "data", **FAST)
    try:
        async with connected(broker) as client:
            alice = add_device(broker, "alice", "phone")
            add_device(broker, "bob", "phone")
            _, body = await client.create(alice, "bob", 2 * MiB)
            assert (await client.patch(alice, body["upload"], 0, MiB))[0] == 204
            staging = broker.settings.data_path / "media" / "staging" / body["upload"]
            assert staging.exists()
            await wait_for(lambda: charged(broker) == 0, "abandoned upload freed")
            assert not staging.exists()
            async with client.http.get(f"{client.base}/uploads/{body['upload']}", headers=alice.auth) as r:
                assert r.status == 404
            sealed = await client.upload(alice, "bob", MiB)
            assert charged(broker) == MiB
            await wait_for(lambda: charged(broker) == 0, "expired blob freed")
            assert (await client.download(alice, sealed["url"]))[0] == 410
            assert not list((broker.settings.data_path / "media" / "blobs").rglob(sealed["sha256"]))
    finally:
        broker.stop()


async def test_a_removed_device_is_not_waited_for(tmp_path: Path) -> None:
    broker = media_broker(tmp_path / "data")
    try:
        async with connected(broker) as client:
            alice = add_device(broker, "alice", "phone")
            bob, _ = add_device(broker, "bob", "phone"), add_device(broker, "bob", "laptop")
            sealed = await client.upload(alice, "bob", MiB)
            assert await client.fetched(bob, sealed["url"]) == 204
            assert charged(broker) == MiB  # bob's laptop has not fetched
            peer = Peer(broker.port, "bob", bob.token, device="phone")
            try:
                assert peer.connect() == 0 and peer.subscribe() == [1]
                assert peer.request("devices.remove", {"device": "laptop"})["ok"]
            finally:
                peer.close()
            await wait_for(lambda: charged(broker) == 0, "blob deleted once the last waited device is removed")
            assert (await client.download(bob, sealed["url"]))[0] == 410
    finally:
        broker.stop()


def fuzz_requests(rng: random.Random, dev: Device, upload: str) -> list[bytes]:
    auth = dev.auth["Authorization"]
    paths = [f"/v1/media/uploads/{upload}", "/v1/media/uploads", "/v1/media/blobs/" + "a" * 64,
             "/v1/media/blobs/../../etc/passwd", "/v1/media/uploads/%2e%2e", "/v1/media/blobs/x/fetched", "/"]
    methods = ["GET", "POST", "PATCH", "PUT", "DELETE", "HEAD", "X" * 300]
    made = []
    for _ in range(120):
        headers = [f"Authorization: {rng.choice([auth, 'Basic ' + 'A' * rng.randint(0, 9000), 'Basic', ''])}",
                   f"Upload-Offset: {rng.choice(['0', '-1', '99999999999999999999999', 'x', str(rng.randint(0, 9))])}",
                   f"Content-Type: {rng.choice(['application/offset+octet-stream', 'application/json', ''])}",
                   f"Range: {rng.choice(['bytes=0-', 'bytes=-0', 'bytes=5-1', 'bytes=0-1,2-3', 'items=1', ''])}"]
        body = rng.randbytes(rng.randint(0, 3000))
        length = rng.choice([str(len(body)), str(len(body) + 10), "-5", "abc", str(10**30)])
        head = (f"{rng.choice(methods)} {rng.choice(paths)} HTTP/1.1\r\nHost: x\r\n" + "\r\n".join(headers)
                + f"\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n")
        made.append(head.encode() + body)
        made.append(rng.randbytes(rng.randint(1, 2000)))  # not HTTP at all
    return made


async def send_raw(address: tuple[str, int], raw: bytes) -> None:
    try:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(raw)
        await writer.drain()
        await asyncio.wait_for(reader.read(65536), 1)
        writer.close()
    except (ConnectionError, TimeoutError):
        pass  # the server may close on garbage: that is fine, crashing is not


async def test_fuzzed_concurrent_bad_requests_never_stop_the_endpoint(tmp_path: Path) -> None:
    broker = media_broker(tmp_path / "data", **{"media.sweep_s": 0.05})
    try:
        address = broker.address("media")
        async with connected(broker) as client:
            alice = add_device(broker, "alice", "phone")
            add_device(broker, "bob", "phone")
            _, body = await client.create(alice, "bob", MiB)
            requests = fuzz_requests(random.Random(19), alice, body["upload"])
            for start in range(0, len(requests), 40):
                await asyncio.gather(*(send_raw(address, raw) for raw in requests[start:start + 40]))
            # Concurrent PATCHes of one upload: one writes, the others are told the offset. (A new
            # upload: a fuzzed DELETE may have deleted the first.)
            _, body = await client.create(alice, "bob", MiB)
            results = await asyncio.gather(*(client.patch(alice, body["upload"], 0, MiB // 2) for _ in range(5)))
            assert sorted(status for status, _ in results).count(204) >= 1
            state = await client.offset(alice, body["upload"])
            sealed = await client.upload(alice, "bob", MiB, start_offset=state["offset"], upload=body["upload"])
            assert len(sealed["sha256"]) == 64
        assert broker.call(broker.app.readiness()) == []
        assert broker.app.media is not None
        loops = broker.app.media.service._loops
        assert loops and not any(task.done() for task in loops)
    finally:
        broker.stop()
