"""The staging core's rules (bridge/messaging/core.py), driven with explicit times and no I/O."""

from __future__ import annotations

import json
from typing import Any

from bridge.directory import Directory, placeholder
from bridge.limits import RateLimiter, RecentIds
from bridge.messaging.core import Staging
from bridge.messaging.records import SEQ_SPAN, Rules, StagingOutcome
from chatproto import ChatMessage

RULES = Rules(flush_s=0.05, ttl_ms=10_000, window=2, redeliver_after_s=5.0, max_queue=100, dedup_window_ms=60_000)


def core(boot: int = 1, rules: Rules = RULES, burst: int = 1000) -> Staging:
    directory = Directory()
    directory.load([("alice", "phone"), ("bob", "phone"), ("bob", "laptop"), ("carol", None)])
    return Staging(rules, boot, directory, RateLimiter(1.0, burst), RecentIds(1000))


def msg(msg_id: str, to: str = "bob", body: str = "hi") -> ChatMessage:
    return ChatMessage(msg_id, to, body)


def kinds(out: StagingOutcome) -> list[tuple[str, str, Any]]:
    """(client id, kind/status, ids or id) of everything an outcome sends."""
    rows = []
    for client_id, item in [*out.deliveries, *out.notices]:
        obj = json.loads(item.encode())  # as the device reads it
        label = obj.get("status") or obj.get("code") or obj["kind"]
        rows.append((client_id, label, obj.get("ids") or obj.get("id") or obj.get("ref")))
    return rows


def test_online_delivery_is_immediate_and_sent_waits_for_the_ack_or_the_disk() -> None:
    s = core()
    s.device_online("bob.phone", 0.0)
    s.device_online("alice.phone", 0.0)
    out = s.submit("alice.phone", "alice", msg("m1"), 1000, 0.0)
    assert kinds(out) == [("bob.phone", "msg", "m1")]
    seq = out.deliveries[0][1].seq
    assert seq == SEQ_SPAN + 1
    out = s.ack("bob.phone", [seq], 1001, 0.01)
    assert not any(label == "sent" for _, label, _ in kinds(out)), "bob.laptop has neither acked nor been written"
    # 'delivered' waits for 'sent' (tests/chaos found the loss when it did not: see test_regressions.py)
    assert not any(label == "delivered" for _, label, _ in kinds(out))
    batch = s.take_flush(1.0)
    assert batch is not None and [i.device for i in batch.items] == ["bob.laptop"]
    assert [m.msg_id for m in batch.bodies] == ["m1"]
    done = s.flush_done(batch)  # 'delivered' goes out now: it stands for 'sent' too (rule 11)
    assert ("alice.phone", "delivered", ["m1"]) in kinds(done) and ("alice.phone", "sent", ["m1"]) not in kinds(done)
    assert [(r.status, r.ids) for r in done.folded] == [("sent", ("m1",))]


def acked_at_once(s: Staging, msg_id: str, now_ms: int) -> StagingOutcome:
    """``msg_id`` from alice.phone, acked by both of bob's devices before its flush: the last ack's outcome."""
    seqs = {device: item.seq for device, item in s.submit("alice.phone", "alice", msg(msg_id), now_ms, 0.0).deliveries}
    s.ack("bob.phone", [seqs["bob.phone"]], now_ms + 1, 0.01)
    return s.ack("bob.laptop", [seqs["bob.laptop"]], now_ms + 2, 0.02)


def test_sent_is_folded_into_a_delivered_that_goes_out_now_and_only_then() -> None:
    s = core()
    for device in ("alice.phone", "bob.phone", "bob.laptop"):
        s.device_online(device, 0.0)
    out = acked_at_once(s, "m1", 1000)
    assert kinds(out) == [("alice.phone", "delivered", ["m1"])]
    assert [(r.status, r.ids) for r in out.folded] == [("sent", ("m1",))]
    # alice.phone's window (2) is full, with that 'delivered' and a 'seen' unacked: the next 'delivered'
    # waits, so 'sent' goes out at once, as before
    assert kinds(s.seen("bob", "alice", ["x"], "bob.phone", 1003, 0.03)) == [("alice.phone", "seen", ["x"])]
    out = acked_at_once(s, "m2", 1004)
    assert kinds(out) == [("alice.phone", "sent", ["m2"])] and out.folded == []


