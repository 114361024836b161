"""``RedisStore.run_replicated`` (storage/redis/client.py): a write answered only once Redis ``WAIT``
says enough replicas hold it -- the ``cluster.min_replicas_ack`` durability knob."""

from __future__ import annotations

import asyncio
import uuid
from typing import ClassVar

import pytest

from bridge.store import StoreError
from storage.redis.client import RedisStore
from testkit.redis_cluster import RedisCluster

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
