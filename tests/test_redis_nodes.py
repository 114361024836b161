"""storage/redis/nodes.py: broker nodes on the real Redis Cluster -- leases, the device -> node
directory, nudges over sharded pub/sub, and the nudge channel across a master SIGKILLed."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from bridge.cluster.nodes import Nudge, NudgeKind
from bridge.store import StoreError
from storage.redis.nodes import RedisNodeBus, decode_nudge, encode_nudge
from testkit.redis_cluster import RedisCluster

WAIT_S = 5.0


class Inbox:
    """The nudges one node received, in order."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Nudge] = asyncio.Queue()

    def __call__(self, nudge: Nudge) -> None:
        self.queue.put_nowait(nudge)

    async def next(self, wait_s: float = WAIT_S) -> Nudge:
        return await asyncio.wait_for(self.queue.get(), wait_s)


Connect = Callable[..., Awaitable[RedisNodeBus]]


@pytest.fixture
async def connect(redis_cluster: RedisCluster) -> AsyncIterator[Connect]:
    """``await connect(node_id, **kw)``: a bus on this test's own prefix, closed after the test."""
    prefix = f"n{uuid.uuid4().hex[:12]}:"
    made: list[RedisNodeBus] = []

    async def make(node_id: str, **kw: Any) -> RedisNodeBus:
        bus = await RedisNodeBus.connect(redis_cluster.startup_nodes, prefix, node_id, **kw)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.close()


async def started(connect: Connect, node_id: str, **kw: Any) -> tuple[RedisNodeBus, Inbox]:
    bus = await connect(node_id, **kw)
    inbox = Inbox()
    await bus.start(inbox)
    return bus, inbox