def test_everything_acked_before_the_deadline_is_never_written() -> None:
    s = core()
    for device in ("bob.phone", "bob.laptop"):
        s.device_online(device, 0.0)
    out = s.submit("alice.phone", "alice", msg("m1"), 1000, 0.0)
    seqs = {device: item.seq for device, item in out.deliveries}
    s.ack("bob.phone", [seqs["bob.phone"]], 1001, 0.01)
    out = s.ack("bob.laptop", [seqs["bob.laptop"]], 1002, 0.02)
    assert ("alice.phone", "sent", ["m1"]) in kinds(out)
    batch = s.take_flush(1.0)
    assert batch is not None
    assert batch.bodies == [] and all(i.receipt is not None for i in batch.items), "only the receipt is written"
    assert batch.dedup == [("alice", "m1", 1000 + RULES.dedup_window_ms)]


def test_flush_deadline_and_group_commit() -> None:
    s = core()
    s.submit("alice.phone", "alice", msg("m1"), 1000, 0.0)
    s.submit("alice.phone", "alice", msg("m2"), 1000, 0.02)
    assert s.next_flush_at(0.02) == RULES.flush_s
    assert s.take_flush(0.04) is None
    batch = s.take_flush(0.1)
    assert batch is not None and len(batch.bodies) == 2 and len(batch.items) == 4
    out = s.flush_done(batch)
    sent = [k for k in kinds(out) if k[1] == "sent"]
    assert sent == [("alice.phone", "sent", ["m1"]), ("alice.phone", "sent", ["m2"])]


def test_repeats_are_staged_once_and_answered_sent_again() -> None:
    s = core()
    s.submit("alice.phone", "alice", msg("m1"), 1000, 0.0)
    assert kinds(s.submit("alice.phone", "alice", msg("m1"), 1001, 0.01)) == []  # not settled yet
    batch = s.take_flush(1.0)
    assert batch is not None
    s.flush_done(batch)
    assert kinds(s.submit("alice.laptop", "alice", msg("m1"), 1002, 1.1)) == [("alice.laptop", "sent", ["m1"])]
    assert s.staged_count() == 2


def test_seqs_of_a_later_boot_are_above_every_earlier_one() -> None:
    first, second = core(boot=1), core(boot=2)
    for s in (first, second):
        s.device_online("bob.phone", 0.0)
    a = first.submit("alice.phone", "alice", msg("m1"), 1, 0.0).deliveries[0][1].seq
    for i in range(50):
        first.submit("alice.phone", "alice", msg(f"x{i}"), 1, 0.0)
    b = second.submit("alice.phone", "alice", msg("m2"), 1, 0.0).deliveries[0][1].seq
    assert b > a + 50


def test_window_then_next_on_ack_and_redelivery() -> None:
    s = core()
    for i in range(3):
        s.submit("alice.phone", "alice", msg(f"m{i}"), 1000, 0.0)
    out = s.device_online("bob.phone", 1.0)
    assert [item.id for _, item in out.deliveries] == ["m0", "m1"]
    out = s.ack("bob.phone", [out.deliveries[0][1].seq], 1001, 2.0)
    assert [item.id for _, item in out.deliveries if item.KIND == "msg"] == ["m2"]
    assert [item.id for _, item in s.redeliver(5.5).deliveries] == []
    assert [item.id for _, item in s.redeliver(6.0).deliveries] == ["m1"]


def test_an_idle_online_device_holds_no_send_queue() -> None:
    s = core()
    s.device_online("bob.phone", 0.0)
    assert s.boxes["bob.phone"].unsent is None  # the common case at 10,000 connected: no deque
    for i in range(3):
        s.submit("alice.phone", "alice", msg(f"m{i}"), 1000, 0.0)
    assert list(s.boxes["bob.phone"].unsent or []) == [SEQ_SPAN + 3], "window 2: the third waits"
    out = s.ack("bob.phone", [SEQ_SPAN + 1], 1001, 0.01)
    assert [item.id for _, item in out.deliveries if item.KIND == "msg"] == ["m2"]
    assert s.boxes["bob.phone"].unsent is None, "emptied: given back"


def test_reconnect_sends_the_backlog_again_in_order() -> None:
    s = core()
    s.device_online("bob.phone", 0.0)
    for i in range(2):
        s.submit("alice.phone", "alice", msg(f"m{i}"), 1000, 0.0)
    s.device_offline("bob.phone")
    s.submit("alice.phone", "alice", msg("m2"), 1000, 0.5)
    out = s.device_online("bob.phone", 1.0)
    seqs = [item.seq for _, item in out.deliveries]
    assert [item.id for _, item in out.deliveries] == ["m0", "m1"] and seqs == sorted(seqs)


def test_expiry_drops_items_and_tells_the_sender() -> None:
    s = core()
    s.submit("alice.phone", "alice", msg("m1"), 1000, 0.0)
    assert kinds(s.expire(1000 + RULES.ttl_ms - 1, 1.0)) == []
    out = s.expire(1000 + RULES.ttl_ms, 1.0)
    assert out.deliveries == [] and s.staged_count() == 1  # only the expired receipt, for alice.phone
    assert [i.receipt["status"] for i in s.boxes["alice.phone"].items.values() if i.receipt] == ["expired"]


