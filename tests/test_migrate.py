"""``chat-broker migrate`` (chatserver/migrate.py): a data folder made by a real single-node broker
(users, devices with a token, published and claimed keys, plain and olm messages staged for offline
devices, a placeholder queue, receipts, a delivered flag, dedup marks) moved into the real Redis
Cluster, then checked through the Redis stores; run twice, resumed after a failure, refused while
the broker holds the folder, and a dry run that writes nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.cluster.store import MessageEntry, MessageRef, Stage, StageStatus
from bridge.keys.core import OneTimeKey, Publish
from bridge.messaging.records import SEQ_SPAN
from bridge.push.cluster_store import Arrival
from bridge.push.provider import PushTarget
from bridge.store import StoreError
from broker import credentials
from chatproto import MsgItem
from chatserver import migrate as migration
from chatserver.cli import main
from chatserver.data_dir import BrokerLock, DataDirInUseError
from storage.redis.keys import RedisKeyStore
from storage.redis.presence import RedisPresenceStore
from storage.redis.push import RedisPushStore
from storage.redis.queues import RedisQueueStore
from storage.redis.users import RedisUserStore
from storage.sqlite.keys import SqliteKeyStore
from storage.sqlite.messages import SqliteMessageStore
from storage.sqlite.push import SqlitePushStore
from storage.sqlite.users import SECRET_FILE, SqliteUserStore
from testkit.redis_cluster import RedisCluster
from tests.helpers import BrokerThread, Peer, register_offline
from tests.test_olm_routing import FOR_BOB, ack, connect, is_msg, is_receipt, publish_keys, send_olm, until_fence

FALLBACK = {"id": "FB", "key": "ZmFsbGJhY2s", "signature": "c2ln"}
MORE_KEYS = {"k2": {"key": "azI", "signature": "c2ln"}, "k3": {"key": "azM", "signature": "c2ln"}}


@dataclass(frozen=True)
class Folder:
    path: Path
    token: str  # alice.phone's device token


def build_folder(path: Path) -> Folder:
    """A single-node broker's data folder with something of everything (see the module doc)."""
    broker = BrokerThread(path).start()
    peers: list[Peer] = []
    try:
        broker.add_users({name: f"{name}-pw" for name in ("alice", "bob", "carol", "dave")})
        p = {cid: connect(broker.port, peers, cid.partition(".")[0], cid.partition(".")[2])
             for cid in [*FOR_BOB, "alice.phone"]}
        for peer in p.values():
            publish_keys(peer)  # one-time key k1 each
        res = p["bob.phone"].request("keys.publish", {"one_time_keys": MORE_KEYS, "fallback_key": FALLBACK})
        assert res["ok"] is True, res
        alice = p["alice.phone"]
        claim = alice.request("keys.claim", {"user": "bob", "devices": ["phone"]})
        assert claim["result"]["devices"]["phone"]["id"] == "k1", claim
        token = alice.request("auth.token")["result"]["token"]
        assert p["bob.phone"].request("privacy.set", {"last_seen": "nobody"})["ok"] is True
        assert alice.request("contacts.add", {"users": ["bob", "carol"]})["ok"] is True
        alice.publish("u/alice/hb", {})  # a foreground heartbeat: alice has a last-seen time
        for cid in FOR_BOB:
            p[cid].close()
        alice.publish("u/alice/out", {"id": "p1", "to": "bob", "body": "hello 1"})
        alice.publish("u/alice/out", {"id": "p2", "to": "bob", "body": "hello 2 ✓"})
        send_olm(alice, "bob", "o1", FOR_BOB)
        alice.publish("u/alice/out", {"id": "c1", "to": "carol", "body": "for later"})  # no device: placeholder
        dave = connect(broker.port, peers, "dave")
        alice.publish("u/alice/out", {"id": "d1", "to": "dave", "body": "gone"})
        for msg_id in ("p1", "p2", "o1", "c1", "d1"):
            alice.expect(is_receipt("sent", msg_id))
        ack(dave, dave.expect(is_msg("d1"))["seq"])  # delivered and forgotten: a bare dedup mark
        phone = connect(broker.port, peers, "bob", "phone")
        ack(phone, phone.expect(is_msg("p1"))["seq"])  # p1 delivered; bob.laptop still holds it
        alice.expect(is_receipt("delivered", "p1"))
        until_fence(phone)
        alice.close()
        by_token = Peer(broker.port, "alice", str(token), device="phone")  # a login with the device token
        peers.append(by_token)
        assert by_token.connect() == 0
    finally:
        for peer in peers:
            peer.close()
        broker.stop()
    return Folder(path, str(token))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Folder:
    return build_folder(tmp_path_factory.mktemp("migrate") / "data")


