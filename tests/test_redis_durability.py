"""``RedisStore.run_replicated`` (storage/redis/client.py): a write answered only once Redis ``WAIT``
says enough replicas hold it -- the ``cluster.min_replicas_ack`` durability knob."""

from __future__ import annotations

import asyncio
import uuid
from typing import ClassVar

import pytest

from bridge.cluster.store import MessageEntry, Stage, StageStatus
from bridge.keys.core import parse_publish
from bridge.store import StoreError
from chatproto import MsgItem
from storage.redis.client import RedisStore
from storage.redis.keys import RedisKeyStore
from storage.redis.queues import RedisQueueStore
from storage.redis.users import RedisUserStore
from testkit.redis_cluster import RedisCluster
from tests.unit.test_keys import device_keys, otks

INCR = "return redis.call('INCR', KEYS[1])"


class Counter(RedisStore):
    SCRIPTS: ClassVar[dict[str, str]] = {"incr": INCR}

    async def bump(self, user: str, replicas: int, timeout_ms: int = 1000) -> int:
        return int(await self.run_replicated("incr", [self.key("c", user)], [], replicas, timeout_ms))


async def test_a_write_acknowledged_by_a_replica_survives_its_master(redis_cluster: RedisCluster) -> None:
    store = await Counter.open(redis_cluster.startup_nodes, f"w{uuid.uuid4().hex[:12]}:")
    try:
        assert await store.bump("carol", replicas=0) == 1, "0: a plain run"
        assert [await store.bump("carol", replicas=1) for _ in range(20)] == list(range(2, 22))
        killed = await asyncio.to_thread(redis_cluster.kill_master, "{carol}")
        try:
            # Every write acknowledged by the replica is there after it took over; the next one waits for it.
            assert await store.bump("carol", replicas=0) == 22
            assert await store.bump("carol", replicas=0) == 23
        finally:
            await asyncio.to_thread(redis_cluster.restart, killed)
        await asyncio.to_thread(redis_cluster.wait_ok)
        assert await store.bump("carol", replicas=1) == 24, "and WAIT works on the new master's connection"
    finally:
        await store.close()


async def test_too_few_replicas_is_an_error_not_a_silent_success(redis_cluster: RedisCluster) -> None:
    store = await Counter.open(redis_cluster.startup_nodes, f"w{uuid.uuid4().hex[:12]}:")
    try:
        with pytest.raises(StoreError, match="1 of 2 replica"):
            await store.bump("dave", replicas=2, timeout_ms=50)  # one replica per master here
    finally:
        await store.close()


async def test_a_stage_waits_for_its_replica_and_a_failed_wait_is_not_sent(redis_cluster: RedisCluster) -> None:
    prefix = f"w{uuid.uuid4().hex[:12]}:"
    users = await RedisUserStore.open(redis_cluster.startup_nodes, prefix)
    acked = await RedisQueueStore.open(redis_cluster.startup_nodes, prefix)
    acked._replicas = 1  # what cluster.min_replicas_ack = 1 sets
    greedy = await RedisQueueStore.open(redis_cluster.startup_nodes, prefix)
    greedy._replicas, greedy._wait_ms = 2, 50  # more replicas than the cluster has
    try:
        await users.add_user("erin", "x")
        await users.record_login("erin", "phone")
        entry = MessageEntry("frank", "m1", "erin", "text", 1, "phone", body="hi")
        stage = Stage("erin", 2**42, 100, message=entry, dedup_until_ms=2**42, delivery=True)
        with pytest.raises(StoreError, match="replica"):
            await greedy.stage(stage)  # staged on the master, but not confirmed: the sender is not told 'sent'
        again = await acked.stage(stage)  # the re-send: a duplicate, confirmed with the first stage
        assert again.status == StageStatus.DUPLICATE
        assert [q.item.id for q in await acked.read("erin.phone", 0, 10) if isinstance(q.item, MsgItem)] == ["m1"]
    finally:
        for store in (users, acked, greedy):
            await store.close()


async def test_a_key_claim_waits_for_its_replica(redis_cluster: RedisCluster) -> None:
    """A one-time key handed out must stay handed out when the master dies: a claim is answered only
    once ``min_replicas_ack`` replicas hold the pop (else a promoted replica hands it out again)."""
    prefix = f"w{uuid.uuid4().hex[:12]}:"
    acked = await RedisKeyStore.open(redis_cluster.startup_nodes, prefix)
    acked._replicas = 1  # what cluster.min_replicas_ack = 1 sets
    greedy = await RedisKeyStore.open(redis_cluster.startup_nodes, prefix)
    greedy._replicas, greedy._wait_ms = 2, 50  # more replicas than the cluster has
    try:
        await acked.publish("bob", "phone", parse_publish("bob", "phone", {"device_keys": device_keys(),
                                                                           "one_time_keys": otks(0, 3)}))
        assert (await acked.claim("bob", None))["phone"]["id"] == "AAA0"
        with pytest.raises(StoreError, match="replica"):
            await greedy.claim("bob", None)  # popped on the master, not confirmed: the claimer is not answered
        killed = await asyncio.to_thread(redis_cluster.kill_master, "{bob}")
        try:
            acked._replicas = 0  # the promoted master has no replica until the killed one is back
            assert (await acked.claim("bob", None))["phone"]["id"] != "AAA0", "handed out once, also after a failover"
        finally:
            await asyncio.to_thread(redis_cluster.restart, killed)
        await asyncio.to_thread(redis_cluster.wait_ok)
    finally:
        for store in (acked, greedy):
            await store.close()