async def eventually(check: Callable[[], Awaitable[bool]], what: str, wait_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + wait_s
    while not await check():
        assert time.monotonic() < deadline, f"not within {wait_s} s: {what}"
        await asyncio.sleep(0.05)


def test_a_nudge_is_one_line_and_anything_else_is_not_a_nudge() -> None:
    nudge = Nudge(NudgeKind.TAKEOVER, "alice.phone", "node-b")
    assert encode_nudge(nudge) == "takeover alice.phone node-b"
    assert decode_nudge(encode_nudge(nudge)) == nudge
    for junk in ("", "items alice.phone", "wake alice.phone b", "items a b c"):
        assert decode_nudge(junk) is None


async def test_register_locate_and_unregister_across_nodes(connect: Connect) -> None:
    a, _ = await started(connect, "a")
    b, _ = await started(connect, "b")
    assert await a.register("alice.phone") is None
    assert await b.register("bob.laptop") is None
    assert await b.register("bob.laptop") is None, "again on the same node: no one to tell"
    wanted = ["alice.phone", "bob.laptop", "bob.phone", "carol.tab", "not-a-client-id"]
    assert await a.locate(wanted) == await b.locate(wanted) == {"alice.phone": "a", "bob.laptop": "b"}

    await a.unregister("bob.laptop")  # not a's: b's entry stays
    assert await a.locate(["bob.laptop"]) == {"bob.laptop": "b"}
    await b.unregister("bob.laptop")
    assert await a.locate(wanted) == {"alice.phone": "a"}

    await a.close()  # its entries go with it
    assert await b.locate(wanted) == {}


async def test_a_takeover_names_the_node_that_had_the_device(connect: Connect) -> None:
    a, _ = await started(connect, "a")
    b, _ = await started(connect, "b")
    c, _ = await started(connect, "c")
    assert await a.register("alice.phone") is None
    assert await b.register("alice.phone") == "a"
    assert await c.register("alice.phone") == "b"
    await b.unregister("alice.phone")  # b drops its stale connection: c's entry stays
    await a.unregister("alice.phone")
    assert await a.locate(["alice.phone"]) == {"alice.phone": "c"}


async def test_a_node_whose_lease_lapses_is_forgotten(connect: Connect) -> None:
    a, _ = await started(connect, "a")
    c, _ = await started(connect, "c", lease_s=0.6)
    await c.register("carol.phone")
    await a.register("alice.phone")
    assert await a.locate(["carol.phone"]) == {"carol.phone": "c"}
    assert [n.node_id for n in await a.nodes()] == ["a", "c"]

    renewal = next(t for t in asyncio.all_tasks() if t.get_name() == "lease c")
    renewal.cancel()  # c stops renewing, as if cut off from Redis

    async def carol_gone() -> bool:
        return await a.locate(["carol.phone", "alice.phone"]) == {"alice.phone": "a"}
    await eventually(carol_gone, "c's device no longer located")
    assert [n.node_id for n in await a.nodes()] == ["a"]
    assert await a.register("carol.phone") is None, "a dead node is no one to tell"


async def test_a_node_that_lost_its_lease_takes_it_again_with_its_devices(connect: Connect) -> None:
    a, _ = await started(connect, "a")
    c, c_inbox = await started(connect, "c", lease_s=0.6)
    for device in ("phone", "tab"):
        await c.register(f"carol.{device}")
    await a.command("test.expire", "DEL", a.key("n", "c"))  # the lease ran out while c was cut off
    assert await a.locate(["carol.phone", "carol.tab"]) == {}
    assert await a.register("carol.tab") is None, "carol's tab reconnected through a"

    async def back() -> bool:
        return await a.locate(["carol.phone", "carol.tab"]) == {"carol.phone": "c", "carol.tab": "a"}
    await eventually(back, "c registered its devices again, but not the one a has now")
    assert await c_inbox.next() == Nudge(NudgeKind.TAKEOVER, "carol.tab", "a"), "c drops its stale connection"


async def test_a_node_that_lost_its_lease_reads_its_queues_again(connect: Connect) -> None:
    a, _ = await started(connect, "a")
    c, c_inbox = await started(connect, "c", lease_s=0.6)
    await c.register("carol.phone")
    await a.command("test.expire", "DEL", a.key("n", "c"))  # the lease ran out while c was cut off
    assert await a.locate(["carol.phone"]) == {}, "no one nudges c for carol meanwhile"
    assert await c_inbox.next() == Nudge(NudgeKind.RESYNC, "", "c"), "c reads its devices' queues again"


async def test_a_second_start_with_a_live_node_id_is_refused(connect: Connect) -> None:
    a, _ = await started(connect, "a")
    twin = await connect("a")
    with pytest.raises(StoreError, match="'a' is held by a live node"):
        await twin.start(Inbox())
    await a.close()
    await twin.start(Inbox())  # a closed: its lease went with it
    assert [n.node_id for n in await twin.nodes()] == ["a"]


async def test_nudges_arrive_in_order(connect: Connect) -> None:
    a, inbox = await started(connect, "a")
    b, _ = await started(connect, "b")
    kinds = [NudgeKind.ITEMS, NudgeKind.TAKEOVER, NudgeKind.PRESENCE]
    sent = [Nudge(kinds[i % 3], f"u{i}.phone" if i % 3 < 2 else f"u{i}", "b") for i in range(30)]
    for nudge in sent:
        await b.send("a", nudge)
    assert [await inbox.next() for _ in sent] == sent
    await b.send("nobody", sent[0])  # no such node: lost, silently
    await a.send("a", sent[1])
    assert await inbox.next() == sent[1]


async def test_a_failing_handler_does_not_stop_the_nudges(connect: Connect) -> None:
    inbox = Inbox()

    def handler(nudge: Nudge) -> None:
        if nudge.target == "bad":
            raise RuntimeError("the handler fails")
        inbox(nudge)

    a = await connect("a")
    await a.start(handler)
    await a.send("a", Nudge(NudgeKind.ITEMS, "bad", "a"))
    await a.send("a", Nudge(NudgeKind.ITEMS, "good", "a"))
    assert (await inbox.next()).target == "good"


async def test_nudges_arrive_again_after_the_master_of_the_channel_is_killed(
        redis_cluster: RedisCluster, connect: Connect) -> None:
    a, inbox = await started(connect, "a")
    b, _ = await started(connect, "b")
    await b.send("a", Nudge(NudgeKind.ITEMS, "before", "b"))
    assert (await inbox.next()).target == "before"

    killed = await asyncio.to_thread(redis_cluster.kill_master, a.key("ch", "a"))
    try:
        started_at = time.monotonic()
        probe = 0
        resyncs = []
        while True:  # nudges sent until one arrives: those sent before a re-subscribes are lost
            probe += 1
            await b.send("a", Nudge(NudgeKind.ITEMS, f"probe{probe}", "b"))
            try:
                arrived = await inbox.next(wait_s=0.2)
            except TimeoutError:
                assert time.monotonic() - started_at < 20, "a subscribed again within 20 s"
                continue
            if arrived.kind != NudgeKind.RESYNC:
                break
            resyncs.append(arrived)
        took = time.monotonic() - started_at
        assert resyncs == [Nudge(NudgeKind.RESYNC, "", "a")], "first its own bus says nudges may have been lost"
        await b.send("a", Nudge(NudgeKind.ITEMS, "after", "b"))
        rest = [await inbox.next()]
        while rest[-1].target != "after":
            rest.append(await inbox.next())
        assert [n.target for n in [arrived, *rest]] == [f"probe{i}" for i in range(int(arrived.target[5:]), probe + 1)
                                                        ] + ["after"], "in order once back"
        assert [n.node_id for n in await b.nodes()] == ["a", "b"], "a's lease lived through it"
    finally:
        await asyncio.to_thread(redis_cluster.restart, killed)
    assert took > 1.0, f"nudges were lost while no master served the channel ({took:.1f} s)"


async def test_the_subscription_follows_its_slot_to_a_new_master(
        redis_cluster: RedisCluster, connect: Connect, caplog: pytest.LogCaptureFixture) -> None:
    """A manual failover (no error on the connection): Redis ends the subscription with a
    ``sunsubscribe`` and the node subscribes again on the new master."""
    a, inbox = await started(connect, "a")
    channel = a.key("ch", "a")
    slot = redis_cluster.slot(channel)
    old = redis_cluster.master_of(slot)
    replicas: list[tuple[str, int]] = []

    async def replica_known() -> bool:  # a node restarted by an earlier test may not be listed yet
        ranges = await a.command("test.slots", "CLUSTER SLOTS")
        replicas[:] = next(served["replicas"] for (low, high), served in ranges.items() if low <= slot <= high)
        return bool(replicas)
    await eventually(replica_known, f"a replica of slot {slot} listed", wait_s=15)
    host, port = replicas[0]
    failover = ["redis-cli", "-h", host, "-p", str(port), "CLUSTER", "FAILOVER"]
    done = await asyncio.to_thread(subprocess.run, failover, capture_output=True, text=True, check=True)
    assert done.stdout == "OK\n"
    try:
        async def moved() -> bool:
            return "subscribed again" in caplog.text
        await eventually(moved, "a subscribed again after Redis ended its subscription")
        assert "slot moved" in caplog.text
        assert await inbox.next() == Nudge(NudgeKind.RESYNC, "", "a"), "told that nudges may have been lost"
        await a.send("a", Nudge(NudgeKind.ITEMS, "after", "a"))
        assert (await inbox.next()).target == "after"
        await asyncio.to_thread(redis_cluster.wait_ok)  # every node's view agrees before asking one
        assert redis_cluster.master_of(slot) is not old
    finally:
        await asyncio.to_thread(redis_cluster.wait_ok)


async def test_a_read_only_bus_lists_the_nodes_and_locates(connect: Connect) -> None:
    a, _ = await started(connect, "a", lease_s=0.6)
    await started(connect, "b")
    await a.register("alice.phone")
    a.report(5)
    status = await connect("")
    assert status.node_id == ""

    async def reported() -> bool:
        return {n.node_id: n.connections for n in await status.nodes()} == {"a": 5, "b": 0}
    await eventually(reported, "a's count published with its next renewal")
    info = {n.node_id: n for n in await status.nodes()}
    assert 0 < info["a"].lease_left_ms <= 600 and 0 < info["b"].lease_left_ms <= 10_000
    assert info["a"].started_ms <= time.time() * 1000
    assert await status.locate(["alice.phone"]) == {"alice.phone": "a"}
    with pytest.raises(RuntimeError, match="read-only"):
        await status.start(Inbox())
    with pytest.raises(RuntimeError, match="read-only"):
        await status.register("alice.phone")
