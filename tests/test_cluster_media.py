"""Media in cluster mode (docs/MEDIA.md, "Cluster mode"): two broker nodes on the session's Redis
Cluster, blobs and upload stagings in S3 (moto's server on loopback), SDK clients. alice's upload
through node A is cut and resumed through node B (a proxy re-pointed at B: a load balancer choosing
another node); bob downloads through node B; the blob goes after the last recipient device fetched
it through B; a stranger is refused; the quota is one for the user whichever node is asked. A group
upload is stored once and expired once by the sweeps of both nodes; a node SIGKILLed mid-upload
loses no acknowledged byte: the other node finishes the upload. The limits are the cluster's: a flood
split across both nodes passes the user's burst once, the minimum charge of node A's files counts on
node B, an upload is deleted (its charge and its staging freed) and found by its Idempotency-Key
through either node, and a GET on node B seals what node A stored whole but died before sealing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.media.core import user_shard
from client_sdk import Client, MediaError
from client_sdk.mediabody import parse_media_body
from client_sdk.mediacrypto import ciphertext_size
from testkit.proxy import TcpProxy
from testkit.redis_cluster import RedisCluster
from testkit.s3_server import S3Server
from tests.deployment import ClusterDeployment
from tests.helpers import WAIT_S, BrokerProcess, BrokerThread
from tests.media_client import MediaClient, MiB, add_device, file_bytes, file_digest
from tests.media_stores import s3_config
from tests.sdk.conftest import Collector, LogWatch
from tests.sdk.test_media_sdk import big_file, file_sha, media_client, media_message, stored_blob
from tests.test_cluster import add_users
from tests.test_media_crash import device_with_token

SIZE = 12 * MiB
QUOTA = 20 * MiB


@pytest.fixture
def two(tmp_path: Path, redis_cluster: RedisCluster, s3_server: S3Server) -> Iterator[ClusterDeployment]:
    s3 = s3_config(s3_server, tmp_path / "s3")
    deployment = ClusterDeployment(tmp_path / "cluster", redis_cluster, {
        "media.bind": "127.0.0.1:0", "media.chunk_max_bytes": 2 * MiB, "media.quota_bytes": QUOTA,
        "media.backend": "s3", "media.s3": s3}, nodes=2).start()
    deployment.add_users({name: f"{name}-pw" for name in ("alice", "bob", "carol")})
    deployment.s3 = {"media.s3": s3}  # type: ignore[attr-defined]  # for stored_blob
    yield deployment
    deployment.stop()


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[Callable[..., Collector]]:
    made: list[Client] = []

    def online(user: str, device: str, node: BrokerThread, media_port: int) -> Collector:
        return media_client(made, user, device, node.port, media_port, tmp_path / f"{user}.{device}.db")

    yield online
    for client in made:
        client.close()


class MoveOnCut:
    """A progress callback: once ``at`` bytes are sent, the proxy's live connection is reset and new
    ones go to ``port`` (another node) -- again every MiB until the SDK logged a cut."""

    def __init__(self, proxy: TcpProxy, at: int, port: int, watch: LogWatch) -> None:
        self.proxy, self.at, self.port, self.watch = proxy, at, port, watch
        self.cut_at: int | None = None
        self.seen: list[int] = []

    def __call__(self, done: int, total: int) -> None:
        self.seen.append(done)
        again = self.cut_at is not None and self.watch.count == 0 and done >= self.cut_at + MiB
        if (self.cut_at is None and done >= self.at) or again:
            self.cut_at = done
            self.proxy.target_port = self.port
            self.proxy.cut("refuse")
            self.proxy.restore()


def received(node: BrokerThread) -> int:
    assert node.app.media is not None
    return int(node.app.media.service.counters.bytes_in)


def test_an_upload_cut_on_one_node_resumes_on_another_and_the_blob_lives_until_the_last_fetch(
        two: ClusterDeployment, clients: Callable[..., Collector], tmp_path: Path) -> None:
    a, b = two.nodes
    port_a, port_b = a.address("media")[1], b.address("media")[1]
    proxy = TcpProxy(port_a).start()
    try:
        alice = clients("alice", "phone", a, proxy.port)
        laptop = clients("alice", "laptop", b, port_b)
        bob = clients("bob", "phone", b, port_b)
        carol = clients("carol", "phone", a, port_a)
        source = tmp_path / "video.mp4"
        want = big_file(source, SIZE)
        total = ciphertext_size(SIZE)
        with LogWatch("client_sdk.media", "network: PATCH") as cut:
            move = MoveOnCut(proxy, total // 2, port_b, cut)
            alice.client.send_media("bob", source, progress=move)
        assert cut.count >= 1, "the upload was cut"
        assert min(move.seen[move.seen.index(move.cut_at or 0) + 1:]) >= total // 2 - 2 * MiB, \
            "resumed from the offset node B read, not from 0"
        assert received(a) >= total // 2 - 2 * MiB and received(b) >= total // 2 - 2 * MiB, "both nodes took part"
        message = media_message(bob)
        sha = parse_media_body(message.body).sha256
        blob = stored_blob(a, two.s3, sha)  # type: ignore[attr-defined]
        assert blob is not None and len(blob) == total
        del blob

        with pytest.raises(MediaError) as stranger:  # carol is no reader: the blob does not exist for her
            carol.client.download_media(message.body, tmp_path / "carol.mp4")
        assert (stranger.value.code, stranger.value.status) == ("not_found", 404)
        with pytest.raises(MediaError) as over:  # node B knows what node A charged
            laptop.client.send_media("carol", source)
        assert (over.value.code, over.value.status) == ("quota_exceeded", 413)
        assert "quota" in str(over.value)

        bob.client.download_media(message, tmp_path / "bob.mp4")
        assert file_sha(tmp_path / "bob.mp4") == want
        assert stored_blob(a, two.s3, sha) is not None, "alice's laptop has not fetched it yet"  # type: ignore[attr-defined]
        laptop.client.download_media(message.body, tmp_path / "laptop.mp4")
        assert file_sha(tmp_path / "laptop.mp4") == want
        assert stored_blob(a, two.s3, sha) is None, "deleted after the last recipient device's fetch"  # type: ignore[attr-defined]
        with pytest.raises(MediaError) as gone:
            bob.client.download_media(message, tmp_path / "again.mp4")
        assert gone.value.code == "gone"
        # The quota is free again, on either node.
        laptop.client.send_media("carol", source)
        assert file_sha(source) == want
    finally:
        proxy.stop()


@pytest.fixture
def short_lived(tmp_path: Path, redis_cluster: RedisCluster, s3_server: S3Server) -> Iterator[ClusterDeployment]:
    """Blobs live 0.5 s (``media.ttl_days``) and every node sweeps every 0.1 s."""
    s3 = s3_config(s3_server, tmp_path / "s3")
    deployment = ClusterDeployment(tmp_path / "cluster", redis_cluster, {
        "media.bind": "127.0.0.1:0", "media.quota_bytes": QUOTA, "media.ttl_days": 0.5 / 86_400,
        "media.sweep_s": 0.1, "media.backend": "s3", "media.s3": s3}, nodes=2).start()
    deployment.add_users({name: f"{name}-pw" for name in ("alice", "bob", "carol")})
    deployment.s3 = {"media.s3": s3}  # type: ignore[attr-defined]
    yield deployment
    deployment.stop()


def test_a_group_upload_is_stored_once_and_every_node_sweeps_expired_blobs(
        short_lived: ClusterDeployment, clients: Callable[..., Collector], tmp_path: Path) -> None:
    a, b = short_lived.nodes
    port_a, port_b = a.address("media")[1], b.address("media")[1]
    alice = clients("alice", "phone", a, port_a)
    bob, carol = clients("bob", "phone", b, port_b), clients("carol", "phone", a, port_a)
    group = alice.client.create_group("team", ["bob", "carol"]).group
    source = tmp_path / "big.bin"
    big_file(source, QUOTA - MiB)  # most of the quota
    alice.client.send_media(group, source)
    for member in (bob, carol):
        message = media_message(member)
        assert message.group == group
    sha = parse_media_body(message.body).sha256
    # Nobody fetched it: the ttl sweep of whichever node comes first deletes it, once, and frees the quota.
    deadline = time.monotonic() + WAIT_S
    while stored_blob(a, short_lived.s3, sha) is not None:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the expired blob was not deleted"
        time.sleep(0.05)
    with pytest.raises(MediaError) as gone:
        bob.client.download_media(message, tmp_path / "late.bin")
    assert gone.value.code == "gone"
    while any(node.app.media.service.counters.stored_bytes for node in (a, b)):  # each node reads the totals
        assert time.monotonic() < deadline, "the nodes' figures never came back to 0 (deleted twice, or never)"
        time.sleep(0.05)
    alice.client.send_media("bob", source)  # the quota was freed, once


async def test_a_node_sigkilled_mid_upload_loses_no_acknowledged_byte_and_another_node_finishes_it(
        tmp_path: Path, redis_cluster: RedisCluster, s3_server: S3Server) -> None:
    """Nodes as their own processes: node A is SIGKILLed while a third PATCH streams in; node B reads the
    offset A acknowledged (the staging is in the bucket), takes the rest, and serves the blob."""
    prefix = f"m{uuid.uuid4().hex[:10]}:"
    await add_users(redis_cluster, prefix, ("alice", "bob"))
    base: dict[str, Any] = {
        "cluster.redis": [f"127.0.0.1:{port}" for _, port in redis_cluster.startup_nodes],
        "cluster.key_prefix": prefix, "cluster.lease_s": 2.0, "media.bind": "127.0.0.1:0",
        "media.chunk_max_bytes": 8 * MiB, "media.backend": "s3", "media.s3": s3_config(s3_server, tmp_path / "s3")}
    procs = [BrokerProcess(tmp_path / f"n{n}", {**base, "cluster.node_id": f"n{n}"}).start() for n in range(2)]
    a, b = procs
    size = 24 * MiB
    try:
        alice, bob = device_with_token(a, "alice"), device_with_token(b, "bob")
        async with aiohttp.ClientSession() as http:
            on_a = MediaClient(http, f"http://127.0.0.1:{a.ports['media']}/v1/media")
            on_b = MediaClient(http, f"http://127.0.0.1:{b.ports['media']}/v1/media")
            status, body = await on_a.create(alice, "bob", size)
            assert status == 201
            upload = body["upload"]
            for start_at in (0, 8 * MiB):
                assert (await on_a.patch(alice, upload, start_at, start_at + 8 * MiB))[0] == 204
            acknowledged = 16 * MiB
            _, writer = await asyncio.open_connection("127.0.0.1", a.ports["media"])
            writer.write((f"PATCH /v1/media/uploads/{upload} HTTP/1.1\r\nHost: x\r\n"
                          f"Authorization: {alice.auth['Authorization']}\r\nUpload-Offset: {acknowledged}\r\n"
                          f"Content-Type: application/offset+octet-stream\r\nContent-Length: {8 * MiB}\r\n\r\n"
                          ).encode())
            for piece in file_bytes(acknowledged, acknowledged + 5 * MiB):
                writer.write(piece)
                await writer.drain()
            assert a.proc is not None
            os.kill(a.proc.pid, signal.SIGKILL)
            a.proc.wait(WAIT_S)
            a.proc = None
            writer.transport.abort()

            state = await on_b.offset(alice, upload)
            assert acknowledged <= state["offset"] <= acknowledged + 5 * MiB and state["url"] is None
            sealed = await on_b.upload(alice, "bob", size, start_offset=state["offset"], upload=upload)
            assert sealed["sha256"] == file_digest(size)
            assert await on_b.download(bob, sealed["url"]) == (200, sealed["sha256"], size)
            assert await on_b.fetched(bob, sealed["url"]) == 204
            assert (await on_b.download(bob, sealed["url"]))[0] == 410
    finally:
        for proc in procs:
            proc.stop()


# --- the limits of docs/MEDIA.md, shared by the nodes --------------------------------------------

KiB = 1024
MIN = 64 * KiB  # media.min_charge_bytes by default
BURST = 12


@pytest.fixture
def limited(tmp_path: Path, redis_cluster: RedisCluster, s3_server: S3Server) -> Iterator[ClusterDeployment]:
    s3 = s3_config(s3_server, tmp_path / "s3")
    deployment = ClusterDeployment(tmp_path / "cluster", redis_cluster, {
        "media.bind": "127.0.0.1:0", "media.quota_bytes": 16 * MIN, "media.uploads_burst": BURST,
        "media.uploads_per_minute": 1, "media.max_uploads": 100, "media.backend": "s3", "media.s3": s3},
        nodes=2).start()
    deployment.s3 = s3  # type: ignore[attr-defined]
    yield deployment
    deployment.stop()


def charged_to(node: BrokerThread, user: str) -> int:
    """Bytes charged to ``user``'s quota in the shared store (uploads in progress and live blobs)."""
    assert node.app.media is not None
    store = node.app.media.service._store
    key = store.key("muq", f"mu{user_shard(user)}")
    return sum(int(v or 0) for v in node.call(store.command("test.charged", "HMGET", key, f"{user}:u", f"{user}:b")))


