"""The login throttle shared through Redis (storage/redis/throttle.py) against the real cluster: the
cases of tests/unit/test_login_guard.py, run on it and on the in-memory throttle with the same
expected numbers, so the two keep one arithmetic."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as RedisClient

from bridge.store import StoreError
from broker.login_guard import LoginGuard
from broker.login_throttle import LoginThrottle, MemoryThrottle
from storage.redis.throttle import RedisLoginThrottle
from testkit.redis_cluster import RedisCluster

RULES = {"free_failures": 3, "base_delay_s": 1.0, "max_delay_s": 8.0, "forget_after_s": 100.0}


def guard() -> LoginGuard:
    return LoginGuard(**RULES, max_keys=5)


async def redis_throttle(cluster: RedisCluster) -> RedisLoginThrottle:
    client = RedisClient(startup_nodes=[ClusterNode(host, port) for host, port in cluster.startup_nodes],
                          decode_responses=True)
    return RedisLoginThrottle(client, f"lt{uuid.uuid4().hex[:10]}:", guard(), **RULES, retry_s=0.5)


@pytest.fixture(params=["memory", "redis"])
async def throttle(request: pytest.FixtureRequest, redis_cluster: RedisCluster) -> AsyncIterator[LoginThrottle]:
    if request.param == "memory":
        yield MemoryThrottle(guard())
        return
    shared = await redis_throttle(redis_cluster)
    yield shared
    await shared.close()


async def begins(t: LoginThrottle, keys: list[str], now: float, times: int) -> list[float]:
    return [await t.begin(keys, now) for _ in range(times)]


async def test_free_failures_then_doubling_delays_capped(throttle: LoginThrottle) -> None:
    keys = ["user:alice"]
    assert await begins(throttle, keys, 0.0, 4) == [0.0] * 4  # the 4th fails past the free 3: a 1 s wait
    assert await throttle.retry_after(keys, 0.0) == 1.0
    assert await throttle.begin(keys, 0.5) == 0.5  # refused, not counted
    assert await throttle.retry_after(keys, 1.0) == 0.0
    waits = []
    for now in (1.0, 3.0, 7.0, 15.0):
        assert await throttle.begin(keys, now) == 0.0
        waits.append(await throttle.retry_after(keys, now))
    assert waits == [2.0, 4.0, 8.0, 8.0]


async def test_the_longest_wait_of_user_and_address_applies(throttle: LoginThrottle) -> None:
    await begins(throttle, ["addr:10.0.0.1"], 0.0, 4)
    assert await throttle.retry_after(["user:bob", "addr:10.0.0.1"], 0.2) == 0.8
    assert await throttle.retry_after(["user:bob", "addr:10.0.0.2"], 0.2) == 0.0


async def test_success_clears_and_old_failures_are_forgotten(throttle: LoginThrottle) -> None:
    await begins(throttle, ["user:alice"], 0.0, 4)
    assert await throttle.begin(["user:alice"], 1.0) == 0.0
    await throttle.succeeded(["user:alice"])
    assert await throttle.retry_after(["user:alice"], 1.0) == 0.0
    await begins(throttle, ["user:carol"], 0.0, 4)
    assert await throttle.retry_after(["user:carol"], 0.5) > 0
    assert await throttle.retry_after(["user:carol"], 101.0) == 0.0
    assert await begins(throttle, ["user:carol"], 101.0, 4) == [0.0] * 4  # counting starts over
    assert await throttle.retry_after(["user:carol"], 101.0) == 1.0


async def test_concurrent_attempts_are_throttled_like_sequential_ones(throttle: LoginThrottle) -> None:
    keys = ["user:alice", "addr:10.0.0.1"]
    # 200 attempts begun before any is checked: free_failures + 1 go ahead, the rest wait.
    waits = await asyncio.gather(*(throttle.begin(keys, 0.0) for _ in range(200)))
    assert sorted(waits) == [0.0] * 4 + [1.0] * 196
    assert await throttle.retry_after(keys, 0.0) == 1.0
    # After the back-off, one more goes ahead and doubles it, as it would one by one.
    assert await begins(throttle, keys, 1.0, 3) == [0.0, 2.0, 2.0]


async def test_a_success_releases_its_reserved_failure(throttle: LoginThrottle) -> None:
    user, addr = ["user:alice"], ["addr:10.0.0.1"]
    assert await begins(throttle, user + addr, 0.0, 3) == [0.0] * 3  # three wrong passwords in flight
    assert await throttle.begin(["user:bob", *addr], 0.0) == 0.0  # the 4th, bob's, would start the back-off ...
    assert await throttle.retry_after(addr, 0.0) == 1.0
    await throttle.succeeded(["user:bob"], addr)  # ... but it was right: its failure and back-off are taken back
    assert await throttle.retry_after(addr, 0.0) == 0.0
    assert await throttle.retry_after(["user:bob"], 0.0) == 0.0
    assert await throttle.begin(user + addr, 0.0) == 0.0  # the address still has its 3 failures: the next starts it
    assert await throttle.retry_after(addr, 0.0) == 1.0


async def test_keys_expire_by_themselves(redis_cluster: RedisCluster) -> None:
    """The bound of LoginGuard's max_keys: every record has a TTL of forget_after."""
    shared = await redis_throttle(redis_cluster)
    try:
        await shared.begin(["user:dave", "addr:10.0.0.9"], 0.0)
        for key in ("user:dave", "addr:10.0.0.9"):
            ttl = int(await shared.command("pttl", "PTTL", shared.key("lt", key)))
            assert 0 < ttl <= 100_000
    finally:
        await shared.close()


async def test_while_redis_fails_the_nodes_own_guard_judges(redis_cluster: RedisCluster,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither open nor locked: failures during an outage count on this node, and still block after it."""
    shared = await redis_throttle(redis_cluster)
    real_run = shared.run

    async def failing_run(name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        raise StoreError(f"redis {name}: down (test)")

    try:
        keys = ["user:erin"]
        monkeypatch.setattr(shared, "run", failing_run)
        assert await begins(shared, keys, 0.0, 5) == [0.0] * 4 + [1.0]
        assert await shared.retry_after(keys, 0.5) == 0.5
        monkeypatch.setattr(shared, "run", real_run)
        assert await shared.begin(keys, 0.5) == 0.5, "the outage's failures still count"
        assert await shared.begin(keys, 1.0) == 0.0  # and the shared count starts
    finally:
        await shared.close()
