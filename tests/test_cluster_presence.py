"""Cluster presence (bridge/cluster/presence.py) on the real Redis Cluster: three nodes in one
process, each with its own bus (storage/redis/nodes.py), presence store, link registry and presence
service, sharing one key prefix; devices are links that record what they are sent.

Proves, across nodes: a watcher sees a user go online and, after the window, offline with the
last heartbeat's time; privacy ``nobody`` set through a third node hides the user (one null/null
item); contacts and reciprocity; a watcher on the user's own node; flapping is coalesced; a node
that closes takes its devices offline; a node that dies leaves leases that run out; a Redis master
killed during heartbeats loses no ``last_seen`` the store acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from bridge.clock import Clock
from bridge.cluster.nodes import Nudge, NudgeKind
from bridge.cluster.presence import ClusterPresence
from bridge.links import LinkRegistry
from bridge.presence.core import PresenceCore, PresenceRules
from chatproto import Caller
from chatserver.supervisor import Supervisor
from storage.redis.nodes import RedisNodeBus
from storage.redis.presence import RedisPresenceStore
from testkit.redis_cluster import RedisCluster

W = 1_500  # online window, ms
COALESCE = 300
WAIT_S = 10.0
RULES = PresenceRules(online_window_ms=W, coalesce_ms=COALESCE, max_contacts=10, max_watched=10)


class Device:
    """A connected device (``bridge.links.DeviceLink``): the presence items it was sent, in order."""

    def __init__(self, user: str, device: str) -> None:
        self.caller = Caller(user, device)
        self.items: list[dict[str, Any]] = []

    @property
    def client_id(self) -> str:
        return self.caller.client_id

    def send(self, payload: bytes) -> None:
        item = json.loads(payload)
        if item["kind"] == "presence":
            self.items.append({k: item[k] for k in ("user", "online", "last_seen")})


@dataclass
class Node:
    presence: ClusterPresence
    bus: RedisNodeBus
    store: RedisPresenceStore
    links: LinkRegistry = field(default_factory=LinkRegistry)

    def connect(self, user: str, device: str) -> Device:
        link = Device(user, device)
        self.links.attach(user, link)
        return link

    def beat(self, device: Device, away: bool = False) -> None:
        self.presence.on_heartbeat(device.caller, b'{"state":"away"}' if away else b"{}")

    async def op(self, device: Device, op: str, **args: Any) -> Any:
        return await self.presence.ops()[op](device.caller, args)

    def leave(self, device: Device) -> None:
        if self.links.detach(device.caller.user, device):
            self.presence.device_offline(device.caller.user, device.client_id)


@dataclass
class Cluster:
    redis: RedisCluster
    prefix: str
    nodes: list[Node] = field(default_factory=list)

    async def node(self, node_id: str) -> Node:
        bus = await RedisNodeBus.connect(self.redis.startup_nodes, self.prefix, node_id)
        store = await RedisPresenceStore.open(self.redis.startup_nodes, self.prefix)
        links = LinkRegistry()
        presence = ClusterPresence(PresenceCore(RULES), store, links, bus, clock=Clock(), supervisor=Supervisor(),
                                   resync_s=5.0)
        await bus.start(presence.on_nudge)
        await presence.start()
        node = Node(presence, bus, store, links)
        self.nodes.append(node)
        return node

    async def close(self, node: Node) -> None:
        if node in self.nodes:
            self.nodes.remove(node)
            await node.presence.close()
            await node.bus.close()
            await node.store.close()


@pytest.fixture
async def cluster(redis_cluster: RedisCluster) -> AsyncIterator[Cluster]:
    made = Cluster(redis_cluster, f"cp{uuid.uuid4().hex[:10]}:")
    yield made
    for node in list(made.nodes):
        await made.close(node)


async def eventually(check: Callable[[], bool], what: str, wait_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + wait_s
    while not check():
        assert time.monotonic() < deadline, f"not within {wait_s} s: {what}"
        await asyncio.sleep(0.02)


async def seen(device: Device, count: int, what: str, wait_s: float = WAIT_S) -> list[dict[str, Any]]:
    await eventually(lambda: len(device.items) >= count, what, wait_s)
    return device.items


async def beat(node: Node, device: Device, away: bool = False) -> range:
    """A heartbeat; the times (ms) its ``last_seen`` can have (the core forgets a user who is
    offline here and watched by nobody here, so the test cannot read it there afterwards)."""
    before = int(time.time() * 1000) - 1
    node.beat(device, away)
    after = int(time.time() * 1000) + 1
    await asyncio.sleep(0.003)  # the next heartbeat's range starts after this one's
    return range(before, after + 1)


def item(user: str, online: bool | None, last_seen: int | None) -> dict[str, Any]:
    return {"user": user, "online": online, "last_seen": last_seen}


async def everyone(node: Node, *devices: Device) -> None:
    for device in devices:
        await node.op(device, "privacy.set", last_seen="everyone")


Setup = Callable[[], Awaitable[tuple[Node, Node, Node, Device, Device]]]


@pytest.fixture
def three(cluster: Cluster) -> Setup:
    """Nodes n1, n2, n3; alice's phone on n1 and bob's phone on n2, bob watching alice."""

    async def make() -> tuple[Node, Node, Node, Device, Device]:
        n1, n2, n3 = [await cluster.node(f"n{i}") for i in (1, 2, 3)]
        alice, bob = n1.connect("alice", "phone"), n2.connect("bob", "phone")
        return n1, n2, n3, alice, bob

    return make


async def test_a_watcher_on_another_node_sees_online_then_offline_after_the_window(three: Setup) -> None:
    n1, n2, _, alice, bob = await three()
    await everyone(n1, alice)
    await everyone(n2, bob)
    answer = await n2.op(bob, "presence.subscribe", users=["alice"])
    assert answer == {"users": {"alice": {"online": False, "last_seen": None}}}
    n1.beat(alice)
    last_seen = n1.presence.core.last_seen("alice")
    assert (await seen(bob, 1, "alice online"))[0] == item("alice", True, last_seen)
    assert (await n2.op(bob, "presence.get", users=["alice"]))["users"]["alice"] == {"online": True,
                                                                                   "last_seen": last_seen}
    items = await seen(bob, 2, "alice offline after the window", wait_s=W / 1000 + WAIT_S)
    assert items[1] == item("alice", False, last_seen), "offline, last_seen the heartbeat's time"
    assert (await n2.op(bob, "presence.get", users=["alice"]))["users"]["alice"] == {"online": False,
                                                                                   "last_seen": last_seen}


async def test_privacy_nobody_set_through_a_third_node_hides_alice(three: Setup) -> None:
    n1, n2, n3, alice, bob = await three()
    laptop = n3.connect("alice", "laptop")
    await everyone(n3, laptop)
    await everyone(n2, bob)
    n1.beat(alice)
    await n1.presence.flush()
    await n2.op(bob, "presence.subscribe", users=["alice"])
    await n3.op(laptop, "privacy.set", last_seen="nobody")
    assert await seen(bob, 1, "alice hidden") == [item("alice", None, None)]
    assert await n1.op(alice, "privacy.get") == {"last_seen": "nobody", "contacts": []}
    n1.beat(alice, away=True)
    n1.beat(alice)
    await asyncio.sleep(COALESCE * 2 / 1000)  # nothing may come: nothing to wait for
    assert bob.items == [item("alice", None, None)], "one null/null item, then nothing"


async def test_contacts_and_reciprocity_across_nodes(three: Setup) -> None:
    n1, n2, _, alice, bob = await three()
    n1.beat(alice)
    await n1.presence.flush()
    await n2.op(bob, "presence.subscribe", users=["alice"])
    assert await n1.op(alice, "contacts.add", users=["bob", "alice"]) == {"contacts": 1}
    last_seen = n1.presence.core.last_seen("alice")
    assert await seen(bob, 1, "alice shows bob") == [item("alice", True, None)], \
        "bob hides his last seen from alice (default contacts, she is not in his): he sees none of hers"
    await asyncio.sleep(COALESCE / 1000)
    assert await n2.op(bob, "contacts.add", users=["alice"]) == {"contacts": 1}
    assert (await n2.op(bob, "presence.get", users=["alice"]))["users"]["alice"] == {"online": True,
                                                                                   "last_seen": last_seen}
    assert len(bob.items) == 1, "the last_seen of an online user is no change for a watcher (rule 5)"
    away = await beat(n1, alice, away=True)
    items = await seen(bob, 2, "alice away")
    assert items[1]["online"] is False and items[1]["last_seen"] in away
    assert await n1.op(alice, "contacts.remove", users=["bob", "zoe"]) == {"contacts": 0}
    assert (await seen(bob, 3, "alice hides again"))[2] == item("alice", None, None)


async def test_a_watcher_on_the_users_own_node(three: Setup) -> None:
    n1, _, _, alice, _ = await three()
    carol = n1.connect("carol", "phone")
    await everyone(n1, alice, carol)
    await n1.op(carol, "presence.subscribe", users=["alice"])
    n1.beat(alice)
    assert await seen(carol, 1, "alice online") == [item("alice", True, n1.presence.core.last_seen("alice"))]
    n1.leave(alice)
    assert (await seen(carol, 2, "alice gone"))[1]["online"] is False


async def test_flapping_is_coalesced_across_nodes(three: Setup) -> None:
    n1, n2, _, alice, bob = await three()
    await everyone(n1, alice)
    await everyone(n2, bob)
    await n2.op(bob, "presence.subscribe", users=["alice"])
    started = time.monotonic()
    for _ in range(10):
        n1.beat(alice)
        await asyncio.sleep(0.05)
        away = await beat(n1, alice, away=True)
        await asyncio.sleep(0.05)
    flapped_s = time.monotonic() - started
    await eventually(lambda: bool(bob.items) and bob.items[-1]["online"] is False
                     and bob.items[-1]["last_seen"] in away, "the last state arrives")
    bound = 1 + -(-int(flapped_s * 1000) // COALESCE) + 1  # one more: the last one may land after
    assert len(bob.items) <= bound, f"{len(bob.items)} items for {flapped_s:.2f} s of flapping"


async def test_a_node_that_closes_takes_its_devices_offline(cluster: Cluster, three: Setup) -> None:
    n1, n2, _, alice, bob = await three()
    await everyone(n1, alice)
    await everyone(n2, bob)
    await n2.op(bob, "presence.subscribe", users=["alice"])
    n1.beat(alice)
    beat_at = time.monotonic()
    await seen(bob, 1, "alice online")
    last_seen = n1.presence.core.last_seen("alice")
    await cluster.close(n1)
    assert (await seen(bob, 2, "alice offline"))[1] == item("alice", False, last_seen)
    assert time.monotonic() - beat_at < W / 1000, "told at once, not when her window ran out"


async def test_the_leases_of_a_node_that_died_run_out(three: Setup) -> None:
    _, n2, _, _, bob = await three()
    await everyone(n2, bob)
    await n2.store.set_privacy("dora", "everyone")
    await n2.op(bob, "presence.subscribe", users=["dora"])
    now = int(time.time() * 1000)
    # What node "gone" wrote for dora's phone before it was SIGKILLed (it never comes back to end it).
    await n2.store.put_foreground("dora", "gone", now + W, now, now)
    await n2.bus.send("n2", Nudge(NudgeKind.PRESENCE, "dora", "gone"))
    assert await seen(bob, 1, "dora online") == [item("dora", True, now)]
    items = await seen(bob, 2, "dora offline when the lease ran out", wait_s=W / 1000 + 2.0)
    assert items[1] == item("dora", False, now)


async def test_a_master_failover_during_heartbeats_loses_no_acknowledged_last_seen(
        redis_cluster: RedisCluster, three: Setup) -> None:
    n1, n2, _, alice, bob = await three()
    await everyone(n1, alice)
    await everyone(n2, bob)
    await n2.op(bob, "presence.subscribe", users=["alice"])
    state_key = n1.store.key("p", "alice")
    killed = None
    acked = range(0)
    try:
        for round_ in range(12):
            n1.beat(alice)
            away = await beat(n1, alice, away=True)  # a foreground transition each round: a write each
            if round_ == 3:
                killed = redis_cluster.kill_master(state_key)
            await n1.presence.flush()  # retries through the failover; returns once written
            acked = away
            await asyncio.sleep(0.05)
        assert killed is not None
        redis_cluster.wait_promoted(state_key, killed)
        assert (await n1.store.look("alice", "n1", 0)).last_seen in acked, "the last acknowledged write"
        await eventually(lambda: bool(bob.items) and bob.items[-1]["online"] is False
                         and bob.items[-1]["last_seen"] in acked, "bob is told the last one")
    finally:
        if killed is not None:
            redis_cluster.restart(killed)


async def test_a_lease_that_ran_out_while_the_node_lived_is_news_at_its_renewal(three: Setup) -> None:
    """A node cut off from Redis longer than a lease: watchers elsewhere saw its users go offline;
    its next renewal (within half a window) finds the lease gone and nudges them back."""
    n1, n2, _, alice, bob = await three()
    await everyone(n1, alice)
    await everyone(n2, bob)
    await n2.op(bob, "presence.subscribe", users=["alice"])
    n1.beat(alice)
    await seen(bob, 1, "alice online")
    await n1.store.command("test", "HDEL", n1.store.key("p", "alice", "on"), "n1")  # as if it had run out
    await n2.bus.send("n2", Nudge(NudgeKind.PRESENCE, "alice", "test"))
    assert (await seen(bob, 2, "alice offline to bob"))[1]["online"] is False
    deadline = time.monotonic() + W / 1000 + 2.0
    while len(bob.items) < 3 and time.monotonic() < deadline:  # she keeps heartbeating
        n1.beat(alice)
        await asyncio.sleep(0.1)
    assert len(bob.items) == 3 and bob.items[2]["online"] is True, "online again at the renewal"
