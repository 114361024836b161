"""``Holds`` (bridge/messaging/admission.py): the order a device's refused messages must come back in."""

from __future__ import annotations

from bridge.messaging.admission import Holds, Refused


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
