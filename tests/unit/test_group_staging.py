"""The staging core with groups (bridge/messaging/groups.py), driven with explicit times and no I/O."""

from __future__ import annotations

from dataclasses import replace

from bridge.directory import Directory
from bridge.limits import RateLimiter, RecentIds
from bridge.messaging.groups import GroupStaging
from bridge.messaging.records import StagingOutcome
from chatproto import ChatMessage, GroupItem, MsgItem
from tests.unit.test_staging import RULES, kinds

GROUP = "g:AAAAAAAAAAAAAAAAAAAAAA"
MEMBERS = ("alice", "bob", "carol")


def core(max_queue: int = 100, burst: int = 1000, require_encryption: bool = False) -> GroupStaging:
    directory = Directory()
    directory.load([("alice", "phone"), ("alice", "tablet"), ("bob", "phone"), ("carol", None), ("dave", "phone")])
    rules = replace(RULES, max_queue=max_queue, require_encryption=require_encryption)
    return GroupStaging(rules, 1, directory, RateLimiter(1.0, burst), RecentIds(1000))


def write(s: GroupStaging, now: float) -> StagingOutcome:
    batch = s.take_flush(now)
    assert batch is not None
    return s.flush_done(batch, now)


def test_a_member_message_takes_the_next_gseq_and_reaches_every_other_device_once_written() -> None:
    s = core()
    for device in ("alice.tablet", "bob.phone"):
        s.device_online(device, 0.0)
    s.gseqs[GROUP] = 4  # an event took 4
    out = s.submit_group("alice.phone", "alice", ChatMessage("m1", GROUP, "hi"), MEMBERS, 1000, 0.0)
    assert kinds(out) == []  # nothing goes out before it is on disk
    batch = s.take_flush(0.0)  # due at once, no write-back
    assert batch is not None and len(batch.bodies) == 1 and batch.gseqs == {GROUP: 5}
    assert sorted(i.device for i in batch.items) == ["alice.tablet", "bob.phone", "carol.*"]
    done = s.flush_done(batch, 0.0)
    assert sorted(kinds(done)) == [("alice.phone", "sent", ["m1"]), ("alice.tablet", "msg", "m1"),
                                   ("bob.phone", "msg", "m1")]
    delivered = dict(done.deliveries)
    assert isinstance(delivered["bob.phone"], MsgItem) and delivered["bob.phone"].gseq == 5
    assert s.written_gseqs == {GROUP: 5}
    again = s.submit_group("alice.phone", "alice", ChatMessage("m1", GROUP, "hi"), MEMBERS, 1001, 0.1)
    assert kinds(again) == [("alice.phone", "sent", ["m1"])] and s.gseqs[GROUP] == 5  # a repeat: no new gseq


def test_refusals_take_no_gseq() -> None:
    s = core(burst=1, require_encryption=True)
    out = s.submit_group("dave.phone", "dave", ChatMessage("x", GROUP, "hi", "megolm"), None, 1000, 0.0)
    assert kinds(out) == [("dave.phone", "forbidden", "x")]
    out = s.submit_group("alice.phone", "alice", ChatMessage("p", GROUP, "plain"), MEMBERS, 1000, 0.0)
    assert kinds(out) == [("alice.phone", "encryption_required", "p")]
    s.submit_group("alice.phone", "alice", ChatMessage("e1", GROUP, "c", "megolm"), MEMBERS, 1000, 0.0)
    out = s.submit_group("alice.phone", "alice", ChatMessage("e2", GROUP, "c", "megolm"), MEMBERS, 1000, 0.0)
    assert kinds(out) == [("alice.phone", "rate_limited", "e2")]  # one token per message, whatever the fanout
    assert s.gseqs == {GROUP: 1}


def test_a_full_queue_is_skipped_and_the_others_get_the_message() -> None:
    s = core(max_queue=1)
    s.submit("dave.phone", "dave", ChatMessage("d1", "bob", "fill"), 1000, 0.0)  # bob.phone is full now
    out = s.submit_group("alice.phone", "alice", ChatMessage("m1", GROUP, "hi"), MEMBERS, 1000, 0.0)
    assert kinds(out) == [] and s.counters.group_skipped == 1
    batch = s.take_flush(0.0)
    assert batch is not None
    assert sorted(i.device for i in batch.items if i.message and i.message.gseq) == ["alice.tablet", "carol.*"]


def test_a_group_of_one_device_is_sent_at_once() -> None:
    s = core()
    out = s.submit_group("dave.phone", "dave", ChatMessage("solo", GROUP, "hi"), ("dave",), 1000, 0.0)
    assert kinds(out) == [("dave.phone", "sent", ["solo"])]


def test_events_reach_every_device_of_the_users_in_order_once_written() -> None:
    s = core()
    s.device_online("bob.phone", 0.0)
    events = (GroupItem(0, GROUP, 1, "created", "alice", 1000, MEMBERS, "trip"),
              GroupItem(0, GROUP, 2, "renamed", "alice", 1000, name="ski"))
    assert kinds(s.stage_group_events(events, MEMBERS, 1000, 0.0)) == []
    done = write(s, 0.0)
    sent = [item for device, item in done.deliveries if device == "bob.phone"]
    assert [(i.gseq, i.event) for i in sent if isinstance(i, GroupItem)] == [(1, "created"), (2, "renamed")]
    assert s.gseqs == s.written_gseqs == {GROUP: 2}
    assert len(s.boxes["carol.*"].items) == 2  # held for carol's first device