@dataclass
class Cluster:
    users: RedisUserStore
    keys: RedisKeyStore
    queues: RedisQueueStore
    prefix: str
    nodes: list[tuple[str, int]]

    async def snapshot(self) -> dict[str, Any]:
        """Every key of this prefix (without it) with its value, but scripts' short-lived replies."""
        client: Any = self.queues._client  # the store's own connection (redis-py's async types are loose)
        found: dict[str, Any] = {}
        async for key in client.scan_iter(match=f"{self.prefix}*", count=1000):
            name = str(key)[len(self.prefix):]
            kind = await client.type(key)
            if name.startswith("qr:"):
                continue
            if kind == "hash":
                value: Any = await client.hgetall(key)
            elif kind == "zset":
                value = await client.zrange(key, 0, -1, withscores=True)
            elif kind == "list":
                value = await client.lrange(key, 0, -1)
            elif kind == "set":
                value = sorted(await client.smembers(key))
            else:
                value = (await client.get(key), await client.execute_command("PEXPIRETIME", key))
            found[name] = value
        return found


async def open_cluster(redis_cluster: RedisCluster) -> Cluster:
    prefix = f"m{uuid.uuid4().hex[:10]}:"
    nodes = redis_cluster.startup_nodes
    return Cluster(await RedisUserStore.open(nodes, prefix), await RedisKeyStore.open(nodes, prefix),
                   await RedisQueueStore.open(nodes, prefix), prefix, nodes)


@pytest.fixture
async def cluster(redis_cluster: RedisCluster) -> AsyncIterator[Cluster]:
    stores = await open_cluster(redis_cluster)
    try:
        yield stores
    finally:
        for store in (stores.users, stores.keys, stores.queues):
            await store.close()


async def run(folder: Folder, cluster: Cluster, dry_run: bool = False) -> tuple[migration.Report, list[str]]:
    lines: list[str] = []
    report = await migration.migrate(folder.path, cluster.nodes, cluster.prefix, dry_run=dry_run, say=lines.append)
    return report, lines


async def sqlite_queues(path: Path) -> dict[str, list[tuple[str, ...]]]:
    """Each device's staged items in the data folder, in seq order: (msg, sender/id, body) or
    (receipt, status, ids)."""
    store = await SqliteMessageStore.open(path)
    try:
        _, items, _ = await store.load(0)
        plain = await store.bodies([i.message.mid for i in items if i.message and not i.message.olm])
        olm = await store.item_bodies([(i.device, i.seq) for i in items if i.message and i.message.olm])
    finally:
        await store.close()
    queues: dict[str, list[tuple[str, ...]]] = {}
    for item in sorted(items, key=lambda i: (i.device, i.seq)):
        m = item.message
        if m is not None:
            row: tuple[str, ...] = ("msg", f"{m.sender}/{m.msg_id}",
                                    olm[(item.device, item.seq)] if m.olm else plain[m.mid])
        else:
            assert item.receipt is not None
            row = ("receipt", item.receipt["status"], ",".join(item.receipt["ids"]))
        queues.setdefault(item.device, []).append(row)
    return queues


async def redis_queue(cluster: Cluster, client_id: str) -> tuple[list[tuple[str, ...]], list[int]]:
    """The device's queue in the cluster in the same form, and its seqs."""
    rows: list[tuple[str, ...]] = []
    queued = await cluster.queues.read(client_id, 0, 10_000)
    for q in queued:
        item = q.item
        if isinstance(item, MsgItem):
            rows.append(("msg", f"{item.sender}/{item.id}", item.body))
        else:
            rows.append(("receipt", item.status, ",".join(item.ids)))
    return rows, [q.seq for q in queued]


