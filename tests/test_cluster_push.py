"""Push in cluster mode (docs/PUSH.md, "Cluster mode"): broker nodes on the session's Redis Cluster
and a real UnifiedPush distributor on 127.0.0.1 (tests/push_distributor.py). The phone registers
through one node and goes away; its wake-ups are decided in Redis whichever node learns of a
message, sent by one node, and survive the node that queued them."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from testkit.redis_cluster import RedisCluster
from tests.deployment import ClusterDeployment
from tests.helpers import WAIT_S, BrokerProcess, Peer, eventually, online_peer
from tests.push_distributor import Distributor
from tests.test_cluster import add_users
from tests.test_push import (
    PUSH,
    acking_phone_gets_none,
    all_sent,
    away_phone_gets_one_push_for_a_burst,
    fetch,
    register,
    retried_with_back_off,
    send,
    silent_connection_gets_one,
)


@pytest.fixture
def two(tmp_path: Path, redis_cluster: RedisCluster) -> Iterator[ClusterDeployment]:
    deployment = ClusterDeployment(tmp_path / "cluster", redis_cluster, PUSH, nodes=2).start()
    deployment.add_users({name: f"{name}-pw" for name in ("alice", "bob", "carol")})
    yield deployment
    deployment.stop()


def sent(deployment: ClusterDeployment) -> int:
    return sum(node.app.push.counters["unifiedpush"].sent for node in deployment.nodes)


def record(redis_cluster: RedisCluster, prefix: str, client_id: str) -> dict[str, str]:
    """The device's push record in Redis (storage/redis/push.py); {} when it has none."""
    host, port = redis_cluster.startup_nodes[0]
    client = redis.RedisCluster(host=host, port=port, decode_responses=True)
    try:
        keys = client.scan_iter(match=f"{prefix}push:*:{client_id}", target_nodes=redis.RedisCluster.PRIMARIES)
        return {k: v for key in keys for k, v in client.hgetall(key).items()}  # type: ignore[union-attr]
    finally:
        client.close()


def test_an_away_phone_gets_one_push_for_a_burst_on_another_node_then_everything(
        two: ClusterDeployment, made: list[Peer], distributor: Distributor) -> None:
    a, b = two.nodes
    away_phone_gets_one_push_for_a_burst(b.port, a.port, made, distributor)
    assert sent(two) == 1


def test_senders_on_both_nodes_wake_the_phone_once(two: ClusterDeployment, made: list[Peer],
                                                    distributor: Distributor) -> None:
    a, b = two.nodes
    register(a.port, distributor)
    alice, carol = online_peer(a.port, made, "alice"), online_peer(b.port, made, "carol")
    for n in range(25):
        send(alice, f"a{n:02d}")
        send(carol, f"c{n:02d}")
    for peer, prefix in ((alice, "a"), (carol, "c")):  # all staged before the phone fetches (a loaded
        all_sent(peer, {f"{prefix}{n:02d}" for n in range(25)})  # machine left alice's last 3 behind the fetch)
    distributor.wait(1)
    assert fetch(a.port) == sorted([f"a{n:02d}" for n in range(25)] + [f"c{n:02d}" for n in range(25)])
    assert len(distributor.requests) == 1 and sent(two) == 1


def test_a_connected_phone_that_acks_gets_no_push(two: ClusterDeployment, made: list[Peer],
                                                  distributor: Distributor) -> None:
    a, b = two.nodes
    acking_phone_gets_none(b.port, a.port, made, distributor)


def test_a_connection_that_stops_acking_gets_one_push_after_the_grace(two: ClusterDeployment, made: list[Peer],
                                                                      distributor: Distributor) -> None:
    a, b = two.nodes
    silent_connection_gets_one(b.port, a.port, made, distributor)


