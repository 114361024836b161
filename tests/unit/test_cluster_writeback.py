"""``WriteBack``: which held items are written to the store, and when (bridge/cluster/writeback.py)."""

from __future__ import annotations

from bridge.cluster.store import MessageEntry, Stage
from bridge.cluster.writeback import Held, WriteBack, item_for
from chatproto import MsgItem, ReceiptItem


def message_stage(msg_id: str, devices: tuple[str, ...] = ("bob.phone", "bob.tablet")) -> Stage:
    entry = MessageEntry("alice", msg_id, "bob", "text", 1000, "phone", body="hi")
    return Stage("bob", 10**13, 100, devices=devices, message=entry, dedup_until_ms=10**13, delivery=True)


def hold(wb: WriteBack, msg_id: str, now: float, seqs: dict[str, int], lane: str = "alice.phone") -> Held:
    return wb.hold(message_stage(msg_id, tuple(seqs)), lane, seqs, dict.fromkeys(seqs, 1), now)


def test_acked_by_every_target_settles_and_the_first_recipient_ack_reports_delivered_once() -> None:
    wb = WriteBack(flush_s=0.05)
    held = hold(wb, "m1", 0, {"bob.phone": 11, "bob.tablet": 21})
    out = wb.acked("bob.phone", [11])
    assert out.delivered == [held] and out.settled == []
    out = wb.acked("bob.tablet", [21])
    assert out.delivered == [] and out.settled == [held]
    assert len(wb) == 0 and wb.due(1.0) == [], "a settled item is never written"


def test_due_items_are_written_with_only_the_unacked_devices_and_no_second_delivery_record() -> None:
    wb = WriteBack(flush_s=0.05)
    held = hold(wb, "m1", 0, {"bob.phone": 11, "bob.tablet": 21})
    wb.acked("bob.phone", [11])
    assert wb.due(0.04) == []
    assert wb.due(0.05) == [held]
    stage = held.write_stage()
    assert stage.devices == ("bob.tablet",) and stage.writeback and not stage.delivery
    assert wb.due(1.0) == [], "being written: not taken twice"


def test_writing_one_writes_every_earlier_item_of_its_lane_first() -> None:
    wb = WriteBack(flush_s=0.05)
    first = hold(wb, "m1", 0, {"bob.phone": 11})
    second = hold(wb, "m2", 0.01, {"carol.phone": 31})
    other = hold(wb, "m3", 0.0, {"dave.phone": 41}, lane="erin.phone")
    assert wb.gone("carol.phone") == [first, second], "m1 goes before m2 (same sender)"
    assert wb.busy("alice.phone") and not wb.busy("erin.phone")
    assert wb.lane("erin.phone") == [other]
    assert wb.lane("alice.phone") == [], "already being written"


def test_acks_while_writing_are_remembered_for_the_written_copy() -> None:
    wb = WriteBack(flush_s=0.05)
    held = hold(wb, "m1", 0, {"bob.phone": 11})
    assert wb.due(1.0) == [held]
    out = wb.acked("bob.phone", [11])
    assert out.settled == [] and held.acked_while_writing == {"bob.phone"}
    wb.written(held)
    assert len(wb) == 0


def test_a_seen_reports_held_messages_once_and_repeats_are_recognised() -> None:
    wb = WriteBack(flush_s=0.05)
    hold(wb, "m1", 0, {"bob.phone": 11})
    assert wb.holds("alice", "m1") and not wb.holds("alice", "m2")
    assert wb.report_seen("bob", "alice", ["m1", "m9"]) == ["m1"]
    assert wb.report_seen("bob", "alice", ["m1"]) == []
    assert wb.acked("bob.phone", [11]).delivered == [], "reported by the seen already"
    assert not wb.holds("alice", "m1") and len(wb) == 0, "settled: no longer held, nothing indexed"


def test_items_for_each_target() -> None:
    stage = message_stage("m1")
    assert item_for(stage, "bob.phone", 5) == MsgItem(5, "m1", "alice", "bob", "text", "hi", 1000, "phone")
    entry = MessageEntry("alice", "m2", "bob", "olm", 1000, "phone", bodies={"bob.phone": "c1"})
    olm = Stage("bob", 1, 1, devices=("bob.phone",), message=entry)
    item = item_for(olm, "bob.phone", 6)
    assert isinstance(item, MsgItem) and item.body == "c1"
    assert item_for(olm, "bob.tablet", 7) is None
    receipt = ReceiptItem("delivered", ("m1",), "bob", 5)
    assert item_for(Stage("alice", 1, 1, receipt=receipt), "alice.phone", 8) == ReceiptItem(
        "delivered", ("m1",), "bob", 5, 8)