async def test_everything_moves_and_a_second_run_changes_nothing(folder: Folder, cluster: Cluster) -> None:
    report, lines = await run(folder, cluster)
    assert report.problems == [], lines
    assert [line.split(":")[0] for line in lines] == ["secret", "users", "keys", "queues", "dedup", "presence",
                                                      "summary"]
    first = await cluster.snapshot()

    # The token key, users, passwords, devices and tokens.
    secret = (folder.path / SECRET_FILE).read_bytes()
    assert await cluster.users.server_secret() == secret
    sqlite_users = await SqliteUserStore.open(folder.path)
    try:
        for name in ("alice", "bob", "carol", "dave"):
            stored = await cluster.users.password_hash(name)
            assert stored is not None and credentials.verify_password(f"{name}-pw", stored)
            assert await cluster.users.user_devices(name) == [d.device for d in await sqlite_users.devices(name)]
            for device in await sqlite_users.devices(name):
                assert await cluster.users.device(name, device.device) == device, "times and token digest"
    finally:
        await sqlite_users.close()
    phone = await cluster.users.device("alice", "phone")
    assert phone is not None and phone.token_digest is not None
    assert credentials.token_matches(secret, "alice", "phone", folder.token, phone.token_digest)

    # The key directory: the same device keys; k1 stays claimed, k2 and k3 in order, then the fallback.
    sqlite_keys = await SqliteKeyStore.open(folder.path)
    try:
        for user in ("alice", "bob"):
            assert await cluster.keys.device_keys(user) == await sqlite_keys.device_keys(user)
    finally:
        await sqlite_keys.close()
    assert await cluster.keys.count("bob", "phone") == (2, True)
    assert await cluster.keys.count("bob", "laptop") == (1, False)
    res = await cluster.keys.publish("bob", "phone", _republish_k1())
    assert res == (2, True), "a claimed id is not offered again, even re-published"

    # Every staged item, in order, with its body; seqs above every seq of the SQLite broker.
    expected = await sqlite_queues(folder.path)
    assert set(expected) >= {"bob.phone", "bob.laptop", "alice.tab", "carol.*"}
    assert [row[1] for row in expected["bob.laptop"]] == ["alice/p1", "alice/p2", "alice/o1"]
    assert expected["bob.phone"][-1] == ("msg", "alice/o1", FOR_BOB["bob.phone"])
    assert ("receipt", "delivered", "p1") in expected["alice.tab"]
    for client_id, rows in expected.items():
        got, seqs = await redis_queue(cluster, client_id)
        assert got == rows, client_id
        assert seqs == sorted(seqs) and seqs[0] > SEQ_SPAN, "above what the device was given before"

    # Presence: a privacy setting left behind would show bob to everyone allowed by the default.
    presence = await RedisPresenceStore.open(cluster.nodes, cluster.prefix)
    try:
        moved = await presence.load()
    finally:
        await presence.close()
    assert ("bob", "nobody") in moved.settings
    assert {("alice", "bob"), ("alice", "carol")} <= set(moved.contacts)
    assert "alice" in dict(moved.last_seen)

    # A second run finds everything there and changes nothing.
    report, again = await run(folder, cluster)
    assert report.problems == [], again
    assert report.counts["present"] == sum(len(rows) for rows in expected.values())
    assert await cluster.snapshot() == first

    # Delivered flag: p1 was delivered (bob.phone acked it), p2 was not.
    _, seqs = await redis_queue(cluster, "bob.laptop")
    assert await cluster.queues.ack("bob.laptop", seqs[:2]) == [MessageRef("alice", "p2", "bob")], \
        "only p2's first ack reports a delivery"
    # Dedup marks of the staged messages: a re-send is a duplicate; d1's recipient is not recorded.
    entry = MessageEntry("alice", "o1", "bob", "olm", 1, "phone", body="x")
    again_o1 = await cluster.queues.stage(Stage("bob", 10**13, 100, message=entry, dedup_until_ms=10**13))
    assert again_o1.status == StageStatus.DUPLICATE
    assert "1 marks of messages delivered already not moved" in lines[4]


def _republish_k1() -> Publish:
    return Publish(None, [OneTimeKey("k1", "a2V5", "c2ln")], None)


