"""Write-back in cluster mode (bridge/cluster/writeback.py): sender and recipient on one node get the
message from memory; it reaches Redis only if it is not acked within ``staging.flush_ms``. Watched
with Redis' own MONITOR on every master, so "never reached Redis" is what Redis saw."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.redis_cluster import RedisCluster
from tests.deployment import ClusterDeployment
from tests.helpers import Peer, eventually

FLUSH_MS = 1500  # generous: the test's own ack must come within it on a loaded machine


class Monitor:
    """Every command the Redis masters run while it is open (MONITOR), as bytes."""

    def __init__(self, ports: list[int]) -> None:
        self._seen = bytearray()
        self._lock = threading.Lock()
        self._socks = []
        for port in ports:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"MONITOR\r\n")
            assert sock.recv(5) == b"+OK\r\n"
            sock.settimeout(None)
            self._socks.append(sock)
            threading.Thread(target=self._read, args=(sock,), daemon=True).start()

    def _read(self, sock: socket.socket) -> None:
        while chunk := self._recv(sock):
            with self._lock:
                self._seen += chunk

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    def saw(self, marker: str) -> bool:
        with self._lock:
            return marker.encode() in self._seen

    def close(self) -> None:
        for sock in self._socks:
            sock.close()


@pytest.fixture
def cluster(tmp_path: Path, redis_cluster: RedisCluster) -> Iterator[ClusterDeployment]:
    deployment = ClusterDeployment(tmp_path / "cluster", redis_cluster, {"staging.flush_ms": FLUSH_MS}).start()
    for name in ("alice", "bob"):
        deployment.add_user(name, f"{name}-pw")
    yield deployment
    deployment.stop()


@pytest.fixture
def monitor(redis_cluster: RedisCluster) -> Iterator[Monitor]:
    watching = Monitor([port for _, port in redis_cluster.startup_nodes])
    yield watching
    watching.close()



def none_matching(peer: Peer, predicate: Any, within: float) -> bool:
    """Whether no item matching ``predicate`` arrives within ``within`` seconds."""
    try:
        peer.expect(predicate, timeout=within)
    except AssertionError:
        return True
    return False


def statuses(peer: Peer, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The next receipt of each status in ``wanted``, in whatever order they come."""
    got: dict[str, dict[str, Any]] = {}
    while set(got) != wanted:
        item = peer.expect(lambda i: i.get("kind") == "receipt" and i.get("status") in wanted - set(got))
        got[item["status"]] = item
    return got


def caught_up(cluster: ClusterDeployment, n: int, client_id: str) -> None:
    """Wait until the node can hand the device held items (window rule 4: it read its whole queue)."""
    node = cluster.nodes[n]

    async def can_hold() -> bool:
        messaging: Any = getattr(node.app.broker.bridge, "messaging")  # noqa: B009 (the port has no such name)
        return bool(messaging.windows.can_hold(client_id))

    eventually(lambda: node.call(can_hold()), what=f"{client_id} caught up on node{n}")


def writeback_counts(cluster: ClusterDeployment, n: int) -> dict[str, int]:
    """Node n's ``chat_writeback_*`` counters (bridge/counters.py), e.g. ``{"held:msg": 1}``."""
    node = cluster.nodes[n]

    async def read() -> dict[str, int]:
        messaging: Any = getattr(node.app.broker.bridge, "messaging")  # noqa: B009 (the port has no such name)
        return dict(messaging.counters.writeback)

    return node.call(read())


