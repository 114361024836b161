"""Cluster mode's group log (storage/redis/group_log.py) and its fanout step in the member slots
(``RedisQueueStore.stage_group``) against a real Redis Cluster: one entry per change or message, the
body once, repeats and non-members, a fanout run twice staging nothing twice, the body deleted with the
last item (acked, expired or its device removed), the lease, the hints and the node's body cache. Each
test has its own key prefix."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest

from bridge.cluster.group_store import Completed, GroupAck, GroupExpiry, GroupPost, Mark, MarkKind, PostStatus
from bridge.groups.core import GroupLimits, create, decide, new_group_id
from chatproto import GroupAdd, GroupCreate, GroupItem, GroupRemove, MsgItem
from storage.redis.group_log import RedisGroupLog
from storage.redis.queues import RedisQueueStore
from storage.redis.users import RedisUserStore
from testkit.redis_cluster import RedisCluster

FAR = 10**13
D, S, X = MarkKind.DELIVERED, MarkKind.SEEN, MarkKind.GONE
LIMITS = GroupLimits()


@dataclass
class Stores:
    log: RedisGroupLog
    queues: RedisQueueStore
    users: RedisUserStore
    prefix: str

    async def keys(self, pattern: str) -> list[str]:
        client = self.log._client
        return sorted([str(key) async for key in client.scan_iter(match=self.prefix + pattern, count=1000)])

    async def group(self, *members: str) -> str:
        """A group of ``members`` (the first creates it), its ``created`` event logged."""
        gid = new_group_id()
        decision = create(gid, members[0], GroupCreate("g", tuple(members[1:])), LIMITS, 1)
        assert await self.log.commit_logged(None, decision, LIMITS.max_groups_per_user, FAR)
        return gid

    def post(self, gid: str, msg_id: str, sender: str = "alice", origin: str = "alice.phone") -> GroupPost:
        wire = MsgItem(0, msg_id, sender, gid, "text", f"body of {msg_id}", 1, "phone").encode().decode()
        return GroupPost(gid, sender, origin, msg_id, wire, FAR, FAR)


@pytest.fixture
async def stores(redis_cluster: RedisCluster) -> AsyncIterator[Stores]:
    prefix = f"gl{uuid.uuid4().hex[:12]}:"
    log = await RedisGroupLog.open(redis_cluster.startup_nodes, prefix)
    queues = RedisQueueStore(log._client, prefix)
    users = RedisUserStore(log._client, prefix)
    await users.add_users([(user, "x") for user in ("alice", "bob", "carol")])
    for user, device in (("alice", "phone"), ("alice", "laptop"), ("bob", "phone")):
        await users.record_login(user, device)
    try:
        yield Stores(log, queues, users, prefix)
    finally:
        await log.close()


async def test_a_post_is_one_entry_with_its_body_once_and_a_repeat_keeps_its_gseq(stores: Stores) -> None:
    gid = await stores.group("alice", "bob", "carol")
    assert await stores.log.post(stores.post(gid, "m1")) == (PostStatus.POSTED, 2)
    assert await stores.log.post(stores.post(gid, "m1")) == (PostStatus.DUPLICATE, 0)
    assert await stores.log.post(stores.post(gid, "m2")) == (PostStatus.POSTED, 3)
    assert await stores.log.post(stores.post(gid, "x", "dave", "dave.phone")) == (PostStatus.FORBIDDEN, 0)
    entries = await stores.log.entries(gid, 10)
    assert [(e.gseq, e.event.event if e.event else e.origin) for e in entries] == [
        (1, "created"), (2, "alice.phone"), (3, "alice.phone")]
    assert all(e.users == ("alice", "bob", "carol") for e in entries)
    assert len(await stores.keys("g:*:b:*")) == 2  # one body per message, whatever the members


async def test_a_fanout_run_twice_stages_nothing_twice_and_keeps_gseq_order(stores: Stores) -> None:
    gid = await stores.group("alice", "bob")
    await stores.log.post(stores.post(gid, "m1"))
    entries = await stores.log.entries(gid, 10)
    first = await stores.queues.stage_group("alice", entries, 100)
    # the created event to both devices, the message not to the phone that sent it
    assert sorted(client for client, _ in first.targets) == ["alice.laptop", "alice.laptop", "alice.phone"]
    again = await stores.queues.stage_group("alice", entries, 100)
    assert again.targets == () and again.again == ("alice.laptop", "alice.phone")  # woken again, nothing staged
    assert (await stores.queues.stage_group("alice", entries[:1], 100)).targets == ()  # never below
    await stores.queues.stage_group("bob", entries, 100)
    items = [q.item for q in await stores.queues.read("bob.phone", 0, 10)]
    assert isinstance(items[0], GroupItem) and (items[0].event, items[0].gseq) == ("created", 1)
    assert isinstance(items[1], MsgItem) and (items[1].id, items[1].gseq, items[1].body) == ("m1", 2, "body of m1")
    assert items[0].seq is not None and items[1].seq is not None and items[0].seq < items[1].seq


async def test_the_body_goes_with_the_last_member_holding_it(stores: Stores) -> None:
    gid = await stores.group("alice", "bob")
    decision = decide(await stores.log.load(gid), "alice", GroupAdd(gid, ("carol",)), LIMITS, 2)
    assert await stores.log.commit_logged(await stores.log.load(gid), decision, LIMITS.max_groups_per_user, FAR)
    await stores.log.post(stores.post(gid, "m1", origin="alice.laptop"))
    token = "t1"
    assert await stores.log.take_lease(gid, token, 10_000)
    assert not await stores.log.take_lease(gid, "t2", 10_000)
    entries = await stores.log.entries(gid, 10)
    fans = {user: await stores.queues.stage_group(user, [e for e in entries if user in e.users], 100)
            for user in ("alice", "bob", "carol")}
    assert fans["alice"].unheld == ()  # the phone has it
    assert not await stores.log.fanned(gid, "t2", entries[-1].gseq, [], 10_000), "not the lease's token"
    assert await stores.log.fanned(gid, token, entries[-1].gseq, [g for f in fans.values() for g in f.unheld], 10_000)
    assert await stores.log.entries(gid, 10) == []
    assert await stores.log.release(gid, token)
    for client_id in ("alice.phone", "bob.phone"):
        assert await stores.keys("g:*:b:*"), f"the body is kept while {client_id} holds an item of it"
        items = await stores.queues.read(client_id, 0, 10)
        await stores.queues.ack(client_id, [q.seq for q in items])
    assert await stores.keys("g:*:b:*")
    assert await stores.queues.remove_device("carol.*") == 2  # her addition, the message: a removal counts too
    await stores.queues.flush()  # counted down in batches (or a delay later)
    assert await stores.keys("g:*:b:*") == []
    assert await stores.keys("qm:*") == []


async def test_a_fanout_run_again_reports_the_members_with_no_item_again(stores: Stores) -> None:
    """A fanout that stopped between staging and ``fanned`` (a node died, a Redis call failed, its lease
    ran out) is run again by a sweep: the members who got no item (bob sent m1 from his only device) are
    reported again, so the body is counted down to nothing once the others ack; a batch after that forgets
    them."""
    gid = await stores.group("alice", "bob")
    _, m1 = await stores.log.post(stores.post(gid, "m1", "bob", "bob.phone"))
    entries = await stores.log.entries(gid, 10)
    first = await stores.queues.stage_group("bob", entries, 100)
    assert first.unheld == (m1,)
    await stores.queues.stage_group("alice", entries, 100)
    # ... the fanner stops here; the sweep's fanout stages the same entries again
    again = {user: await stores.queues.stage_group(user, entries, 100) for user in ("alice", "bob")}
    assert again["bob"].unheld == (m1,) and again["bob"].targets == (), "reported again, nothing staged twice"
    assert again["alice"].unheld == ()
    assert await stores.log.take_lease(gid, "t", 10_000)
    assert await stores.log.fanned(gid, "t", entries[-1].gseq, [m1], 10_000)
    items = await stores.queues.read("alice.phone", 0, 10) + await stores.queues.read("alice.laptop", 0, 10)
    for client_id in ("alice.phone", "alice.laptop"):
        await stores.queues.ack(client_id, [q.seq for q in await stores.queues.read(client_id, 0, 10)])
    assert len(items) == 4, "the created event and m1 on both of alice's devices"
    await stores.queues.flush()
    assert await stores.keys("g:*:b:*") == [], "bob counted off once, alice once she acked"
    _, m2 = await stores.log.post(stores.post(gid, "m2", "bob", "bob.phone"))
    later = await stores.queues.stage_group("bob", await stores.log.entries(gid, 10), 100)
    assert later.unheld == (m2,)
    assert (await stores.queues.stage_group("bob", entries, 100)).unheld == (), "m1 left the log: not again"


async def test_the_lease_is_not_released_while_entries_remain(stores: Stores) -> None:
    gid = await stores.group("alice", "bob")
    assert await stores.log.take_lease(gid, "t", 10_000)
    assert not await stores.log.release(gid, "t"), "the created event is still logged"
    assert not await stores.log.take_lease(gid, "u", 10_000)
    removal = decide(await stores.log.load(gid), "alice", GroupRemove(gid, ("bob",)), LIMITS, 2)
    assert await stores.log.commit_logged(await stores.log.load(gid), removal, LIMITS.max_groups_per_user, FAR)
    assert [e.users for e in await stores.log.entries(gid, 10)] == [("alice", "bob"), ("alice", "bob")]
    await stores.log.post(stores.post(gid, "after"))
    assert (await stores.log.entries(gid, 10))[-1].users == ("alice",), "the removed member gets nothing more"


async def test_a_hint_is_cleared_only_at_the_time_it_was_read(stores: Stores) -> None:
    gid = await stores.group("alice")
    await stores.log.hint(gid, 1000)
    await stores.log.hint(gid, 500)  # an earlier time does not move it back
    assert (gid, 1000) in await stores.log.due(2000, 100)
    assert (gid, 1000) not in await stores.log.due(999, 100)
    await stores.log.hint(gid, 3000)  # a newer post
    await stores.log.clear_hint(gid, 1000)
    assert (gid, 3000) in await stores.log.due(4000, 100)
    await stores.log.clear_hint(gid, 3000)
    assert gid not in [g for g, _ in await stores.log.due(4000, 100)]


async def test_a_node_reads_a_body_once_for_all_its_member_devices(stores: Stores) -> None:
    gid = await stores.group("alice", "bob")
    await stores.log.post(stores.post(gid, "m1"))
    await stores.log.post(stores.post(gid, "m2"))
    entries = await stores.log.entries(gid, 10)
    for user in ("alice", "bob"):
        await stores.queues.stage_group(user, entries, 100)
    reads: list[int] = []
    real_run = stores.queues.run

    async def counting(name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        if name == "queues.group_bodies":
            reads.append(len(keys))
        return await real_run(name, keys, args)

    stores.queues.run = counting  # type: ignore[method-assign]
    for client_id in ("bob.phone", "alice.laptop", "alice.phone"):
        bodies = [q.item.body for q in await stores.queues.read(client_id, 0, 10) if isinstance(q.item, MsgItem)]
        assert bodies == (["body of m1", "body of m2"] if client_id != "alice.phone" else [])
    assert reads == [2], "one script for both bodies of the group, then the node's cache"


# --- receipts ---------------------------------------------------------------------------------------

async def test_delivered_then_seen_complete_once_and_leave_nothing(stores: Stores) -> None:
    gid = await stores.group("alice", "bob", "carol")
    _, gseq = await stores.log.post(stores.post(gid, "m1"))
    [row] = await stores.log.tracked(gid, "m1")
    assert (row.mid, row.sender, row.members, row.seen_tracked) == (gseq, "alice", ("bob", "carol"), True)
    assert row.marks == {"bob": (0, 0), "carol": (0, 0)}
    assert await stores.log.mark(gid, [Mark(D, "bob", gseq), Mark(D, "alice", gseq), Mark(D, "bob", gseq)], "a") == []
    done = await stores.log.mark(gid, [Mark(D, "carol", gseq)], "b")
    assert done == [Completed(gseq, "alice", "m1", True, False)]
    assert await stores.log.mark(gid, [Mark(D, "carol", gseq)], "b") == done, "a retry answers the first run"
    assert await stores.log.mark(gid, [Mark(D, "carol", gseq)], "c") == done, "pending: reported again"
    assert await stores.log.pending(gid) == [gseq]
    assert await stores.log.mark(gid, [Mark(MarkKind.PENDING, "", gseq)], "s") == done, "what a sweep finds"
    await stores.log.receipted(gid, done)
    assert await stores.log.pending(gid) == []
    assert await stores.log.mark(gid, [Mark(D, "carol", gseq)], "c2") == [], "its receipts staged: reported once"
    assert await stores.log.mark(gid, [Mark(S, "bob", msg_id="m1"), Mark(S, "bob", msg_id="nope")], "d") == []
    [row] = await stores.log.tracked(gid, "m1")
    assert row.marks["bob"][1] > 0 and row.marks["carol"][1] == 0
    seen = await stores.log.mark(gid, [Mark(S, "carol", msg_id="m1")], "e")
    assert seen == [Completed(gseq, "alice", "m1", False, True)]
    assert await stores.log.tracked(gid, "m1") == [], "complete: not tracked any more"
    assert await stores.keys("g:*:t:*"), "kept until its receipts are staged"
    await stores.log.receipted(gid, seen)
    assert [k for k in await stores.keys("g:*") if ":t:" in k or ":i:" in k or ":u:" in k] == []


async def test_a_seen_report_implies_delivered_and_names_every_sender_s_message(stores: Stores) -> None:
    gid = await stores.group("alice", "bob", "carol")
    _, first = await stores.log.post(stores.post(gid, "same"))
    _, second = await stores.log.post(stores.post(gid, "same", "bob", "bob.phone"))
    assert await stores.log.mark(gid, [Mark(S, "carol", msg_id="same")], "a") == []
    assert [(r.sender, r.marks["carol"][0] > 0) for r in await stores.log.tracked(gid, "same")] == [
        ("alice", True), ("bob", True)]
    done = await stores.log.mark(gid, [Mark(S, "bob", msg_id="same"), Mark(S, "alice", msg_id="same")], "b")
    assert done == [Completed(first, "alice", "same", True, True), Completed(second, "bob", "same", True, True)]
    await stores.log.receipted(gid, done)
    assert await stores.keys("g:*:t:*") == []


async def test_seen_is_tracked_up_to_the_threshold_and_members_with_nothing_are_not_waited_for(
        stores: Stores) -> None:
    gid = await stores.group("alice", "bob", "carol")
    _, gseq = await stores.log.post(replace(stores.post(gid, "big"), seen_max=2))
    [row] = await stores.log.tracked(gid, "big")
    assert row.seen_tracked is False
    assert await stores.log.mark(gid, [Mark(S, "bob", msg_id="big")], "a") == [], "ignored: no delivered either"
    assert await stores.log.mark(gid, [Mark(D, "bob", gseq)], "b") == []
    assert await stores.log.mark(gid, [Mark(X, "carol", gseq)], "c") == [Completed(gseq, "alice", "big", True, False)]
    assert await stores.log.tracked(gid, "big") == []
    await stores.log.post(replace(stores.post(gid, "none"), seen_max=0))
    assert (await stores.log.tracked(gid, "none"))[0].seen_tracked is False
    solo = await stores.group("alice")
    await stores.log.post(stores.post(solo, "x"))
    assert await stores.log.tracked(solo, "x") == [], "nobody to wait for: not tracked"


async def test_a_sender_keeps_at_most_max_tracked_per_group(stores: Stores) -> None:
    gid = await stores.group("alice", "bob")
    gseqs = [(await stores.log.post(replace(stores.post(gid, f"m{n}"), max_tracked=2)))[1]
             for n in range(4)]
    assert [bool(await stores.log.tracked(gid, f"m{n}")) for n in range(4)] == [False, False, True, True]
    assert await stores.log.mark(gid, [Mark(D, "bob", gseqs[0])], "a") == [], "forgotten: never completes"
    await stores.log.post(stores.post(gid, "b1", "bob", "bob.phone"))  # another sender's count
    assert await stores.log.tracked(gid, "m3") and await stores.log.tracked(gid, "b1")


async def test_an_ack_names_the_group_items_it_removed(stores: Stores) -> None:
    gid = await stores.group("alice", "bob")
    _, gseq = await stores.log.post(stores.post(gid, "m1"))
    entries = await stores.log.entries(gid, 10)
    await stores.queues.stage_group("bob", entries, 100)
    items = await stores.queues.read("bob.phone", 0, 10)
    acked = await stores.queues.ack("bob.phone", [q.seq for q in items])
    assert acked == [GroupAck(gid, gseq, "bob")], "the created event is no message; the message is"
    assert await stores.log.mark(gid, [Mark(D, a.member, a.gseq) for a in acked if isinstance(a, GroupAck)],
                                 "t") == [Completed(gseq, "alice", "m1", True, False)]


async def test_expired_items_are_reported_to_the_group_once_and_count_their_users_off_the_body(
        stores: Stores) -> None:
    gid = await stores.group("alice", "bob")
    await stores.users.record_login("bob", "laptop")
    post = stores.post(gid, "m1", origin="alice.laptop")
    soon = int(time.time() * 1000) + 3_600_000  # the body lives an hour past this: the sweep drops the items first
    await stores.log.post(replace(post, expires_ms=soon))
    entries = await stores.log.entries(gid, 10)
    for user in ("alice", "bob"):
        await stores.queues.stage_group(user, entries, 100)
    assert len(await stores.keys("g:*:b:*")) == 1
    swept = {c: await stores.queues.expire(c, soon) for c in ("alice.phone", "bob.phone", "bob.laptop")}
    assert [s.items for s in swept.values()] == [1, 1, 1] and all(s.expired == [] for s in swept.values())
    # alice's history copy was her last item of it, bob's phone's not (the laptop still had it)
    assert [s.groups for s in swept.values()] == [[GroupExpiry(gid, 2, True)], [GroupExpiry(gid, 2, False)],
                                                  [GroupExpiry(gid, 2, True)]]
    expiring = Completed(2, "alice", "m1", False, False, True)
    assert await stores.log.expire(gid, swept["bob.phone"].groups, "t1") == [expiring]
    assert await stores.log.expire(gid, swept["bob.phone"].groups, "t1") == [expiring], "a retry: the same"
    assert await stores.log.expire(gid, swept["alice.phone"].groups + swept["bob.laptop"].groups, "t2") == [expiring]
    assert await stores.log.expiring(gid) == [2]
    await stores.queues.flush()
    assert len(await stores.keys("g:*:b:*")) == 1, "counted off, but kept until its receipt is staged"
    await stores.log.expired_done(gid, [2])
    assert await stores.log.expiring(gid) == [] and await stores.keys("g:*:b:*") == []
    assert await stores.log.expire(gid, [GroupExpiry(gid, 2, False)], "t3") == [], "nothing after it"


async def test_an_expiry_forgets_the_tracking_and_answers_its_pending_completion_first(stores: Stores) -> None:
    gid = await stores.group("alice", "bob", "carol")
    _, gseq = await stores.log.post(stores.post(gid, "m1"))
    await stores.log.mark(gid, [Mark(D, "bob", gseq)], "t0")
    assert await stores.log.mark(gid, [Mark(D, "carol", gseq)], "t1") == [Completed(gseq, "alice", "m1", True, False)]
    # its node died before staging 'delivered': it is pending when a device's copy expires
    assert await stores.log.expire(gid, [GroupExpiry(gid, gseq, False)], "t2") == [
        Completed(gseq, "alice", "m1", True, False, True)]
    assert await stores.log.tracked(gid, "m1") == [] and await stores.log.pending(gid) == []
    assert await stores.keys("g:*:[tiu]:*") == [], "the tracking is forgotten"
    assert await stores.log.mark(gid, [Mark(S, "bob", msg_id="m1"), Mark(S, "carol", msg_id="m1")], "t3") == []
    assert await stores.log.expire(gid, [GroupExpiry(gid, gseq, False)], "t4") == [
        Completed(gseq, "alice", "m1", True, False, True)], "answered again until its receipts are staged"
    await stores.log.expired_done(gid, [gseq])
    assert await stores.log.expire(gid, [GroupExpiry(gid, gseq, False)], "t5") == []


async def test_the_high_water_mark_of_a_group_left_goes_after_the_grace(stores: Stores) -> None:
    queues = RedisQueueStore(stores.log._client, stores.prefix, gw_grace_ms=300)
    gid, other = await stores.group("alice", "bob"), await stores.group("alice", "bob")
    for change in (GroupRemove(gid, ("bob",)), GroupAdd(gid, ("bob",))):
        decision = decide(await stores.log.load(gid), "alice", change, LIMITS, 2)
        assert await stores.log.commit_logged(await stores.log.load(gid), decision, LIMITS.max_groups_per_user, FAR)
    created, removed, added = await stores.log.entries(gid, 10)
    marks = stores.prefix + "gw:{bob}"
    client = stores.log._client
    await queues.stage_group("bob", [created, removed], 100)
    assert (await queues.stage_group("bob", [created, removed], 100)).targets == (), "kept: a fanout run again"
    assert await client.hget(marks, gid) == "2"
    await asyncio.sleep(0.4)
    await queues.stage_group("bob", (await stores.log.entries(other, 10))[:1], 100)  # any group's fanout drops it
    assert await client.hgetall(marks) == {other: "1"} and await stores.keys("gwx:*") == []
    assert (await queues.stage_group("bob", [added], 100)).targets != (), "rejoined"
    assert (await queues.stage_group("bob", [created, removed], 100)).targets == (), "never below the rejoin"
    await queues.stage_group("bob", [removed], 100)
    assert await stores.keys("gwx:*") == [], "a member again: the entry of the old removal changes nothing"
    # left and back within the grace: the mark stays
    await stores.queues.stage_group("carol", [created, removed], 100)
    await stores.queues.stage_group("carol", [added], 100)
    assert await stores.keys("gwx:*") == []
