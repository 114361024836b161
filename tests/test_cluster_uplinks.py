"""Uplinks in cluster mode under Redis faults, through real broker nodes on the real Redis Cluster
(bridge/cluster/messaging.py): what a connection published while its node waited for Redis, a
device moving to another node while a Redis replica hangs, and a stage its replicas did not confirm."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.redis_cluster import RedisCluster
from tests.cluster_faults import (
    answer,
    linked,
    messaging,
    no_message,
    outcome,
    replica_of,
    send,
    stopped,
    writes_paused,
)
from tests.deployment import ClusterDeployment
from tests.helpers import Peer, eventually


@pytest.fixture
def deployments() -> Iterator[list[ClusterDeployment]]:
    started: list[ClusterDeployment] = []
    yield started
    for deployment in started:
        deployment.stop()


def deploy(started: list[ClusterDeployment], root: Path, redis: RedisCluster,
           overrides: dict[str, Any] | None = None) -> ClusterDeployment:
    deployment = ClusterDeployment(root / "cluster", redis, overrides, nodes=2).start()
    started.append(deployment)
    deployment.add_users({"alice": "alice-pw", "bob": "bob-pw"})
    return deployment


def messages(peer: Peer, count: int) -> list[dict[str, Any]]:
    return [peer.expect(lambda i: i.get("kind") == "msg") for _ in range(count)]


def test_what_a_closed_connection_left_waiting_for_redis_is_not_staged(
        tmp_path: Path, redis_cluster: RedisCluster, deployments: list[ClusterDeployment], made: list[Peer]) -> None:
    """alice publishes c1..c3 while Redis takes no writes, and her connection closes: c1 was being
    staged, c2 and c3 waited behind it. Her new connection re-sends c1 and c2 (c3 she gave up) and a
    new c4: bob gets c1, c2, c4, each once, in order -- c2 and c3 are not staged from the dead
    connection (they could land behind what the new one sends first, or hold it)."""
    cluster = deploy(deployments, tmp_path, redis_cluster)
    bob = cluster.peer(1, made, "bob")
    alice = cluster.peer(0, made, "alice")
    with writes_paused(redis_cluster):
        for ref in ("c1", "c2", "c3"):
            alice.publish("u/alice/out", {"id": ref, "to": "bob", "body": ref})
        alice.close()
        eventually(lambda: not linked(cluster.nodes[0], "alice.phone"), what="node 0 saw the connection close")
    again = cluster.peer(0, made, "alice")
    assert [outcome(send(again, ref)) for ref in ("c1", "c2", "c4")] == ["sent"] * 3
    assert [item["id"] for item in messages(bob, 3)] == ["c1", "c2", "c4"]
    assert no_message(bob, within=1.0), "c3 never staged, nothing twice"


def test_a_device_moving_to_another_node_closes_the_old_connection_before_its_seq_block(
        tmp_path: Path, redis_cluster: RedisCluster, deployments: list[ClusterDeployment], made: list[Peer]) -> None:
    """alice connects through node 1 while the replica of her slot's master hangs: node 1's seq block
    (replicated: it waits for that replica) cannot finish, yet node 0 closes her old connection at
    once (TAKEOVER goes first: until then the old connection's uplinks still run beside the new
    one's). Her queue then reaches the new connection in order, once."""
    cluster = deploy(deployments, tmp_path, redis_cluster,
                     {"cluster.min_replicas_ack": 1, "cluster.wait_timeout_ms": 30_000})
    bob = cluster.peer(1, made, "bob")
    old = cluster.peer(0, made, "alice")
    sent = [f"t{n}" for n in range(5)]
    for ref in sent:
        assert outcome(send(bob, ref, to="alice")) == "sent"
    assert [item["id"] for item in messages(old, 5)] == sent  # unacked: they stay queued
    with stopped(redis_cluster, replica_of(redis_cluster, "alice")):
        new = cluster.peer(1, made, "alice")
        assert old.disconnected.wait(15), "the old connection closed while the seq block waited"
    got = messages(new, 5)
    assert [item["id"] for item in got] == sent
    new.publish("u/alice/ack", {"seqs": [item["seq"] for item in got]})
    assert no_message(new, within=1.0), "nothing twice"


def test_a_stage_its_replicas_did_not_confirm_is_delivered_and_holds_nothing(
        tmp_path: Path, redis_cluster: RedisCluster, deployments: list[ClusterDeployment], made: list[Peer]) -> None:
    """``NotReplicated``: bob's master took n1 but its replica did not confirm it within
    ``cluster.wait_timeout_ms``. alice gets ``internal`` for n1 (not ``sent``: a failover could lose
    it), n1 reaches bob all the same, and alice's next message is not held behind n1."""
    cluster = deploy(deployments, tmp_path, redis_cluster,
                     {"cluster.min_replicas_ack": 1, "cluster.wait_timeout_ms": 1000})
    bob = cluster.peer(1, made, "bob")
    alice = cluster.peer(0, made, "alice")
    with stopped(redis_cluster, replica_of(redis_cluster, "bob")):
        assert outcome(send(alice, "n1")) == "internal"
        assert messages(bob, 1)[0]["id"] == "n1", "staged on the master: delivered"
    assert outcome(send(alice, "n2")) == "sent", "not held behind n1"
    assert outcome(send(alice, "n1")) == "sent", "its re-send finds it staged"
    assert messages(bob, 1)[0]["id"] == "n2"
    assert no_message(bob, within=1.0), "n1 once"


def waiting(node: Any, client_id: str) -> int:
    """How many uplinks of the device wait in its lane on the node (the one being handled included)."""
    async def read() -> int:
        lane = getattr(messaging(node), "_lanes").get(client_id)  # noqa: B009 (the node's own lanes)
        return 0 if lane is None else len(lane)
    return int(node.call(read()))


def test_a_full_lane_refuses_in_order_and_the_refused_come_back_in_theirs(
        tmp_path: Path, redis_cluster: RedisCluster, deployments: list[ClusterDeployment], made: list[Peer]) -> None:
    """Redis takes no writes while alice publishes l1..l6 with room for 3 uplinks in her lane: l1..l3
    wait, l4 is refused ``rate_limited`` in its turn, and l5, l6 behind it ("re-send l4 first"). Her
    re-sends go through in order; bob gets l1..l6 once each, in order."""
    cluster = deploy(deployments, tmp_path, redis_cluster, {"cluster.max_waiting_uplinks": 3})
    bob = cluster.peer(1, made, "bob")
    alice = cluster.peer(0, made, "alice")
    refs = [f"l{n}" for n in range(1, 7)]
    with writes_paused(redis_cluster):
        for ref in refs:
            alice.publish("u/alice/out", {"id": ref, "to": "bob", "body": ref})
        eventually(lambda: waiting(cluster.nodes[0], "alice.phone") == 6, what="all six in alice's lane")
    answers = [answer(alice, ref) for ref in refs]
    assert [outcome(a) for a in answers] == ["sent"] * 3 + ["rate_limited"] * 3
    assert "re-send it before" not in answers[3]["detail"] and all("'l4'" in a["detail"] for a in answers[4:])
    assert [outcome(send(alice, ref)) for ref in refs[3:]] == ["sent"] * 3
    assert [item["id"] for item in messages(bob, 6)] == refs
    assert no_message(bob, within=1.0)


def test_a_copy_of_a_message_waiting_in_the_lane_is_not_queued_again(
        tmp_path: Path, redis_cluster: RedisCluster, deployments: list[ClusterDeployment], made: list[Peer]) -> None:
    """While Redis takes no writes alice publishes d1, d2 and d2 again (the SDK re-sends what is
    unanswered after 10 s): the copy joins its original, so d2 is answered once and staged once."""
    cluster = deploy(deployments, tmp_path, redis_cluster)
    bob = cluster.peer(1, made, "bob")
    alice = cluster.peer(0, made, "alice")
    with writes_paused(redis_cluster):
        for ref in ("d1", "d2", "d2"):
            alice.publish("u/alice/out", {"id": ref, "to": "bob", "body": ref})
        eventually(lambda: waiting(cluster.nodes[0], "alice.phone") == 2, what="d1 and d2 in alice's lane")
        alice.publish("u/alice/out", {"id": "d3", "to": "bob", "body": "d3"})
        eventually(lambda: waiting(cluster.nodes[0], "alice.phone") == 3, what="d3 behind them: the copy was not")
    assert [outcome(answer(alice, ref)) for ref in ("d1", "d2", "d3")] == ["sent"] * 3
    with pytest.raises(AssertionError):  # no second answer for d2
        alice.expect(lambda i: i.get("kind") in ("receipt", "error") and "d2" in (*i.get("ids", ()), i.get("ref")),
                     timeout=1.0)
    assert [item["id"] for item in messages(bob, 3)] == ["d1", "d2", "d3"]
