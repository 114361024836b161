"""The SDK's downlink rules without a network: what is stored, handed over,
dropped as a duplicate (by seq and by (from, id)) and acked, in which order,
and what survives a crash between storing an item and handing it over."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatproto import MsgItem, PresenceItem, ReceiptItem
from client_sdk.dispatch import Dispatcher
from client_sdk.events import ErrorEvent, Event, Message, Receipt
from client_sdk.inbox import Arrival, Inbox, classify_arrival, dedup_key, read_downlink
from client_sdk.localstore import LocalStore


def msg(seq: int, msg_id: str | None = None, sender: str = "alice", body: str | None = None) -> bytes:
    return MsgItem(seq, msg_id or f"m{seq}", sender, "bob", "text", body or f"body {seq}", 1000 + seq).encode()


class Recorder:
    """A deliver function that records events and can simulate a crash or a closing client."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.acked: list[int] = []
        self.crash_on: str | None = None
        self.refuse = False

    def deliver(self, event: Event) -> bool:
        if self.refuse:
            return False
        if isinstance(event, Message) and event.id == self.crash_on:
            raise Crash(event.id)
        self.events.append(event)
        return True

    def bodies(self) -> list[str]:
        return [e.body for e in self.events if isinstance(e, Message)]


class Crash(BaseException):
    """Stands for the process dying inside the app's callback."""


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    opened = LocalStore(tmp_path / "bob.db", "bob", "phone")
    yield opened
    opened.close()


def stage(inbox: Inbox, payload: bytes) -> Arrival:
    found = read_downlink(payload)
    assert found.seq is not None
    return inbox.stage(found.seq, payload)


def test_classify_arrival_rules() -> None:
    assert classify_arrival(None, 10, False) is Arrival.EPHEMERAL
    assert classify_arrival(10, 10, False) is Arrival.DUPLICATE
    assert classify_arrival(3, 10, True) is Arrival.DUPLICATE
    assert classify_arrival(11, 10, True) is Arrival.PENDING
    assert classify_arrival(11, 10, False) is Arrival.STORE


def test_read_downlink_kinds() -> None:
    assert read_downlink(msg(7)).seq == 7
    sent = read_downlink(ReceiptItem("sent", ("m1",), "bob", 5).encode())
    assert sent.seq is None and sent.item is not None
    staged = read_downlink(ReceiptItem("delivered", ("m1",), "bob", 5, seq=9).encode())
    assert staged.seq == 9
    assert read_downlink(PresenceItem("alice", True, None).encode()).seq is None
    future_kind = read_downlink(json.dumps({"kind": "call", "seq": 12}).encode())
    assert future_kind.item is None and future_kind.seq == 12 and future_kind.problem
    assert read_downlink(b"not json").seq is None
    assert read_downlink(b'{"kind":"x","seq":true}').seq is None


def test_dedup_key_only_for_messages() -> None:
    item = read_downlink(msg(1, "abc", "carol")).item
    assert isinstance(item, MsgItem) and dedup_key(item) == ("carol", "abc")
    assert dedup_key(read_downlink(ReceiptItem("seen", ("x",), "a", 1, seq=2).encode()).item) is None


def test_stage_then_repeat_then_duplicate(store: LocalStore) -> None:
    inbox, rec = Inbox(store), Recorder()
    assert stage(inbox, msg(5)) is Arrival.STORE
    assert stage(inbox, msg(5)) is Arrival.PENDING  # stored, not handed yet: not acked now
    assert inbox.hand_over(rec.deliver, rec.acked.append)
    assert rec.acked == [5] and store.last_seq() == 5
    assert stage(inbox, msg(5)) is Arrival.DUPLICATE  # handed: ack again, never hand over
    assert stage(inbox, msg(4)) is Arrival.DUPLICATE  # below the highest handed seq
    assert inbox.hand_over(rec.deliver, rec.acked.append)
    assert rec.bodies() == ["body 5"]


def test_hand_over_in_seq_order_and_ack_after_each(store: LocalStore) -> None:
    inbox, rec = Inbox(store), Recorder()
    for seq in (3, 1, 2):
        stage(inbox, msg(seq))

    def deliver(event: Event) -> bool:
        # the ack for an item is only released after the app returned from it
        assert isinstance(event, Message) and event.seq not in rec.acked
        return rec.deliver(event)

    assert inbox.hand_over(deliver, rec.acked.append)
    assert rec.bodies() == ["body 1", "body 2", "body 3"]
    assert rec.acked == [1, 2, 3]
    assert [e.seq for e in rec.events if isinstance(e, Message)] == [1, 2, 3]


def test_hand_over_upto_stops_at_seq(store: LocalStore) -> None:
    inbox, rec = Inbox(store), Recorder()
    for seq in (1, 2, 3):
        stage(inbox, msg(seq))
    inbox.hand_over(rec.deliver, rec.acked.append, upto_seq=2)
    assert rec.acked == [1, 2]
    inbox.hand_over(rec.deliver, rec.acked.append, upto_seq=3)
    assert rec.acked == [1, 2, 3]


def test_same_sender_and_id_under_new_seq_is_handed_once(store: LocalStore) -> None:
    inbox, rec = Inbox(store), Recorder()
    stage(inbox, msg(1, "same", "alice"))
    stage(inbox, msg(2, "same", "alice"))  # e.g. the server lost its dedup state and re-staged it
    stage(inbox, msg(3, "same", "carol"))  # another sender may reuse the id
    inbox.hand_over(rec.deliver, rec.acked.append)
    assert [(e.sender, e.seq) for e in rec.events if isinstance(e, Message)] == [("alice", 1), ("carol", 3)]
    assert rec.acked == [1, 2, 3]  # the duplicate is still acked so the server deletes it
    stage(inbox, msg(9, "same", "alice"))  # remembered across hand-over batches too
    inbox.hand_over(rec.deliver, rec.acked.append)
    assert len(rec.events) == 2 and rec.acked[-1] == 9


