"""The SDK's outbox rules without a network: ids, publish order, removal on
receipts, resends after the interval and on reconnect, permanent vs transient
errors, and an outbox that survives a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chatproto import MESSAGE_ID_RE
from client_sdk.localstore import LocalStore
from client_sdk.outbox import (
    PERMANENT_CODES,
    TRANSIENT_CODES,
    ErrorVerdict,
    Outbox,
    error_verdict,
    new_message_id,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    opened = LocalStore(tmp_path / "alice.db", "alice", "phone")
    yield opened
    opened.close()


def make(store: LocalStore, clock: Clock, resend: float = 10.0) -> Outbox:
    return Outbox(store, resend_interval=resend, retry_initial=1.0, retry_max=8.0, clock=clock, rng=lambda: 0.0)


def test_message_ids_are_random_and_valid() -> None:
    ids = {new_message_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(MESSAGE_ID_RE.fullmatch(i) and len(i) == 16 for i in ids)


def test_messages_are_due_in_send_order_once_per_interval(store: LocalStore) -> None:
    clock = Clock()
    outbox = make(store, clock)
    sent = [outbox.add("bob", f"m{i}").id for i in range(5)]
    assert [m.id for m in outbox.take_due()] == sent
    assert outbox.take_due() == []  # published: not again before the resend interval
    assert outbox.next_due() == pytest.approx(110.0)
    clock.now = 109.9
    assert outbox.take_due() == []
    clock.now = 110.0
    assert [m.id for m in outbox.take_due()] == sent  # no 'sent' yet: published again, same ids


def test_reconnect_makes_the_whole_outbox_due_in_order(store: LocalStore) -> None:
    clock = Clock()
    outbox = make(store, clock)
    first = outbox.add("bob", "a").id
    outbox.take_due()
    second = outbox.add("carol", "b").id
    outbox.connected()
    assert [m.id for m in outbox.take_due()] == [first, second]


def test_a_receipt_removes_only_its_ids(store: LocalStore) -> None:
    clock = Clock()
    outbox = make(store, clock)
    a, b, c = (outbox.add("bob", x).id for x in "abc")
    assert outbox.confirmed((b, "not-ours")) == [b]
    assert outbox.ids() == [a, c]
    assert [m.id for m in store.outbox_all()] == [a, c]  # gone from the file too
    assert outbox.confirmed([b]) == []  # a second receipt changes nothing


@pytest.mark.parametrize("code", sorted(PERMANENT_CODES))
def test_permanent_error_removes_the_message(store: LocalStore, code: str) -> None:
    outbox = make(store, Clock())
    keep, bad = outbox.add("bob", "ok").id, outbox.add("bob", "bad").id
    assert outbox.on_error(bad, code) is ErrorVerdict.DROPPED
    assert outbox.ids() == [keep]
    assert [m.id for m in store.outbox_all()] == [keep]


@pytest.mark.parametrize("code", sorted(TRANSIENT_CODES))
def test_transient_error_keeps_and_backs_off(store: LocalStore, code: str) -> None:
    clock = Clock()
    outbox = make(store, clock)
    msg_id = outbox.add("bob", "x").id
    outbox.take_due()
    assert outbox.on_error(msg_id, code) is ErrorVerdict.RETRY
    assert outbox.ids() == [msg_id]
    assert outbox.next_due() == pytest.approx(101.0)  # first retry after retry_initial
    clock.now = 101.0
    assert [m.id for m in outbox.take_due()] == [msg_id]
    assert outbox.on_error(msg_id, code) is ErrorVerdict.RETRY
    assert outbox.next_due() == pytest.approx(103.0)  # then doubling ...
    for _ in range(10):
        outbox.on_error(msg_id, code)
    assert outbox.next_due() == pytest.approx(109.0)  # ... up to retry_max


def test_unknown_code_is_retried_and_reported(store: LocalStore) -> None:
    outbox = make(store, Clock())
    msg_id = outbox.add("bob", "x").id
    assert outbox.on_error(msg_id, "unsupported") is ErrorVerdict.RETRY_REPORTED
    assert outbox.ids() == [msg_id]


def test_errors_about_other_things_are_not_ours(store: LocalStore) -> None:
    outbox = make(store, Clock())
    outbox.add("bob", "x")
    assert outbox.on_error(None, "forbidden") is ErrorVerdict.NOT_OURS
    assert outbox.on_error("someone-else", "too_large") is ErrorVerdict.NOT_OURS
    assert len(outbox) == 1
    assert error_verdict("too_large", in_outbox=False) is ErrorVerdict.NOT_OURS


def test_outbox_survives_a_restart_in_order(tmp_path: Path) -> None:
    path = tmp_path / "alice.db"
    first = LocalStore(path, "alice", "phone")
    ids = [make(first, Clock()).add("bob", f"m{i}").id for i in range(3)]
    first.close()
    second = LocalStore(path, "alice", "phone")
    outbox = make(second, Clock())
    due = outbox.take_due()
    assert [m.id for m in due] == ids and [m.body for m in due] == ["m0", "m1", "m2"]
    second.close()


@pytest.mark.parametrize(("to", "body", "kind"), [
    ("Bob", "x", "text"), ("", "x", "text"), ("bob", b"x", "text"), ("bob", "x", "Text"), ("bob", "x", ""),
])
def test_malformed_messages_are_refused_before_storing(store: LocalStore, to: str, body: object, kind: str) -> None:
    outbox = make(store, Clock())
    with pytest.raises((ValueError, TypeError)):
        outbox.add(to, body, kind)  # type: ignore[arg-type]
    assert store.outbox_all() == []


def test_group_recipient_is_accepted(store: LocalStore) -> None:
    assert make(store, Clock()).add("g:team", "hi").to == "g:team"


def test_a_refused_message_holds_back_later_ones_until_its_retry(store: LocalStore) -> None:
    """Rule 4 across retries: after a transient refusal nothing may overtake the refused message."""
    clock = Clock()
    outbox = make(store, clock)
    first, second = outbox.add("bob", "one").id, outbox.add("bob", "two").id
    assert [m.id for m in outbox.take_due()] == [first, second]
    outbox.on_error(first, "rate_limited")  # retry after 1 s (rng 0: no jitter)
    third = outbox.add("bob", "three").id
    assert outbox.take_due() == [], "the new message waits behind the refused one"
    clock.now += 1.0
    assert [m.id for m in outbox.take_due()] == [first, third]  # second is published, awaiting its receipt


def test_no_keys_holds_the_message_and_those_behind_it_to_the_same_peer(store: LocalStore) -> None:
    clock = Clock()
    outbox = Outbox(store, resend_interval=10.0, hold_initial=2.0, hold_max=5.0, clock=clock, rng=lambda: 0.0)
    first, to_bob, second = outbox.add("carol", "1").id, outbox.add("bob", "b").id, outbox.add("carol", "2").id
    assert [m.id for m in outbox.take_due()] == [first, to_bob, second]
    outbox.hold(first)  # the engine found no keys for carol, and skipped her later message
    outbox.hold(second)
    assert outbox.take_pending() == {"carol": [first, second]}
    assert outbox.take_pending() == {}, "reported once"
    assert outbox.next_due() == pytest.approx(102.0)
    third = outbox.add("carol", "3").id
    assert outbox.take_due() == [], "a later message to carol waits behind the held ones"
    assert outbox.take_pending() == {"carol": [third]}
    clock.now = 102.0
    assert [m.id for m in outbox.take_due()] == [first, second, third], "all of carol's go together, in order"
    outbox.hold(first)
    assert outbox.next_due() == pytest.approx(106.0), "the backoff doubles"
    assert outbox.wake("carol") and not outbox.wake("bob")
    assert [m.id for m in outbox.take_due()] == [first, second, third]
    assert outbox.on_error(second, "no_keys") is ErrorVerdict.HOLD, "the server's no_keys holds it too"
    assert second in outbox and outbox.take_pending() == {}


def test_held_messages_survive_a_restart_in_order(store: LocalStore, tmp_path: Path) -> None:
    clock = Clock()
    outbox = make(store, clock)
    held = [outbox.add("carol", f"m{i}").id for i in range(3)]
    outbox.take_due()
    outbox.hold(held[0])
    store.close()
    reopened = LocalStore(tmp_path / "alice.db", "alice", "phone")
    try:
        assert [m.id for m in make(reopened, clock).take_due()] == held
    finally:
        reopened.close()