def staged_keys(s3: dict[str, str], upload: str) -> int:
    """Objects of the upload's staging in the bucket (moto on loopback checks no auth)."""
    url = f"{s3['endpoint_url']}/{s3['bucket']}?list-type=2&prefix={s3['prefix']}staging/{upload}/"
    with urllib.request.urlopen(url, timeout=30) as answer:
        return int(answer.read().count(b"<Key>"))


@contextlib.asynccontextmanager
async def on_both(limited: ClusterDeployment) -> AsyncIterator[tuple[MediaClient, MediaClient]]:
    async with aiohttp.ClientSession() as http:
        yield tuple(MediaClient(http, f"http://127.0.0.1:{node.address('media')[1]}/v1/media")  # type: ignore[misc]
                    for node in limited.nodes)


async def test_a_flood_split_across_nodes_passes_the_shared_burst_and_the_min_charge_counts_everywhere(
        limited: ClusterDeployment) -> None:
    a, b = limited.nodes
    alice, carol = add_device(a, "alice", "phone"), add_device(a, "carol", "phone")
    add_device(a, "bob", "phone")
    async with on_both(limited) as (on_a, on_b):
        made = await asyncio.gather(*((on_a, on_b)[n % 2].create(alice, "bob", 1) for n in range(40)))
        # One bucket for both nodes: a bucket per node would have passed twice the burst.
        assert sorted(status for status, _ in made) == [201] * BURST + [429] * (40 - BURST)
        assert {body["error"] for status, body in made if status == 429} == {"rate_limited"}
        assert charged_to(b, "alice") == BURST * MIN  # 1-byte files, charged the minimum each
        async with on_b.http.post(on_b.base + "/uploads", json={"size": 1, "to": "bob"}, headers=alice.auth) as r:
            assert (r.status, r.headers["Retry-After"]) == (429, "60")
        # The minimum charge on node A counts on node B: 10 files of 8 bytes hold 10 * MIN of 16 * MIN.
        for _ in range(10):
            assert (await on_a.create(carol, "bob", 8))[0] == 201
        status, body = await on_b.create(carol, "bob", 6 * MIN + 1)
        assert (status, body["error"]) == (413, "quota_exceeded") and f"({10 * MIN} in use)" in body["detail"]
        assert (await on_b.create(carol, "bob", 6 * MIN))[0] == 201
        status, body = await on_a.create(carol, "bob", 8)
        assert (status, body["error"]) == (413, "quota_exceeded") and f"at least {MIN} per file" in body["detail"]
        assert charged_to(a, "carol") == 16 * MIN