def test_receipts_go_through_the_same_order(store: LocalStore) -> None:
    inbox, rec = Inbox(store), Recorder()
    stage(inbox, ReceiptItem("delivered", ("a1",), "carol", 5, seq=1).encode())
    stage(inbox, msg(2))
    inbox.hand_over(rec.deliver, rec.acked.append)
    assert isinstance(rec.events[0], Receipt) and rec.events[0].ids == ("a1",)
    assert isinstance(rec.events[1], Message)


def test_unreadable_staged_item_is_acked_not_handed(store: LocalStore) -> None:
    inbox, rec = Inbox(store), Recorder()
    assert inbox.stage(1, json.dumps({"kind": "call", "seq": 1}).encode()) is Arrival.STORE
    stage(inbox, msg(2))
    inbox.hand_over(rec.deliver, rec.acked.append)
    assert rec.acked == [1, 2] and rec.bodies() == ["body 2"]


def test_crash_between_store_and_hand_over(tmp_path: Path) -> None:
    path = tmp_path / "bob.db"
    first = LocalStore(path, "bob", "phone")
    inbox, rec = Inbox(first), Recorder()
    for seq in (1, 2, 3):
        stage(inbox, msg(seq))
    rec.crash_on = "m2"
    with pytest.raises(Crash):
        inbox.hand_over(rec.deliver, rec.acked.append)
    assert rec.bodies() == ["body 1"] and rec.acked == [1]
    first.close()  # the process died; the file is all that is left

    second = LocalStore(path, "bob", "phone")
    inbox, again = Inbox(second), Recorder()
    assert second.last_seq() == 1
    assert stage(inbox, msg(2)) is Arrival.PENDING  # the server redelivers: no second copy
    assert stage(inbox, msg(1)) is Arrival.DUPLICATE
    assert inbox.hand_over(again.deliver, again.acked.append)
    assert again.bodies() == ["body 2", "body 3"]  # at least once across the crash, in order
    assert again.acked == [2, 3]
    second.close()


def test_closing_client_leaves_item_stored(store: LocalStore) -> None:
    inbox, rec = Inbox(store), Recorder()
    stage(inbox, msg(1))
    rec.refuse = True
    assert inbox.hand_over(rec.deliver, rec.acked.append) is False
    assert rec.acked == [] and store.last_seq() == 0
    rec.refuse = False
    assert inbox.hand_over(rec.deliver, rec.acked.append)
    assert rec.bodies() == ["body 1"]


def test_handed_ids_are_bounded(store: LocalStore) -> None:
    for seq in range(1, 11):
        store.mark_handed(seq, [("alice", f"m{seq}")], now_ms=seq * 1000)
    assert store.prune_handed_ids(older_than_ms=3000, keep=100) == 2  # m1, m2 are too old
    assert store.prune_handed_ids(older_than_ms=0, keep=5) == 3  # keep the newest five
    assert store.handed_id_count() == 5
    assert store.was_handed("alice", "m10") and not store.was_handed("alice", "m5")
    assert store.last_seq() == 10  # pruning ids never lowers the seq watermark


# --- the dispatcher thread -------------------------------------------------------


class Acks:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.changed = threading.Condition()

    def publish(self, seqs: list[int]) -> None:
        with self.changed:
            self.batches.append(list(seqs))
            self.changed.notify_all()

    def wait_for(self, seqs: set[int]) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: seqs <= {s for b in self.batches for s in b}, timeout=5)


def test_dispatcher_keeps_arrival_order_and_acks_after_hand_over(store: LocalStore) -> None:
    inbox, acks = Inbox(store), Acks()
    seen: list[Any] = []
    gate = threading.Event()

    def deliver(event: Event) -> bool:
        gate.wait(5)
        flat = {s for b in acks.batches for s in b}
        if isinstance(event, Message):
            assert event.seq not in flat
        seen.append(event)
        return True

    stage(inbox, msg(1))  # stored by an earlier run: handed over before anything new
    dispatcher = Dispatcher(inbox, deliver, acks.publish)
    dispatcher.start()
    dispatcher.event(ErrorEvent("queue_full", "x", None))
    stage(inbox, msg(2))
    dispatcher.stored(2)
    dispatcher.duplicate(1)
    gate.set()
    acks.wait_for({1, 2})
    dispatcher.stop()
    assert [type(e).__name__ for e in seen] == ["Message", "ErrorEvent", "Message"]
    assert [e.seq for e in seen if isinstance(e, Message)] == [1, 2]
    assert sorted(s for b in acks.batches for s in b) == [1, 1, 2]


def test_dispatcher_batches_acks(store: LocalStore) -> None:
    inbox, acks = Inbox(store), Acks()
    gate = threading.Event()

    def deliver(event: Event) -> bool:
        return gate.wait(5)

    for seq in range(1, 251):
        stage(inbox, msg(seq))
    dispatcher = Dispatcher(inbox, deliver, acks.publish, ack_batch=100)
    dispatcher.start()
    gate.set()
    acks.wait_for(set(range(1, 251)))
    dispatcher.stop()
    assert [len(b) for b in acks.batches] == [100, 100, 50]
