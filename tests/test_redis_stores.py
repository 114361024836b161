"""The Redis stores (storage/redis/) across a failover: operations on a user whose master is SIGKILLed
wait for its replica to take over (storage/redis/client.py retries) instead of failing the caller."""

from __future__ import annotations

import asyncio
import time
import uuid

from bridge.keys.core import parse_publish
from storage.redis.keys import RedisKeyStore
from testkit.redis_cluster import RedisCluster
from tests.unit.test_keys import device_keys, otks


async def test_key_publish_and_claims_ride_out_a_master_failover(redis_cluster: RedisCluster) -> None:
    store = await RedisKeyStore.open(redis_cluster.startup_nodes, f"f{uuid.uuid4().hex[:12]}:")
    try:
        killed = await asyncio.to_thread(redis_cluster.kill_master, "{bob}")  # the slot of all bob's keys
        try:
            started = time.monotonic()
            # Sent after the kill, so nothing of it can go with the old master: all of it must be there.
            publish = parse_publish("bob", "phone", {"device_keys": device_keys(), "one_time_keys": otks(0, 10)})
            during = await asyncio.gather(store.publish("bob", "phone", publish),
                                          *(store.claim("bob", None) for _ in range(6)))
            waited = time.monotonic() - started
            assert redis_cluster.master_of(redis_cluster.slot("{bob}")).port != killed.port, "a replica took over"
            after = [await store.claim("bob", None) for _ in range(10)]
        finally:
            await asyncio.to_thread(redis_cluster.restart, killed)
        assert waited > 1.0, f"they waited for the failover ({waited:.1f} s)"
        assert during[0] == (10, True)
        claims = [*during[1:], *after]
        assert sorted(c["phone"]["id"] for c in claims if c) == sorted(otks(0, 10)), "each key exactly once"
        assert claims.count({}) == 6
    finally:
        await store.close()
