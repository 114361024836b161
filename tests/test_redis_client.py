"""The cluster client every Redis store shares (storage/redis/client.py), against a real Redis Cluster: a burst
of calls opens at most ``IN_FLIGHT_PER_NODE`` connections on each master (redis-py opened one per concurrent
command and kept them all), and a master that stops answering holds up only the calls waiting for it."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from bridge.store import StoreError
from storage.redis.client import IN_FLIGHT_PER_NODE, SOCKET_TIMEOUT_S, RedisStore
from storage.redis.queues import RedisQueueStore
from testkit.redis_cluster import RedisCluster, RedisNode


def cli(node: RedisNode, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(node.port), *args], capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


def connected_clients(redis_cluster: RedisCluster) -> dict[int, int]:
    """Clients connected to each master now (by its port)."""
    masters = {redis_cluster.master_of(slot).port: redis_cluster.master_of(slot) for slot in (0, 8000, 16000)}
    return {port: int(cli(node, "INFO", "clients").split("connected_clients:")[1].split()[0])
            for port, node in masters.items()}


def keys_by_master(redis_cluster: RedisCluster, prefix: str, count: int) -> dict[int, list[str]]:
    """``count`` keys of different users, grouped by the port of the master serving each."""
    out: dict[int, list[str]] = {}
    for n in range(count):
        key = f"{prefix}k:{{u{n}}}"
        out.setdefault(redis_cluster.master_of(redis_cluster.slot(key)).port, []).append(key)
    return out


PREFIX = f"c{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def store(redis_cluster: RedisCluster) -> AsyncIterator[RedisStore]:
    opened = await RedisStore.open(redis_cluster.startup_nodes, PREFIX)
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_burst_of_calls_opens_a_bounded_number_of_connections(redis_cluster: RedisCluster,
                                                                      store: RedisStore) -> None:
    """3,000 calls at once, from two stores on one client (as a node's stores share it): every one is answered,
    and no master got more than ``IN_FLIGHT_PER_NODE`` connections of it (it got ~1,000 each before)."""
    other = RedisQueueStore(store._client, PREFIX)  # the same client, another store
    before = connected_clients(redis_cluster)
    keys = [store.key("k", f"u{n}") for n in range(3000)]
    await asyncio.gather(*((store if n % 2 else other).command("burst", "SET", key, str(n))
                           for n, key in enumerate(keys)))
    assert await asyncio.gather(*(store.command("read", "GET", key) for key in keys[:50])) == [
        str(n) for n in range(50)]
    grown = {port: count - before[port] for port, count in connected_clients(redis_cluster).items()}
    assert all(0 < n <= IN_FLIGHT_PER_NODE for n in grown.values()), grown


async def test_a_master_that_stops_answering_holds_up_only_its_own_calls(redis_cluster: RedisCluster,
                                                                          store: RedisStore) -> None:
    """Writes paused on one master: twice ``IN_FLIGHT_PER_NODE`` calls wait for it, and calls to the other
    masters are answered meanwhile, well before the first of those could time out (``SOCKET_TIMEOUT_S``)."""
    by_master = keys_by_master(redis_cluster, f"{PREFIX}p", 2000)
    paused_port = next(iter(by_master))
    paused = next(node for node in redis_cluster.nodes if node.port == paused_port)
    others = [key for port, keys in by_master.items() if port != paused_port for key in keys][:200]
    cli(paused, "CLIENT", "PAUSE", "10000", "WRITE")
    try:
        waiting = [asyncio.create_task(store.command("paused", "SET", key, "1"))
                   for key in by_master[paused_port][:2 * IN_FLIGHT_PER_NODE]]
        await asyncio.wait_for(asyncio.gather(*(store.command("free", "SET", key, "1") for key in others)),
                               SOCKET_TIMEOUT_S * 0.75)
        assert not any(task.done() for task in waiting), "the paused master answered nothing"
    finally:
        cli(paused, "CLIENT", "UNPAUSE")
    assert await asyncio.wait_for(asyncio.gather(*waiting), 30) == [True] * len(waiting)


async def test_calls_queued_behind_a_master_that_stopped_answering_fail_within_retry_s(
        redis_cluster: RedisCluster) -> None:
    """Four times ``IN_FLIGHT_PER_NODE`` calls to a master whose writes are paused: the 64 in flight fail
    once redis-py's own attempts time out (~8 s: four of ``SOCKET_TIMEOUT_S``), and the others, queued
    behind them, by ``retry_s``: waiting for a slot counts against it. Without that, each batch of 64
    waited for the one before, ~8 s each."""
    retry_s = 1.0
    store = await RedisStore.open(redis_cluster.startup_nodes, PREFIX, retry_s=retry_s)
    by_master = keys_by_master(redis_cluster, f"{PREFIX}q", 2000)
    paused_port = next(iter(by_master))
    paused = next(node for node in redis_cluster.nodes if node.port == paused_port)
    failed_after: list[float] = []

    async def write(key: str) -> None:
        with pytest.raises(StoreError):
            await store.command("paused", "SET", key, "1")
        failed_after.append(time.monotonic() - began)

    cli(paused, "CLIENT", "PAUSE", "30000", "WRITE")
    try:
        began = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(write(key) for key in by_master[paused_port][:4 * IN_FLIGHT_PER_NODE])),
                               60)
    finally:
        cli(paused, "CLIENT", "UNPAUSE")
        await store.close()
    queued = sorted(failed_after)[:3 * IN_FLIGHT_PER_NODE]
    assert queued[-1] < retry_s + SOCKET_TIMEOUT_S, f"a queued call failed after {queued[-1]:.1f} s"
