"""``chat-broker cluster status`` against the session's Redis Cluster, and its pure parts."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from bridge.cluster.store import Stage
from chatproto import ReceiptItem
from chatserver.cluster_status import gather, parse_topology, render
from chatserver.config import build_settings
from storage.redis.nodes import RedisNodeBus
from storage.redis.queues import RedisQueueStore
from testkit.redis_cluster import RedisCluster
from tests.test_cli import cli, one_line_error

RAW = {  # redis-py's CLUSTER NODES, abridged
    "10.0.0.2:7000": {"node_id": "b", "flags": "master", "master_id": "-", "slots": [["8192", "16383"]],
                      "connected": True},
    "10.0.0.1:7000": {"node_id": "a", "flags": "myself,master", "master_id": "-", "slots": [["0", "8191"]],
                      "connected": True},
    "10.0.0.3:7000": {"node_id": "c", "flags": "slave,fail", "master_id": "a", "slots": [], "connected": False},
    "10.0.0.4:7000": {"node_id": "d", "flags": "slave", "master_id": "b", "slots": [], "connected": True},
}


def test_topology_lists_each_master_then_its_replicas() -> None:
    nodes = parse_topology(RAW)
    assert [(n.address, n.role, n.state, n.master) for n in nodes] == [
        ("10.0.0.1:7000", "master", "ok", None), ("10.0.0.3:7000", "replica", "fail", "10.0.0.1:7000"),
        ("10.0.0.2:7000", "master", "ok", None), ("10.0.0.4:7000", "replica", "ok", "10.0.0.2:7000")]
    assert nodes[0].slots == ((0, 8191),)


async def test_cluster_status_shows_live_nodes_and_the_redis_cluster(redis_cluster: RedisCluster,
                                                                     tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    startup = [(node.address.split(":")[0], node.port) for node in redis_cluster.nodes[:2]]
    url = "redis://" + ",".join(node.address for node in redis_cluster.nodes[:2])
    settings = build_settings({"cluster": {"redis": [node.address for node in redis_cluster.nodes[:2]],
                                           "key_prefix": prefix, "lease_s": 0.6}})
    cluster = settings.cluster
    assert cluster is not None

    queues = await RedisQueueStore.open(startup, prefix)
    try:  # one queue with an item: carol has no device yet, so it waits in her placeholder queue
        await queues.stage(Stage("carol", 2**42, 10, receipt=ReceiptItem("seen", ("m1",), "dave", 1)))
    finally:
        await queues.close()
    bus = await RedisNodeBus.connect(startup, prefix, "edge-1", lease_s=0.6)
    try:
        await bus.start(lambda nudge: None)
        bus.report(3)
        async with asyncio.timeout(10):
            while True:  # the count is published with the next renewal (every lease_s / 3)
                view = await gather(cluster)
                if [(n.node_id, n.connections) for n in view.nodes] == [("edge-1", 3)]:
                    break
                await asyncio.sleep(0.1)
        result = await asyncio.to_thread(cli, "cluster", "status", "--cluster", url, "--key-prefix", prefix,
                                         "--json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        shown = json.loads(result.stdout)
        assert [(n["node_id"], n["connections"]) for n in shown["nodes"]] == [("edge-1", 3)]
        assert 0 < shown["nodes"][0]["lease_left_ms"] <= 600
        masters = [n for n in shown["redis"] if n["role"] == "master"]
        assert len(masters) == 3 and len(shown["redis"]) == 6
        assert sum(b - a + 1 for n in masters for a, b in n["slots"]) == 16384
        assert shown["queues_waiting"] == 1, "the queue staged above"
        text = await asyncio.to_thread(cli, "cluster", "status", "--cluster", url, "--key-prefix", prefix,
                                       cwd=tmp_path)
        assert "edge-1" in text.stdout and "Redis Cluster" in text.stdout and "16,384 of 16,384" in text.stdout
    finally:
        await bus.close()
    view = await gather(cluster)
    assert view.nodes == []  # a node that stopped gave its lease up
    assert render(view) is not None


def test_cluster_status_errors_are_one_line(tmp_path: Path) -> None:
    assert "give --cluster" in one_line_error(cli("cluster", "status", cwd=tmp_path))
    assert "--cluster: 'x' is not HOST:PORT" in one_line_error(cli("cluster", "status", "--cluster", "x",
                                                                   cwd=tmp_path))