async def test_delete_on_another_node_frees_the_quota_and_the_staging(limited: ClusterDeployment) -> None:
    a, _ = limited.nodes
    alice, bob = add_device(a, "alice", "phone"), add_device(a, "bob", "phone")
    async with on_both(limited) as (on_a, on_b):
        upload = (await on_a.create(alice, "bob", 15 * MIN))[1]["upload"]
        assert (await on_a.patch(alice, upload, 0, 4 * MIN))[0] == 204
        assert staged_keys(limited.s3, upload) >= 1  # type: ignore[attr-defined]
        assert (await on_b.create(alice, "bob", 2 * MIN))[0] == 413
        async with on_b.http.delete(f"{on_b.base}/uploads/{upload}", headers=bob.auth) as r:
            assert r.status == 404  # not bob's
        async with on_b.http.delete(f"{on_b.base}/uploads/{upload}", headers=alice.auth) as r:
            assert r.status == 204
        assert staged_keys(limited.s3, upload) == 0  # type: ignore[attr-defined]
        assert charged_to(a, "alice") == 0
        assert (await on_a.patch(alice, upload, 4 * MIN, 5 * MIN))[0] == 404
        async with on_a.http.get(f"{on_a.base}/uploads/{upload}", headers=alice.auth) as r:
            assert r.status == 404
        status, body = await on_b.create(alice, "bob", 15 * MIN)
        assert status == 201  # the quota is whole again
        sealed = await on_b.upload(alice, "bob", 15 * MIN, upload=body["upload"])
        async with on_a.http.delete(f"{on_a.base}/uploads/{body['upload']}", headers=alice.auth) as r:
            answer = await r.json()
            assert (r.status, answer["error"], answer["url"]) == (409, "sealed", sealed["url"])