def test_429_and_5xx_are_retried_with_back_off_honouring_retry_after(
        two: ClusterDeployment, made: list[Peer], distributor: Distributor, redis_cluster: RedisCluster) -> None:
    a, b = two.nodes
    retried_with_back_off(b.port, a.port, made, distributor)
    eventually(lambda: sent(two) == 1, what="sent")
    failed = [node.app.push.counters["unifiedpush"].failed.get("retry", 0) for node in two.nodes]
    assert sum(failed) == 3
    eventually(lambda: "wake" not in record(redis_cluster, two.prefix, "bob.phone"), what="dequeued")


def test_a_gone_endpoint_is_dropped_and_the_device_told_on_another_node(
        two: ClusterDeployment, made: list[Peer], distributor: Distributor, redis_cluster: RedisCluster) -> None:
    a, b = two.nodes
    distributor.answer(410)
    register(b.port, distributor)
    alice = online_peer(a.port, made, "alice")
    send(alice, "m1")
    distributor.wait(1)
    eventually(lambda: record(redis_cluster, two.prefix, "bob.phone") == {"gone": "1"}, what="marked gone")
    send(alice, "m2")
    phone = online_peer(a.port, made, "bob")
    assert phone.expect(lambda item: item.get("kind") == "error")["code"] == "push_gone"
    assert record(redis_cluster, two.prefix, "bob.phone") == {}
    assert len(distributor.requests) == 1


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def test_a_wake_up_queued_on_a_node_killed_is_sent_by_the_other(tmp_path: Path, redis_cluster: RedisCluster,
                                                                distributor: Distributor) -> None:
    """The node that sent the first attempt (answered 429, Retry-After 2) is SIGKILLed with the retry
    queued: the other node's sweep sends it."""
    prefix = f"p{uuid.uuid4().hex[:10]}:"
    asyncio.run(add_users(redis_cluster, prefix, ("alice", "bob")))
    distributor.answer(429, Retry_After="2")
    base: dict[str, Any] = {**PUSH, "cluster.redis": [f"127.0.0.1:{port}" for _, port in redis_cluster.startup_nodes],
                            "cluster.key_prefix": prefix, "cluster.lease_s": 2.0, "metrics.bind": "127.0.0.1:0"}
    procs = [BrokerProcess(tmp_path / f"n{n}", {**base, "cluster.node_id": f"n{n}"}).start() for n in range(2)]
    made: list[Peer] = []
    try:
        register(procs[1].port, distributor)
        send(online_peer(procs[0].port, made, "alice"), "m1")
        distributor.wait(1)
        retries = 'chat_push_failed_total{outcome="retry",platform="unifiedpush"}'
        eventually(lambda: sum(metric(p.ports["metrics"], retries) for p in procs) == 1, what="the first attempt")
        # Most often the node where alice sent (it queued the wake-up): the other may have swept it first.
        first = 0 if metric(procs[0].ports["metrics"], retries) == 1 else 1
        killed, survivor = procs[first].proc, procs[1 - first]
        assert killed is not None
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(WAIT_S)
        procs[first].proc = None
        _, again = distributor.wait(2, timeout=30)
        assert again.path == "/up/bob" and again.at - distributor.requests[0].at >= 1.9
        eventually(lambda: metric(survivor.ports["metrics"], 'chat_push_sent_total{platform="unifiedpush"}') == 1,
                   what="the other node sent it")
        assert fetch(survivor.port) == ["m1"]
    finally:
        for peer in made:
            peer.close()
        for proc in procs:
            proc.stop()


def test_a_registration_is_removed_with_its_device_from_any_node(
        two: ClusterDeployment, made: list[Peer], distributor: Distributor, redis_cluster: RedisCluster) -> None:
    a, b = two.nodes
    register(b.port, distributor)
    assert "reg" in record(redis_cluster, two.prefix, "bob.phone")
    tablet = online_peer(a.port, made, "bob", "tablet")
    assert tablet.request("push.unregister")["result"] == {"removed": False}
    assert tablet.request("devices.remove", {"device": "phone"})["ok"]
    eventually(lambda: record(redis_cluster, two.prefix, "bob.phone") == {}, what="registration removed")
