"""``Holds`` (bridge/messaging/admission.py): the order a device's refused messages must come back in."""

from __future__ import annotations

import pytest

from bridge.messaging import admission
from bridge.messaging.admission import ANSWERED_MAX, HOLD_S, Holds, Refused


def refused(holds: Holds, msg_id: str, now: float = 0.0) -> bool:
    try:
        holds.check("alice.phone", msg_id, now)
    except Refused:
        return True
    return False


def test_messages_refused_under_a_hold_come_back_in_their_order() -> None:
    holds = Holds()
    holds.hold("alice.phone", "m1", "rate_limited", 0.0)
    assert refused(holds, "m2") and refused(holds, "m3"), "behind m1, in the order they came"
    assert refused(holds, "m3"), "m1 first"
    assert not refused(holds, "m1")
    assert refused(holds, "m3"), "m2 is still owed"
    assert not refused(holds, "m2") and not refused(holds, "m3")
    assert not refused(holds, "m4"), "the hold is gone once all came back"


def test_refused_again_on_its_resend_it_stays_first_and_a_hold_ends_after_its_time() -> None:
    holds = Holds()
    holds.hold("alice.phone", "m1", "rate_limited", 0.0)
    assert refused(holds, "m2")
    assert not refused(holds, "m1")
    holds.hold("alice.phone", "m1", "rate_limited", 0.0)  # the re-send was refused too
    assert refused(holds, "m2") and not refused(holds, "m1")
    holds.hold("alice.phone", "m5", "rate_limited", 0.0)
    assert refused(holds, "m6", now=61.0), "m5 lost its place after HOLD_S, but m2 is still owed before m6"
    assert not refused(holds, "m2", now=62.0) and not refused(holds, "m6", now=62.0)


def test_a_hold_whose_messages_never_come_back_ends_one_place_per_hold_s() -> None:
    holds = Holds()
    holds.hold("alice.phone", "m1", "rate_limited", 0.0)
    assert refused(holds, "m2", now=1.0)
    assert refused(holds, "m3", now=61.0), "m1 gave up: m2 leads"
    assert not refused(holds, "m4", now=200.0), "none came back: the hold is gone"


def test_a_message_answered_sent_is_never_waited_for() -> None:
    """A re-send that crossed its 'sent' and was refused must not hold the device's later messages
    behind an id it never sends again (bench chaos --cluster: a minute per such id)."""
    holds = Holds()
    holds.answered("alice.phone", "m1", 0.0)
    holds.hold("alice.phone", "m1", "rate_limited", 1.0)  # the crossing copy, refused
    assert not refused(holds, "m2", now=1.0), "no hold behind a message answered 'sent'"
    holds.hold("alice.phone", "m3", "rate_limited", 2.0)
    holds.hold("alice.phone", "m4", "rate_limited", 2.0)
    assert refused(holds, "m5", now=2.0)
    holds.answered("alice.phone", "m4", 3.0)  # its first copy was ahead in the lane: answered now
    assert not refused(holds, "m1", now=3.0), "a repeat of an answered one passes (answered 'sent' again)"
    assert refused(holds, "m5", now=3.0), "m3 is still owed"
    assert not refused(holds, "m3", now=3.0) and not refused(holds, "m5", now=3.0)


def test_answered_ids_are_remembered_for_a_while_and_a_bounded_number() -> None:
    holds = Holds()
    for n in range(ANSWERED_MAX + 10):
        holds.answered("alice.phone", f"m{n}", 0.0)
    assert not holds.was_answered("alice.phone", "m0", 0.0), "the oldest are forgotten beyond the bound"
    assert holds.was_answered("alice.phone", f"m{ANSWERED_MAX + 9}", 0.0)
    assert not holds.was_answered("alice.phone", f"m{ANSWERED_MAX + 9}", HOLD_S), "... and after HOLD_S"
    holds.prune(HOLD_S)
    assert holds._answered == {}, "the sweep drops devices with nothing left"


def test_a_hold_remembers_at_most_max_held_ids_and_the_others_come_after_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "MAX_HELD_IDS", 3)
    holds = Holds()
    holds.hold("alice.phone", "m1", "rate_limited", 0.0)
    for n in range(2, 1000):  # a client publishing new ids under the hold without end
        assert refused(holds, f"m{n}")
    assert holds.remembered("alice.phone") == 3, "m1, m2, m3: the rest refused without being remembered"
    assert refused(holds, "m4") and refused(holds, "m2"), "m1 first"
    assert not refused(holds, "m1")
    assert refused(holds, "m4"), "not remembered: it may not overtake m2 and m3 ..."
    assert refused(holds, "m999")
    assert holds.remembered("alice.phone") == 2, "... nor take the place m1 freed"
    assert not refused(holds, "m2") and not refused(holds, "m3")
    assert holds.remembered("alice.phone") == 0
    assert not refused(holds, "m4") and not refused(holds, "m5"), "then in the order the client re-sends them"


def test_a_full_hold_whose_messages_never_come_back_still_ends_one_place_per_hold_s(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "MAX_HELD_IDS", 2)
    holds = Holds()
    holds.hold("alice.phone", "m1", "rate_limited", 0.0)
    assert refused(holds, "m2") and refused(holds, "m3")
    assert refused(holds, "m3", now=HOLD_S), "m1 gave up: m2 leads, m3 still not remembered"
    assert holds.remembered("alice.phone") == 1
    assert not refused(holds, "m3", now=2 * HOLD_S), "m2 gave up too: the hold is gone"
