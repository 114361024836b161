"""Cluster mode end to end: three broker nodes on a Redis Cluster behind HAProxy (tests/deployment.py),
clients connected to different nodes on purpose."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.redis_cluster import RedisCluster
from tests.deployment import ClusterDeployment
from tests.helpers import Peer


@pytest.fixture
def cluster(tmp_path: Path, redis_cluster: RedisCluster) -> Iterator[ClusterDeployment]:
    deployment = ClusterDeployment(tmp_path / "cluster", redis_cluster).start()
    for name in ("alice", "bob", "carol"):
        deployment.add_user(name, f"{name}-pw")
    yield deployment
    deployment.stop()


def on_node(cluster: ClusterDeployment, n: int, made: list[Peer], user: str, device: str = "phone") -> Peer:
    peer = Peer(cluster.nodes[n].port, user, f"{user}-pw", device=device)
    made.append(peer)
    assert peer.connect() == 0
    assert peer.subscribe() == [1]
    return peer


def test_a_message_crosses_nodes_with_its_receipts(cluster: ClusterDeployment, made: list[Peer]) -> None:
    alice = on_node(cluster, 0, made, "alice")
    bob = on_node(cluster, 1, made, "bob")
    alice.publish("u/alice/out", {"id": "m1", "to": "bob", "body": "hello"})
    assert alice.expect(lambda i: i.get("kind") == "receipt" and i.get("status") == "sent")
    item = bob.expect(lambda i: i.get("kind") == "msg")
    assert (item["from"], item["id"], item["body"]) == ("alice", "m1", "hello")
    bob.publish("u/bob/ack", {"seqs": [item["seq"]]})
    assert alice.expect(lambda i: i.get("kind") == "receipt" and i.get("status") == "delivered")
