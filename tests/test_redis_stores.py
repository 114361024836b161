"""The Redis stores (storage/redis/) across a failover: operations on a user whose master is SIGKILLed
wait for its replica to take over (storage/redis/client.py retries) instead of failing the caller."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from bridge.keys.core import parse_publish
from bridge.store import StoreError
from storage.redis.keys import CLAIM_ATTEMPTS, RedisKeyStore
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
            promoted = await asyncio.to_thread(redis_cluster.wait_promoted, "{bob}", killed)  # every node's view
            assert promoted.port != killed.port, "a replica took over"
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


async def test_a_claim_gives_up_on_a_user_whose_devices_keep_changing(redis_cluster: RedisCluster) -> None:
    """bob adds a device between each read of his keyed devices and the claim script: the claimer
    stops after CLAIM_ATTEMPTS rounds with a StoreError instead of looping for as long as bob likes."""
    store = await RedisKeyStore.open(redis_cluster.startup_nodes, f"c{uuid.uuid4().hex[:12]}:")
    real_run = store.run
    attempts = 0

    async def churning_run(what: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        nonlocal attempts
        if what == "keys.claim":
            attempts += 1
            device = f"d{attempts}"
            keys_of_device = {"device_keys": device_keys("bob", device)}
            await store.publish("bob", device, parse_publish("bob", device, keys_of_device))
        return await real_run(what, keys, args)

    try:
        await store.publish("bob", "phone", parse_publish("bob", "phone", {"device_keys": device_keys()}))
        store.run = churning_run  # type: ignore[method-assign]
        with pytest.raises(StoreError, match="changed"):
            await store.claim("bob", None)
        assert attempts == CLAIM_ATTEMPTS
    finally:
        await store.close()
