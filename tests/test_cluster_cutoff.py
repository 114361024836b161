"""A broker node cut off from Redis for longer than ``cluster.retry_s``, then reconnected.

Found by the chaos harness (``python -m bench chaos --cluster --scenario cluster-cutoff``): while
the node was cut off, a connected device's ack (or queue read) failed and was reported to the
supervisor as a failing background task; HAProxy then closed every connection of the node (its
``/readyz`` was 503), so no device was left whose next ack or read could report success, and the
node stayed "not ready", out of the load balancer's rotation, for good after Redis came back.

The node talks to the session's Redis Cluster through proxies (bench/chaos/redis_link.py) that the
test cuts and restores; nothing else is faked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.chaos.redis_link import redis_via
from bridge.store import StoreError
from storage.redis.client import SOCKET_TIMEOUT_S
from storage.redis.users import RedisUserStore
from testkit.proxy import TcpProxy
from testkit.redis_cluster import RedisCluster
from tests.helpers import BrokerThread, Peer

RETRY_S = 1.0


@pytest.fixture
def proxies(redis_cluster: RedisCluster) -> Iterator[list[TcpProxy]]:
    made = [TcpProxy(port).start() for _, port in redis_cluster.startup_nodes]
    yield made
    for proxy in made:
        proxy.stop()


def wait_for(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def wait_ready(node: BrokerThread, timeout: float) -> list[str]:
    """Poll the node's readiness until it has no problem; the problems left at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        problems = node.call(node.app.readiness())
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.2)


@pytest.mark.parametrize("left", ["after the failure", "while its ack waited"])
def test_a_node_is_ready_again_once_redis_is_back_although_its_devices_left(
        tmp_path: Path, redis_cluster: RedisCluster, proxies: list[TcpProxy], left: str) -> None:
    # The whole test inside: a connection the node opens later (a reconnect) must take the proxies too.
    with redis_via({p.target_port: p.port for p in proxies}):
        node = BrokerThread(tmp_path / "n0", {
            "cluster.redis": [f"127.0.0.1:{port}" for _, port in redis_cluster.startup_nodes],
            "cluster.key_prefix": f"c{uuid.uuid4().hex[:8]}:", "cluster.node_id": "n0", "cluster.lease_s": 3.0,
            "cluster.retry_s": RETRY_S, "metrics.bind": "127.0.0.1:0"}).start()
        try:
            node.add_user("alice", "alice-pw")
            alice = Peer(node.port, "alice", "alice-pw")
            assert alice.connect() == 0 and alice.subscribe() == [1]
            assert wait_ready(node, 10) == []
            for proxy in proxies:
                proxy.cut("refuse")
            alice.publish("u/alice/ack", {"seqs": [1]})  # fails after retry_s: Redis is out of reach
            if left == "while its ack waited":  # the failure comes after the device is gone
                time.sleep(0.3)
                alice.close()
            assert wait_for(lambda: node.app.supervisor.failures.get("ack", 0) > 0, 10), "the ack fails"
            alice.close()  # as HAProxy does to a node that is not ready (on-marked-down shutdown-sessions)
            for proxy in proxies:
                proxy.restore()
            assert wait_ready(node, 10) == [], "ready again once Redis answers, with no device connected"
        finally:
            node.stop()


async def _every_master_fails_then_recovers(redis_cluster: RedisCluster, proxies: list[TcpProxy]) -> list[str]:
    """A store's calls on keys of every master while all are out of reach, then one after they are back."""
    store = await RedisUserStore.open(redis_cluster.startup_nodes, f"c{uuid.uuid4().hex[:8]}:", retry_s=RETRY_S)
    try:
        for proxy in proxies:
            proxy.cut("refuse")
        failed = []

        async def cut_off(user: str) -> None:
            with contextlib.suppress(StoreError):
                await store.probe(user)
                failed.append(f"{user}: answered while cut off")
        # At once, as a broker's sessions do: each master's connection fails while the others' are in flight.
        await asyncio.gather(*(cut_off(user) for user in ("a", "b", "c", "d", "e", "f")))
        for proxy in proxies:
            proxy.restore()
        for user in ("a", "b", "c", "d", "e", "f"):
            try:
                await store.probe(user)
            except StoreError as exc:
                failed.append(f"{user}: {exc}")
        return failed
    finally:
        await store.close()


def test_the_cluster_client_finds_redis_again_after_every_node_was_out_of_reach(
        redis_cluster: RedisCluster, proxies: list[TcpProxy]) -> None:
    # redis-py drops each node whose connection failed from its startup nodes; once every one had
    # failed, it had none left to ask for the cluster's layout and failed for good:
    # "Redis Cluster cannot be connected. Please provide at least one reachable node: None".
    with redis_via({p.target_port: p.port for p in proxies}):
        assert asyncio.run(_every_master_fails_then_recovers(redis_cluster, proxies)) == []


async def _blackholed(redis_cluster: RedisCluster, proxies: list[TcpProxy]) -> float:
    store = await RedisUserStore.open(redis_cluster.startup_nodes, f"c{uuid.uuid4().hex[:8]}:", retry_s=RETRY_S)
    try:
        for proxy in proxies:
            proxy.cut("blackhole")
        began = time.monotonic()
        with pytest.raises(StoreError):
            await asyncio.wait_for(store.probe("a"), 30)  # TimeoutError here: the call hung
        return time.monotonic() - began
    finally:
        for proxy in proxies:
            proxy.restore()
        await store.close()


def test_a_call_to_a_redis_that_stopped_answering_fails_within_its_bounds(
        redis_cluster: RedisCluster, proxies: list[TcpProxy]) -> None:
    # A partition (bytes dropped, nothing closed): the call hung until the link came back.
    with redis_via({p.target_port: p.port for p in proxies}):
        took = asyncio.run(_blackholed(redis_cluster, proxies))
    # Bounded, though past retry_s: the last attempt asks each known node for the layout, a timeout each.
    assert took < RETRY_S + (len(redis_cluster.nodes) + 1) * SOCKET_TIMEOUT_S + 1.0
