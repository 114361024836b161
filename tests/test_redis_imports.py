"""The import methods of the Redis stores (what ``chat-broker migrate`` writes through), against the
real Redis Cluster: each keeps what the cluster has, refuses a conflict without writing, and
changes nothing when run again."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from bridge.cluster.store import SEQ_STRIDE, MessageEntry, Stage, StageStatus
from bridge.keys.core import OneTimeKey, Publish
from broker.users import DeviceInfo
from storage.redis.keys import RedisKeyStore
from storage.redis.queues import RedisQueueStore
from storage.redis.users import RedisUserStore, SecretMismatchError
from testkit.redis_cluster import RedisCluster

FAR = 10**13
SIGNED = {"user": "bob", "device": "phone", "curve25519": "Q1", "ed25519": "RU", "signature": "U0lH"}


@dataclass
class Stores:
    users: RedisUserStore
    keys: RedisKeyStore
    queues: RedisQueueStore


@pytest.fixture
async def stores(redis_cluster: RedisCluster) -> AsyncIterator[Stores]:
    prefix = f"i{uuid.uuid4().hex[:12]}:"
    nodes = redis_cluster.startup_nodes
    opened = Stores(await RedisUserStore.open(nodes, prefix), await RedisKeyStore.open(nodes, prefix),
                    await RedisQueueStore.open(nodes, prefix))
    try:
        yield opened
    finally:
        for store in (opened.users, opened.keys, opened.queues):
            await store.close()


async def test_import_secret_keeps_the_same_and_refuses_another(stores: Stores) -> None:
    assert await stores.users.stored_secret() is None
    await stores.users.import_secret(b"k" * 32)
    await stores.users.import_secret(b"k" * 32)
    assert await stores.users.server_secret() == b"k" * 32, "not replaced by a new one"
    with pytest.raises(SecretMismatchError, match="another device-token key"):
        await stores.users.import_secret(b"x" * 32)
    assert await stores.users.stored_secret() == b"k" * 32


async def test_import_user_keeps_times_and_tokens(stores: Stores) -> None:
    users = stores.users
    phone = DeviceInfo("bob", "phone", "digest-1", 1000, 2000)
    laptop = DeviceInfo("bob", "laptop", None, 1500, 1600)
    assert await users.import_user("bob", "hash-1", 900, [phone, laptop])
    assert await users.import_user("bob", "hash-1", 900, [phone, laptop]), "again: no change"
    assert await users.device("bob", "phone") == phone
    assert await users.device("bob", "laptop") == laptop
    assert await users.user_devices("bob") == ["laptop", "phone"]
    await users.record_login("bob", "phone")  # the cluster's newer login stays on a later import
    newer = await users.device("bob", "phone")
    assert await users.import_user("bob", "hash-1", 900, [phone])
    assert await users.device("bob", "phone") == newer
    assert not await users.import_user("bob", "hash-2", 900, [DeviceInfo("bob", "tab", None, 1, 1)])
    assert await users.password_hash("bob") == "hash-1"
    assert await users.device("bob", "tab") is None, "a refused import writes nothing"


async def test_import_device_keeps_claimed_ids_claimed(stores: Stores) -> None:
    keys = stores.keys
    otks = [OneTimeKey(f"k{n}", f"a2V5{n}", "c2ln") for n in range(2, 5)]
    fallback = OneTimeKey("FB", "ZmI", "c2ln")
    for _ in range(2):
        assert await keys.import_device("bob", "phone", ("Q1", "RU"), SIGNED, otks, fallback, ["k1"]) == 3
    assert await keys.device_keys("bob") == {"phone": SIGNED}
    assert await keys.count("bob", "phone") == (3, True)
    assert (await keys.claim("bob", ["phone"]))["phone"]["id"] == "k2", "in order"
    # k2 is now claimed by the cluster: importing the same keys again does not bring it back,
    # nor does a publish bring back k1, claimed before the import.
    assert await keys.import_device("bob", "phone", ("Q1", "RU"), SIGNED, otks, fallback, ["k1"]) == 2
    assert await keys.publish("bob", "phone", Publish(None, [OneTimeKey("k1", "a2V5", "c2ln")], None)) == (2, True)
    # Claimed in the data folder since the last import: taken out of the unclaimed ones.
    assert await keys.import_device("bob", "phone", ("Q1", "RU"), SIGNED, otks[2:], fallback, ["k1", "k3"]) == 1
    assert [(await keys.claim("bob", None))["phone"]["id"] for _ in range(2)] == ["k4", "FB"]
    assert await keys.import_device("bob", "phone", ("Q9", "RU"), SIGNED, otks, None, []) == -1, "other identity"
    assert await keys.count("bob", "phone") == (0, True)


async def test_import_dedup_mark_makes_a_stage_a_duplicate(stores: Stores) -> None:
    await stores.users.add_users([("bob", "x")])
    await stores.users.record_login("bob", "phone")
    entry = MessageEntry("alice", "m1", "bob", "text", 1, "phone", body="hi")
    await stores.queues.import_dedup_mark("bob", "alice", "m1", FAR)
    await stores.queues.import_dedup_mark("bob", "alice", "m1", FAR - 5)  # a shorter one: the longer stays
    marks = stores.queues.key("qd", "bob")
    assert await stores.queues.command("test", "ZSCORE", marks, "alice/m1") == FAR
    assert await stores.queues.command("test", "PEXPIRETIME", marks) == FAR
    result = await stores.queues.stage(Stage("bob", FAR, 100, message=entry, dedup_until_ms=FAR))
    assert result.status == StageStatus.DUPLICATE


async def test_import_seq_floor_raises_the_next_seqs(stores: Stores) -> None:
    await stores.users.add_users([("bob", "x")])
    await stores.users.record_login("bob", "phone")
    entry = MessageEntry("alice", "m1", "bob", "text", 1, "phone", body="hi")
    await stores.queues.import_seq_floor("bob.phone", 5_000)
    await stores.queues.import_seq_floor("bob.phone", 10)  # lower: no change
    first = await stores.queues.stage(Stage("bob", FAR, 100, message=entry))
    assert first.targets == (("bob.phone", 5_000 + SEQ_STRIDE),)
    await stores.queues.import_seq_floor("bob.phone", 5_001)  # the counter is past it already
    second = await stores.queues.stage(Stage("bob", FAR, 100, message=entry))
    assert second.targets == (("bob.phone", 5_000 + 2 * SEQ_STRIDE),)