async def test_an_idempotency_key_repeated_on_another_node_answers_the_same_upload(limited: ClusterDeployment) -> None:
    a, b = limited.nodes
    alice = add_device(a, "alice", "phone")
    add_device(a, "bob", "phone")
    key = {**alice.auth, "Idempotency-Key": "k" * 32}
    async with on_both(limited) as (on_a, on_b):
        async with on_a.http.post(on_a.base + "/uploads", json={"size": 4 * MIN, "to": "bob"}, headers=key) as r:
            assert r.status == 201
            upload = (await r.json())["upload"]
        assert (await on_a.patch(alice, upload, 0, MIN))[0] == 204
        answers = await asyncio.gather(*(on_b.http.post(on_b.base + "/uploads", json={"size": 4 * MIN, "to": "bob"},
                                                        headers=key) for _ in range(3)))
        for r in answers:
            answer = await r.json()
            assert (r.status, answer["upload"], answer["offset"]) == (201, upload, MIN)
            r.release()
        assert charged_to(b, "alice") == 4 * MIN  # charged once
        async with on_b.http.post(on_b.base + "/uploads", json={"size": MIN, "to": "bob"}, headers=key) as r:
            assert (r.status, (await r.json())["error"]) == (400, "bad_request")
        sealed = await on_b.upload(alice, "bob", 4 * MIN, start_offset=MIN, upload=upload)
        async with on_a.http.post(on_a.base + "/uploads", json={"size": 4 * MIN, "to": "bob"}, headers=key) as r:
            answer = await r.json()
            assert (r.status, answer["error"], answer["url"]) == (409, "sealed", sealed["url"])