async def test_a_failed_run_resumes_to_the_same_state(folder: Folder, cluster: Cluster, redis_cluster: RedisCluster,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    clean = await open_cluster(redis_cluster)
    try:
        report, _ = await run(folder, clean)
        assert report.problems == []
        reference = await clean.snapshot()
    finally:
        for store in (clean.users, clean.keys, clean.queues):
            await store.close()
    real_stage = RedisQueueStore.stage
    calls = 0

    async def flaky(self: RedisQueueStore, stage: Stage) -> Any:
        nonlocal calls
        calls += 1
        n = calls  # stages run concurrently (one per device)
        result = await real_stage(self, stage)
        if n == 3:  # staged, but the reply lost: the rerun must not stage it again
            raise StoreError("redis queues.stage: connection lost (test)")
        return result

    monkeypatch.setattr(RedisQueueStore, "stage", flaky)
    with pytest.raises(StoreError, match="connection lost"):
        await run(folder, cluster)
    monkeypatch.setattr(RedisQueueStore, "stage", real_stage)
    report, lines = await run(folder, cluster)
    assert report.problems == [], lines
    assert report.counts["present"] >= 1, "the third stage went through before its error"
    assert await cluster.snapshot() == reference


async def test_a_running_broker_refuses(folder: Folder, cluster: Cluster) -> None:
    lock = BrokerLock.acquire(folder.path)
    try:
        with pytest.raises(DataDirInUseError, match="in use by another broker"):
            await run(folder, cluster)
    finally:
        lock.release()
    assert await cluster.snapshot() == {}


async def test_dry_run_writes_nothing(folder: Folder, cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    host, port = cluster.nodes[0]
    argv = ["migrate", "--data-dir", str(folder.path), "--cluster", f"redis://{host}:{port}",
            "--key-prefix", cluster.prefix, "--dry-run"]
    assert await asyncio.to_thread(main, argv) == 0
    out = capsys.readouterr().out
    assert "users: 4 users, 5 devices, 1 token digests" in out
    assert "(dry run: nothing written)" in out
    assert await cluster.snapshot() == {}


async def test_another_token_key_in_the_cluster_refuses(folder: Folder, cluster: Cluster) -> None:
    await cluster.users.server_secret()  # a cluster broker made its own
    with pytest.raises(StoreError, match="another device-token key"):
        await run(folder, cluster)
    with pytest.raises(StoreError, match="another device-token key"):
        await run(folder, cluster, dry_run=True)


async def test_a_folder_with_groups_is_refused_before_anything_is_written(tmp_path: Path, cluster: Cluster) -> None:
    """migrate does not move groups yet: moving the rest would leave their members without them."""
    broker = BrokerThread(tmp_path / "data").start()
    peers: list[Peer] = []
    try:
        broker.add_users({"alice": "alice-pw", "bob": "bob-pw"})
        alice = connect(broker.port, peers, "alice", "phone")
        created = alice.request("group.create", {"name": "Trip", "members": ["bob"]})
        assert created["ok"] is True, created
    finally:
        for peer in peers:
            peer.close()
        broker.stop()
    with pytest.raises(migration.MigrateError, match=r"has 1 group\(s\) in groups.db"):
        await migration.migrate(tmp_path / "data", cluster.nodes, cluster.prefix, say=lambda _: None)
    assert await cluster.snapshot() == {}


async def test_push_registrations_and_gone_marks_move_with_their_devices(tmp_path: Path, cluster: Cluster) -> None:
    broker = BrokerThread(tmp_path / "data").start()
    try:
        broker.add_users({"alice": "alice-pw"})
        register_offline(broker.port, "alice", "phone")
        register_offline(broker.port, "alice", "tablet")
    finally:
        broker.stop()
    phone = PushTarget("unifiedpush", "https://push.example/up/a1", "alice.phone")
    push = await SqlitePushStore.open(tmp_path / "data")
    try:
        await push.register(phone, 0)
        await push.register(PushTarget("unifiedpush", "https://push.example/up/x", "alice.gone-device"), 0)
        await push.mark_gone("alice.tablet")
    finally:
        await push.close()
    lines: list[str] = []
    report = await migration.migrate(tmp_path / "data", cluster.nodes, cluster.prefix, say=lines.append)
    assert not report.problems
    assert "push: 1 device registration(s), 1 gone mark(s)" in lines, lines
    store = await RedisPushStore.open(cluster.nodes, cluster.prefix)
    try:
        assert await store.online("alice.phone") == Arrival(phone, False, False)
        assert await store.online("alice.tablet") == Arrival(None, True, False)
        assert await store.online("alice.gone-device") == Arrival(None, False, False)
    finally:
        await store.close()


def test_cluster_addresses() -> None:
    assert migration.parse_cluster("redis://a:7000,b:7001, redis://[::1]:7002") == [
        ("a", 7000), ("b", 7001), ("::1", 7002)]
    for bad in ("redis://a", "a:x", "a:70000", ""):
        with pytest.raises(migration.MigrateError, match="not redis://HOST:PORT"):
            migration.parse_cluster(bad)


@pytest.fixture(autouse=True)
def _no_stray_lock(folder: Folder) -> Iterator[None]:
    yield
    BrokerLock.acquire(folder.path).release()  # every test leaves the folder free
