"""Redis faults for broker-level cluster tests, and what a test reads of a node: writes paused on
every Redis node (``CLIENT PAUSE ... WRITE``: reads still answer), a replica stopped (SIGSTOP: it
acknowledges nothing, so ``WAIT`` times out), a node's messaging service."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

from testkit.redis_cluster import RedisCluster, RedisNode
from tests.helpers import BrokerThread, Peer

PAUSE_MS = 20_000  # a bound only: each test unpauses as soon as its steps are done


def _cli(node: RedisNode, *args: str) -> str:
    done = subprocess.run(["redis-cli", "-p", str(node.port), *args],
                          capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()


@contextlib.contextmanager
def writes_paused(redis: RedisCluster) -> Iterator[None]:
    """Every write (and every script) waits while inside; reads answer."""
    for node in redis.nodes:
        _cli(node, "CLIENT", "PAUSE", str(PAUSE_MS), "WRITE")
    try:
        yield
    finally:
        for node in redis.nodes:
            _cli(node, "CLIENT", "UNPAUSE")


def replica_of(redis: RedisCluster, key: str) -> RedisNode:
    """A replica of the master serving ``key``'s slot (a user's keys: the user's name)."""
    master = redis.master_of(redis.slot(key))
    for line in _cli(master, "INFO", "replication").splitlines():
        if line.startswith("slave0:"):
            fields = dict(part.split("=", 1) for part in line.partition(":")[2].split(","))
            return next(node for node in redis.nodes if node.port == int(fields["port"]))
    raise AssertionError(f"{master.address} has no replica")


@contextlib.contextmanager
def stopped(redis: RedisCluster, node: RedisNode) -> Iterator[None]:
    """``node`` frozen (SIGSTOP) inside; afterwards running again and the cluster whole."""
    assert node.process is not None
    node.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        node.process.send_signal(signal.SIGCONT)
        redis.wait_ok()


def messaging(node: BrokerThread) -> Any:
    """The node's ``ClusterMessaging``."""
    return getattr(node.app.broker.bridge, "messaging")  # noqa: B009 (the port has no such name)


def remembered(node: BrokerThread, client_id: str) -> int:
    """How many refused ids the node remembers for the device (its holds, ADMISSION rule 4)."""
    async def read() -> int:
        holds = getattr(messaging(node), "_holds")  # noqa: B009 (what the test is about: the node's own)
        return int(holds.remembered(client_id))
    return node.call(read())


def linked(node: BrokerThread, client_id: str) -> bool:
    """Whether the node has a connection of the device."""
    async def read() -> bool:
        return messaging(node).links.get(client_id) is not None
    return node.call(read())


def answer(peer: Peer, ref: str) -> dict[str, Any]:
    """The answer to the peer's message ``ref``: its ``error`` or its ``sent`` receipt."""
    return peer.expect(lambda i: (i.get("kind") == "error" and i.get("ref") == ref)
                       or (i.get("kind") == "receipt" and i.get("status") == "sent" and ref in i.get("ids", ())))


def outcome(item: dict[str, Any]) -> str:
    """``sent``, or the error's code."""
    return "sent" if item.get("kind") == "receipt" else str(item["code"])


def no_message(peer: Peer, within: float) -> bool:
    """Whether no message reaches the peer within ``within`` seconds (nothing twice, nothing extra)."""
    try:
        peer.expect(lambda i: i.get("kind") == "msg", timeout=within)
    except AssertionError:
        return True
    return False


def send(peer: Peer, ref: str, to: str = "bob") -> dict[str, Any]:
    """Publish a message and return its answer."""
    peer.publish(f"u/{peer.user}/out", {"id": ref, "to": to, "body": f"body of {ref}"})
    return answer(peer, ref)