async def test_an_upload_stored_whole_but_unsealed_is_sealed_by_a_get_on_another_node(
        limited: ClusterDeployment) -> None:
    a, _ = limited.nodes
    alice, bob = add_device(a, "alice", "phone"), add_device(a, "bob", "phone")
    assert a.app.media is not None
    service = a.app.media.service

    async def died(upload: object) -> str:
        raise ConnectionError("node A died between the last byte and the seal")

    service._seal = died  # type: ignore[method-assign]
    async with on_both(limited) as (on_a, on_b):
        upload = (await on_a.create(alice, "bob", 2 * MIN))[1]["upload"]
        headers = {**alice.auth, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        async with on_a.http.patch(f"{on_a.base}/uploads/{upload}", data=b"".join(file_bytes(0, 2 * MIN)),
                                   headers=headers) as r:
            assert r.status not in (200, 204)  # every byte stored, no seal
        state = await on_b.offset(alice, upload)
        assert state["offset"] == 2 * MIN and state["url"] is not None
        assert (await on_b.download(bob, state["url"]))[1:] == (file_digest(2 * MIN), 2 * MIN)
        assert (await on_a.offset(alice, upload))["url"] == state["url"]  # sealed once
        assert charged_to(a, "alice") == 2 * MIN  # now the blob's
