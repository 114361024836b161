"""Calls in flight on every master while one master is SIGKILLed: each either answers or raises
``StoreError``, nothing else.

Found by the chaos harness (``python -m bench chaos --cluster --scenario cluster-redis --full``:
474 deliveries lost, all of them ``sent``, and 48 reordered), after the stores' client got a socket
timeout (storage/redis/client.py, SOCKET_TIMEOUT_S): with one, redis-py sends through
``asyncio.wait_for``, where other calls run, and on a connection error its cluster client closes
*every* connection (``aclose()``), also one another call is opening; that call then failed with
``AttributeError: 'NoneType' object has no attribute 'writelines'`` (or uvloop's ``RuntimeError:
... the handler is closed``), not a Redis error, so it passed through ``RedisStore.call``
unretried: a queue read so failed left the device's read window waiting for good (everything
later for that connected device stayed in Redis), and a send so failed was refused without
holding the device's later messages (they overtook it).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

from bridge.store import StoreError
from storage.redis.users import RedisUserStore
from testkit.redis_cluster import RedisCluster

USERS = list("abcdefghijklmnop")  # keys on every master


async def _calls_through_a_failover(redis_cluster: RedisCluster) -> Counter[str]:
    # retry_s shorter than the failover: calls to the dead master fail and are made again, over and over.
    store = await RedisUserStore.open(redis_cluster.startup_nodes, f"f{uuid.uuid4().hex[:8]}:", retry_s=2.0)
    outcomes: Counter[str] = Counter()
    done = asyncio.Event()

    async def calls(user: str) -> None:
        while not done.is_set():
            try:
                await store.probe(user)
                outcomes["answered"] += 1
            except StoreError:
                outcomes["StoreError"] += 1
            except Exception as exc:  # what the test is about: anything else escaped
                outcomes[f"{type(exc).__name__}: {exc}"] += 1

    tasks = [asyncio.create_task(calls(user)) for user in USERS * 4]  # several calls in flight per master
    try:
        await asyncio.sleep(0.5)
        # Called on the loop, so it is busy meanwhile (as a loaded node's is): the calls to the dead master
        # then fail together, and their clean-ups close the connections the others are opening.
        killed = redis_cluster.kill_master("{a}")
        try:
            await asyncio.to_thread(redis_cluster.wait_promoted, "{a}", killed)
            await asyncio.sleep(0.5)
        finally:
            done.set()
            await asyncio.gather(*tasks)
            await asyncio.to_thread(redis_cluster.restart, killed)
    finally:
        await store.close()
    return outcomes


def test_calls_in_flight_while_a_master_dies_answer_or_raise_store_error(redis_cluster: RedisCluster) -> None:
    outcomes = asyncio.run(_calls_through_a_failover(redis_cluster))
    assert outcomes["answered"] > 0
    assert set(outcomes) <= {"answered", "StoreError"}, outcomes
