"""The pure part of ``chat-broker migrate`` (chatserver/migrate.py): which queue each item goes to,
what a resumed run skips, which dedup marks and delivered flags move."""

from __future__ import annotations

import pytest

from bridge.cluster.store import QueuedItem
from bridge.messaging.records import Item, StagedMessage
from chatserver.migrate import MigrateError, dedup_marks, delivered_flags, plan_item, resume_point, target_queues


def message(msg_id: str, recipient: str = "bob", delivered: bool = False, olm: bool = False) -> StagedMessage:
    return StagedMessage(1, "alice", msg_id, recipient, "text", None, 5, 900, "alice.phone", dev="phone", olm=olm,
                         delivered=delivered)


def item(device: str, seq: int, m: StagedMessage | None = None) -> Item:
    receipt = None if m else {"status": "delivered", "ids": ["x"], "peer": "bob", "ts": 7}
    return Item(device, seq, 800, 0.0, message=m, receipt=receipt)


def test_a_placeholder_goes_to_the_first_device_after_its_own_items() -> None:
    items = [item("bob.*", 1, message("a")), item("bob.phone", 9, message("b")), item("carol.*", 2, message("c")),
             item("bob.laptop", 3, message("d"))]
    queues = target_queues(items, {"bob": ["laptop", "phone"], "carol": []})
    assert {cid: [i.message.msg_id for i in q if i.message] for cid, q in queues.items()} == {
        "bob.laptop": ["d", "a"], "bob.phone": ["b"], "carol.*": ["c"]}


def test_plan_item_stages_to_its_device_only_and_tracks_delivery_for_the_recipient() -> None:
    plain = plan_item("bob.phone", item("bob.phone", 1, message("a")), "hi")
    assert (plain.stage.devices, plain.stage.delivery, plain.stage.expires_ms) == (("bob.phone",), True, 800)
    assert plain.stage.message is not None and plain.stage.message.body == "hi"
    copy = plan_item("alice.tab", item("alice.tab", 1, message("a", olm=True)), "Y3Q")
    assert copy.stage.delivery is False and copy.stage.message is not None
    assert copy.stage.message.bodies == {"alice.tab": "Y3Q"}
    held = plan_item("carol.*", item("carol.*", 1, message("c", "carol")), "x")
    assert held.stage.devices is None, "the placeholder: staged to the user, who has no device"
    receipt = plan_item("alice.tab", item("alice.tab", 2), None)
    assert receipt.stage.receipt is not None and receipt.stage.receipt.ids == ("x",)
    with pytest.raises(MigrateError, match="is missing"):
        plan_item("bob.phone", item("bob.phone", 1, message("a")), None)


def test_resume_point_skips_the_prefix_there_and_refuses_anything_else() -> None:
    planned = [plan_item("bob.phone", item("bob.phone", n, message(f"m{n}")), f"body{n}") for n in range(3)]
    there = [QueuedItem(p.wire[0], p.wire[1]) for p in planned]
    assert resume_point("bob.phone", [], planned) == 0
    assert resume_point("bob.phone", there[:2], planned) == 2
    with pytest.raises(MigrateError, match="not a start of its queue"):
        resume_point("bob.phone", there[1:], planned)


def test_dedup_marks_go_to_each_user_holding_the_message() -> None:
    history = message("o1", olm=True)
    items = [item("bob.phone", 1, history), item("alice.tab", 1, history), item("bob.laptop", 1, history)]
    marks, unplaced = dedup_marks(items, [("alice", "o1", 950), ("alice", "gone", 999)])
    assert marks == {("bob", "alice", "o1"): 950, ("alice", "alice", "o1"): 950}
    assert unplaced == 1, "a delivered message's mark: its recipient is not recorded"


def test_delivered_flags_only_for_the_recipients_items() -> None:
    done = message("a", delivered=True)
    items = [item("alice.tab", 1, done), item("bob.laptop", 1, done), item("bob.laptop", 2, message("b"))]
    assert delivered_flags(items) == {("bob", "alice"): ["a"]}
    assert delivered_flags(items[:1]) == {}


def test_group_items_are_not_migrated_to_a_cluster_that_does_not_serve_groups() -> None:
    grouped = message("g1", recipient="g:AAAA")
    grouped.gseq = 2
    event = Item("bob.phone", 2, 800, 0.0, event={"group": "g:AAAA", "gseq": 1, "event": "created", "by": "alice",
                                                   "ts": 5})
    for staged in (item("bob.phone", 1, grouped), event):
        with pytest.raises(MigrateError, match="does not move groups"):
            plan_item("bob.phone", staged, "hi")