def test_a_users_first_device_takes_over_what_was_held() -> None:
    s = core()
    s.submit("alice.phone", "alice", msg("early", to="carol"), 1000, 0.0)
    batch = s.take_flush(1.0)
    assert batch is not None and batch.items[0].device == placeholder("carol")
    s.flush_done(batch)
    s.directory.add_device("carol", "tablet")
    s.adopt_placeholder("carol", "carol.tablet", 2.0)
    batch = s.take_flush(2.0)
    assert batch is not None
    assert batch.deleted_items == [(placeholder("carol"), SEQ_SPAN + 1)]
    assert [(i.device, i.message.msg_id if i.message else None) for i in batch.items] == [("carol.tablet", "early")]


def test_a_failed_commit_is_retried_and_reported_once() -> None:
    s = core()
    s.submit("alice.phone", "alice", msg("m1"), 1000, 0.0)
    batch = s.take_flush(1.0)
    assert batch is not None
    assert kinds(s.flush_failed(batch)) == [("alice.phone", "internal", "m1")]
    again = s.take_flush(1.0)
    assert again is not None and len(again.items) == 2
    assert kinds(s.flush_failed(again)) == []
    batch = s.take_flush(1.0)
    assert batch is not None
    assert ("alice.phone", "sent", ["m1"]) in kinds(s.flush_done(batch))


def test_an_ack_during_the_write_deletes_the_row_afterwards() -> None:
    s = core()
    s.device_online("bob.phone", 0.0)
    out = s.submit("alice.phone", "alice", msg("m1"), 1000, 0.0)
    seq = next(item.seq for device, item in out.deliveries if device == "bob.phone")
    batch = s.take_flush(1.0)
    assert batch is not None
    s.ack("bob.phone", [seq], 1001, 1.0)  # while the commit runs
    s.flush_done(batch)
    nxt = s.take_flush(10.0)
    assert nxt is not None and ("bob.phone", seq) in nxt.deleted_items


def test_transient_refusal_holds_later_messages_of_that_device() -> None:
    s = core(rules=Rules(0.05, 10_000, 2, 5.0, max_queue=1, dedup_window_ms=60_000))
    s.submit("alice.phone", "alice", msg("m1"), 1000, 0.0)
    assert kinds(s.submit("alice.phone", "alice", msg("m2"), 1000, 0.0)) == [("alice.phone", "queue_full", "m2")]
    assert kinds(s.submit("alice.phone", "alice", msg("m3", to="carol"), 1000, 0.0)) == [
        ("alice.phone", "queue_full", "m3")]
    assert kinds(s.submit("alice.laptop", "alice", msg("m4", to="carol"), 1000, 0.0)) == [], "other devices go on"


def test_written_bodies_for_offline_devices_leave_memory_and_are_read_back_on_connect() -> None:
    s = core()
    s.submit("alice.phone", "alice", msg("m1", body="x" * 100), 1000, 0.0)
    batch = s.take_flush(1.0)
    assert batch is not None
    s.flush_done(batch)
    assert s.live[("alice", "m1")].body is None, "safe on disk, no device online: not kept in memory"
    out = s.device_online("bob.phone", 2.0)
    assert out.deliveries == [] and out.need_bodies == [s.live[("alice", "m1")].mid]
    out = s.bodies_loaded({out.need_bodies[0]: "x" * 100}, 2.1)
    assert [(d, i.id, i.body) for d, i in out.deliveries] == [("bob.phone", "m1", "x" * 100)]



def test_messages_refused_under_a_hold_come_back_in_their_turn() -> None:
    """m0 refused (rate), m1 refused because of the hold; after m0's re-send, m2, published only
    then, must not overtake m1 (found as a reordering by an end-to-end mismatch test)."""
    s = core(burst=1)  # one message at once, then one per second

    def errors(at: float, msg_id: str) -> list[str]:
        out = s.submit("alice.phone", "alice", msg(msg_id), 1000, at)
        return [item.code for _, item in out.notices if item.KIND == "error"]

    assert errors(0.0, "first") == []
    assert errors(0.1, "m0") == ["rate_limited"]
    assert errors(0.2, "m1") == ["rate_limited"], "held behind m0"
    assert errors(2.0, "m0") == [], "m0's re-send is taken"
    assert errors(4.0, "m2") == ["rate_limited"], "m1 was refused before m2: it goes first"
    assert errors(5.0, "m1") == []
    assert errors(7.0, "m2") == []