def test_a_message_acked_within_flush_ms_never_reaches_redis(cluster: ClusterDeployment, monitor: Monitor,
                                                             made: list[Peer]) -> None:
    alice = cluster.peer(0, made, "alice")
    bob = cluster.peer(0, made, "bob")
    caught_up(cluster, 0, "bob.phone")
    caught_up(cluster, 0, "alice.phone")
    marker = f"held-{uuid.uuid4().hex}"
    alice.publish("u/alice/out", {"id": "w1", "to": "bob", "body": marker})
    item = bob.expect(lambda i: i.get("kind") == "msg")
    assert item["body"] == marker
    bob.publish("u/bob/ack", {"seqs": [item["seq"]]})
    receipts = statuses(alice, {"sent", "delivered"})  # either may come first (PROTOCOL section 10)
    assert receipts["sent"]["ids"] == receipts["delivered"]["ids"] == ["w1"]
    counts = writeback_counts(cluster, 0)
    assert (counts.get("held:msg"), counts.get("settled:msg"), counts.get("written:msg")) == (1, 1, None)
    alice.publish("u/alice/ack", {"seqs": [receipts["delivered"]["seq"]]})
    assert not monitor.saw(marker), "the body never reached Redis"
    # A repeat is still recognised: the dedup mark was written when every target had acked.
    alice.publish("u/alice/out", {"id": "w1", "to": "bob", "body": marker})
    again = alice.expect(lambda i: i.get("kind") == "receipt" and i.get("status") == "sent")
    assert again["ids"] == ["w1"]
    assert none_matching(bob, lambda i: i.get("kind") == "msg", 0.5), "the repeat is not delivered again"


def test_a_message_unacked_after_flush_ms_is_written_and_follows_its_device(
        cluster: ClusterDeployment, monitor: Monitor, made: list[Peer]) -> None:
    alice = cluster.peer(0, made, "alice")
    bob = cluster.peer(0, made, "bob")
    caught_up(cluster, 0, "bob.phone")
    marker = f"late-{uuid.uuid4().hex}"
    alice.publish("u/alice/out", {"id": "w2", "to": "bob", "body": marker})
    first = bob.expect(lambda i: i.get("kind") == "msg")
    sent = alice.expect(lambda i: i.get("status") == "sent", timeout=FLUSH_MS / 1000 + 10)
    assert sent["ids"] == ["w2"]
    assert monitor.saw(marker), "not acked within flush_ms: written to Redis before 'sent'"
    assert writeback_counts(cluster, 0).get("written:msg") == 1
    bob.close()
    moved = cluster.peer(1, made, "bob")  # through another node: it reads the written copy
    item = moved.expect(lambda i: i.get("kind") == "msg")
    assert (item["id"], item["body"]) == ("w2", marker)
    assert item["seq"] > first["seq"], "seqs only go up for the device"
    moved.publish("u/bob/ack", {"seqs": [item["seq"]]})
    assert alice.expect(lambda i: i.get("kind") == "receipt" and i.get("status") == "delivered")["ids"] == ["w2"]
    assert none_matching(alice, lambda i: i.get("status") == "delivered", 0.5), "reported once"


def test_a_repeat_through_another_node_while_the_first_copy_is_held_is_not_sent_yet(
        cluster: ClusterDeployment, made: list[Peer]) -> None:
    """The sender's connection moves to node 1 while node 0 holds its message (bob has not acked):
    the re-send is refused ``rate_limited`` (a false ``sent`` would be lost with node 0), and once
    node 0 wrote it, the next re-send is ``sent`` and bob gets the message once."""
    first = cluster.peer(0, made, "alice")
    bob = cluster.peer(0, made, "bob")
    caught_up(cluster, 0, "bob.phone")
    first.publish("u/alice/out", {"id": "w3", "to": "bob", "body": "once"})
    item = bob.expect(lambda i: i.get("kind") == "msg")
    moved = cluster.peer(1, made, "alice")  # alice.phone again, through node 1
    moved.publish("u/alice/out", {"id": "w3", "to": "bob", "body": "once"})
    answer = moved.expect(lambda i: i.get("kind") in ("error", "receipt"))
    assert (answer["kind"], answer.get("code"), answer.get("ref")) == ("error", "rate_limited", "w3")

    def resent() -> bool:
        moved.publish("u/alice/out", {"id": "w3", "to": "bob", "body": "once"})
        reply = moved.expect(lambda i: i.get("kind") in ("error", "receipt"))
        return reply["kind"] == "receipt" and reply["status"] == "sent"

    eventually(resent, timeout=FLUSH_MS / 1000 + 20, what="'sent' once node 0 wrote the message")
    bob.publish("u/bob/ack", {"seqs": [item["seq"]]})
    assert none_matching(bob, lambda i: i.get("kind") == "msg", 1.0), "bob got it once"
