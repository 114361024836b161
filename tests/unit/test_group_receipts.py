"""Group receipts: the pure book (bridge/messaging/group_receipts.py), the staging core that stages
them (bridge/messaging/groups.py rule 6), the ``group.receipts`` answer (bridge/groups/core.py rule 10)
and their rows in SQLite (storage/sqlite/group_receipts.py). Explicit times, no network."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.directory import Directory
from bridge.groups.core import Group, GroupRefused, receipts
from bridge.limits import RateLimiter, RecentIds
from bridge.messaging.group_receipts import GroupReceipts, ReceiptWrites, TrackedRow, detail
from bridge.messaging.groups import GroupStaging
from bridge.messaging.records import FlushBatch, StagingOutcome
from chatproto import ChatMessage, ErrorCode
from chatproto import GroupReceipts as GroupReceiptsRequest
from storage.sqlite.messages import SqliteMessageStore
from tests.unit.test_staging import RULES, kinds

GROUP = "g:AAAAAAAAAAAAAAAAAAAAAA"
MEMBERS = ("alice", "bob", "carol", "dave")


def book(seen_max: int = 256, per_sender: int = 100) -> tuple[GroupReceipts, ReceiptWrites]:
    return GroupReceipts(seen_max, per_sender), ReceiptWrites()


def test_delivered_completes_at_the_last_member_only_and_seen_after_every_report() -> None:
    b, w = book()
    b.track(7, "alice", "m1", GROUP, 4, ["bob", "carol", "dave"], 10_000, w)
    assert b.delivered(7, "bob", 100, w) is None
    assert b.delivered(7, "bob", 101, w) is None, "a member's second device changes nothing"
    assert b.delivered(7, "alice", 102, w) is None, "the sender's other devices are not waited for"
    assert b.delivered(7, "carol", 103, w) is None
    step = b.delivered(7, "dave", 104, w)
    assert step is not None and step.delivered and not step.seen
    assert b.seen(GROUP, "bob", ["m1"], 200, w) == [] and b.seen(GROUP, "carol", ["m1", "m1"], 201, w) == []
    [last] = b.seen(GROUP, "dave", ["m1"], 202, w)
    assert last.seen and not last.delivered and len(b) == 0 and w.done == [7]
    assert w.marks[:2] == [(7, "bob", 100, 0), (7, "carol", 103, 0)]


def test_a_seen_report_implies_delivered_and_can_complete_both_at_once() -> None:
    b, w = book()
    b.track(7, "alice", "m1", GROUP, 3, ["bob", "carol"], 10_000, w)
    b.delivered(7, "bob", 100, w)
    assert b.seen(GROUP, "bob", ["m1"], 150, w) == []
    assert detail(b.find(GROUP, "m1")[0])["members"] == {"bob": {"delivered": 100, "seen": 150},
                                                         "carol": {"delivered": None, "seen": None}}
    [step] = b.seen(GROUP, "carol", ["m1"], 160, w)
    assert step.delivered and step.seen and len(b) == 0
    assert w.marks[-1] == (7, "carol", 160, 160)


def test_seen_is_not_tracked_above_the_threshold_nor_when_off() -> None:
    for seen_max in (3, 0):
        b, w = book(seen_max=seen_max)
        b.track(7, "alice", "m1", GROUP, 4, ["bob", "carol", "dave"], 10_000, w)
        assert b.seen(GROUP, "bob", ["m1"], 100, w) == [], "accepted and ignored"
        assert detail(b.find(GROUP, "m1")[0])["seen_tracked"] is False
        assert b.delivered(7, "bob", 100, w) is None and b.delivered(7, "carol", 100, w) is None
        step = b.delivered(7, "dave", 100, w)
        assert step is not None and step.delivered and len(b) == 0, "complete once delivered to all"
    b, w = book(seen_max=4)
    b.track(7, "alice", "m1", GROUP, 4, ["bob"], 10_000, w)
    assert detail(b.find(GROUP, "m1")[0])["seen_tracked"] is True, "at most seen_max members: tracked"


def test_nobody_to_wait_for_is_not_tracked_and_strangers_change_nothing() -> None:
    b, w = book()
    b.track(7, "alice", "m1", GROUP, 1, [], 10_000, w)
    assert len(b) == 0 and w.empty()
    b.track(8, "alice", "m2", GROUP, 2, ["bob"], 10_000, w)
    assert b.seen(GROUP, "eve", ["m2"], 100, w) == [] and b.seen("g:other", "bob", ["m2"], 100, w) == []
    assert b.delivered(8, "eve", 100, w) is None and b.delivered(99, "bob", 100, w) is None
    assert len(w.marks) == 0


def test_expiry_and_the_per_sender_cap_forget_the_oldest() -> None:
    b, w = book(per_sender=2)
    for n in range(3):
        b.track(n, "alice", f"m{n}", GROUP, 2, ["bob"], 1000 + n, w)
    b.track(10, "bob", "b0", GROUP, 2, ["alice"], 1003, w)
    assert w.done == [0] and not b.find(GROUP, "m0") and len(b) == 3, "alice's oldest made room"
    b.expire(1002, w)
    assert w.done == [0, 1, 2] and [t.mid for t in b.find(GROUP, "b0")] == [10]


def test_restore_rebuilds_what_is_missing() -> None:
    b, w = book()
    b.restore([TrackedRow(5, "alice", "m1", GROUP, 10_000, ("bob", "carol"), True, {"bob": (100, 0)}),
               TrackedRow(6, "alice", "m2", GROUP, 10_000, ("bob", "carol"), False, {"bob": (100, 0)})])
    first, second = b.find(GROUP, "m1")[0], b.find(GROUP, "m2")[0]
    assert first.roster is second.roster, "one roster for the same members"
    assert b.delivered(5, "bob", 200, w) is None, "bob had it before the restart"
    step = b.delivered(6, "carol", 200, w)
    assert step is not None and step.delivered and len(b) == 1


def test_random_steps_complete_each_message_once_never_seen_before_delivered() -> None:
    rng = random.Random(17)
    for _ in range(200):
        b, w = book(seen_max=rng.choice([0, 3, 256]))
        members = ["bob", "carol", "dave"]
        b.track(1, "alice", "m1", GROUP, 4, members, 10_000, w)
        events: list[str] = []
        for _ in range(12):
            member = rng.choice([*members, "alice", "eve"])
            steps = ([b.delivered(1, member, 5, w)] if rng.random() < 0.5
                     else list(b.seen(GROUP, member, ["m1"], 5, w)))
            for step in filter(None, steps):
                events += ["delivered"] * step.delivered + ["seen"] * step.seen
        assert events in ([], ["delivered"], ["delivered", "seen"])
        assert (len(b) == 0) == (events == ["delivered", "seen"] or (events == ["delivered"] and b.seen_max < 4))


# --- the staging core ------------------------------------------------------------------------------


def staging(seen_max: int = 256) -> GroupStaging:
    directory = Directory()
    directory.load([("alice", "phone"), ("alice", "tablet"), ("bob", "phone"), ("bob", "laptop"),
                    ("carol", "phone")])
    return GroupStaging(replace(RULES, window=100), 1, directory, RateLimiter(1.0, 1000), RecentIds(1000),
                        receipts=GroupReceipts(seen_max, 100))


def write(s: GroupStaging, now: float) -> tuple[StagingOutcome, FlushBatch]:
    batch = s.take_flush(now)
    assert batch is not None
    return s.flush_done(batch, now), batch


def receipts_of(out: StagingOutcome, device: str) -> list[tuple[str, list[str]]]:
    return [(status, ids) for d, status, ids in kinds(out) if d == device and status in ("delivered", "seen")]


def test_the_sender_gets_delivered_to_all_then_seen_by_all_with_the_group_as_peer() -> None:
    s = staging()
    for device in ("alice.phone", "alice.tablet", "bob.phone", "bob.laptop", "carol.phone"):
        s.device_online(device, 0.0)
    s.submit_group("alice.phone", "alice", ChatMessage("m1", GROUP, "hi"), ("alice", "bob", "carol"), 1000, 0.0)
    done, batch = write(s, 0.0)
    assert [r.members for r in batch.receipts.new] == [("bob", "carol")]
    seqs = {d: item.seq for d, item in done.deliveries if d != "alice.phone"}
    out = s.ack("alice.tablet", [seqs["alice.tablet"]], 1001, 0.1)
    out = s.ack("bob.laptop", [seqs["bob.laptop"]], 1002, 0.1)
    assert receipts_of(out, "alice.phone") == [], "carol has not got it"
    out = s.ack("carol.phone", [seqs["carol.phone"]], 1003, 0.1)
    assert receipts_of(out, "alice.phone") == receipts_of(out, "alice.tablet") == [("delivered", ["m1"])]
    receipt = dict(out.deliveries)["alice.phone"]
    assert receipt.peer == GROUP and receipt.ts == 1003  # type: ignore[union-attr]
    out = s.ack("bob.phone", [seqs["bob.phone"]], 1004, 0.1)
    assert receipts_of(out, "alice.phone") == [], "delivered once"
    assert kinds(s.seen_group("bob", GROUP, ["m1"], "bob.phone", 1005, 0.2)) == []
    out = s.seen_group("carol", GROUP, ["m1", "zz"], "carol.phone", 1006, 0.2)
    assert receipts_of(out, "alice.phone") == receipts_of(out, "alice.tablet") == [("seen", ["m1"])]
    assert len(s.receipts) == 0
    assert s.take_flush(10.0).receipts.done == [batch.bodies[0].mid]  # type: ignore[union-attr]


def test_seen_by_all_before_sent_waits_for_it_and_brings_delivered_first() -> None:
    s = staging()
    for device in ("alice.phone", "bob.phone", "carol.phone"):
        s.device_online(device, 0.0)
    s.submit_group("alice.phone", "alice", ChatMessage("m1", GROUP, "hi"), ("alice", "bob", "carol"), 1000, 0.0)
    # bob.laptop and alice.tablet are offline: items written, but the commit has not happened yet
    assert kinds(s.seen_group("bob", GROUP, ["m1"], "bob.phone", 1001, 0.0)) == []
    out = s.seen_group("carol", GROUP, ["m1"], "carol.phone", 1002, 0.0)
    assert receipts_of(out, "alice.phone") == [], "not before 'sent'"
    done, _ = write(s, 0.0)
    # 'delivered' goes out in the same outcome: it stands for 'sent' (rule 11), which is folded into it
    assert ("alice.phone", "sent", ["m1"]) not in kinds(StagingOutcome(notices=done.notices))
    assert [(r.status, list(r.ids)) for r in done.folded] == [("sent", ["m1"])]
    assert receipts_of(done, "alice.phone") == [("delivered", ["m1"]), ("seen", ["m1"])]


def test_a_seen_report_to_a_group_costs_a_token() -> None:
    s = GroupStaging(RULES, 1, Directory(), RateLimiter(1.0, 1), RecentIds(10))
    assert kinds(s.seen_group("bob", GROUP, ["m1"], "bob.phone", 1, 0.0)) == []
    assert kinds(s.seen_group("bob", GROUP, ["m1"], "bob.phone", 1, 0.0)) == [("bob.phone", "rate_limited", None)]


def test_a_failed_commit_puts_the_receipt_rows_back_first() -> None:
    s = staging()
    s.submit_group("alice.phone", "alice", ChatMessage("m1", GROUP, "hi"), ("alice", "bob", "carol"), 1000, 0.0)
    batch = s.take_flush(0.0)
    assert batch is not None
    s.seen_group("bob", GROUP, ["m1"], "bob.phone", 1001, 0.0)
    s.flush_failed(batch)
    again = s.take_flush(1.0)
    assert again is not None and [r.msg_id for r in again.receipts.new] == ["m1"]
    assert again.receipts.marks == [(batch.bodies[0].mid, "bob", 1001, 1001)]


def test_a_message_dropped_unwritten_is_not_tracked_any_more() -> None:
    s = staging()
    s.submit_group("alice.phone", "alice", ChatMessage("m1", GROUP, "hi"), ("alice", "bob", "carol"), 1000, 0.0)
    batch = s.take_flush(0.0)
    assert batch is not None
    [own, *_] = batch.parts()
    s.drop_unwritable(own)
    assert len(s.receipts) == 0 and s.take_flush(1.0).receipts.done == [own.bodies[0].mid]  # type: ignore[union-attr]


# --- group.receipts -------------------------------------------------------------------------------------


def test_only_members_ask_and_only_for_their_own_messages() -> None:
    b, w = book()
    b.track(7, "alice", "m1", GROUP, 3, ["bob", "carol"], 10_000, w)
    group = Group(GROUP, "g", 0, 1, ("alice", "bob", "carol"), frozenset({"alice"}))
    ask = GroupReceiptsRequest(GROUP, "m1")
    assert receipts(group, "alice", ask, b.find(GROUP, "m1"))["members"]["bob"] == {"delivered": None, "seen": None}
    with pytest.raises(GroupRefused) as refused:
        receipts(group, "bob", ask, b.find(GROUP, "m1"))
    assert refused.value.code == ErrorCode.FORBIDDEN
    for stranger, found in (("eve", group), ("alice", None)):
        with pytest.raises(GroupRefused) as refused:
            receipts(found, stranger, ask, b.find(GROUP, "m1"))
        assert refused.value.code == ErrorCode.NOT_MEMBER
    assert receipts(group, "bob", GroupReceiptsRequest(GROUP, "m9"), []) == {"group": GROUP, "id": "m9",
                                                                             "tracked": False}


# --- SQLite ------------------------------------------------------------------------------------------------


def test_sqlite_keeps_the_first_time_and_deletes_what_is_done(tmp_path: Path) -> None:
    async def run() -> None:
        store = await SqliteMessageStore.open(tmp_path)
        try:
            row = TrackedRow(5, "alice", "m1", GROUP, 10_000, ("bob", "carol"), True)
            await store.commit(FlushBatch(receipts=ReceiptWrites(new=[row, replace(row, mid=6)],
                                                                 marks=[(5, "bob", 100, 0), (5, "bob", 200, 200)])))
            await store.commit(FlushBatch(receipts=ReceiptWrites(done=[6])))
            assert await store.group_receipts() == [replace(row, marks={"bob": (100, 200)})]
        finally:
            await store.close()

    asyncio.run(run())
