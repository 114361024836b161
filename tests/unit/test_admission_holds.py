"""``Holds`` (bridge/messaging/admission.py): the order a device's refused messages must come back in."""

from __future__ import annotations

from bridge.messaging.admission import Holds, Refused


def refused(holds: Holds, msg_id: str, now: float = 0.0) -> bool:
    try:
        holds.check("alice.phone", msg_id, now)
    except Refused:
        return True
    return False


def test_ids_refused_together_come_back_in_their_order_behind_earlier_ones() -> None:
    holds = Holds()
    holds.hold("alice.phone", "m1", "queue_full", 0.0)
    holds.hold_all("alice.phone", ["m3", "m4"], "rate_limited", 0.0)
    assert refused(holds, "m3"), "m1 was refused first"
    assert not refused(holds, "m1")
    assert refused(holds, "m4")
    assert not refused(holds, "m3") and not refused(holds, "m4")
    assert not refused(holds, "m5"), "the hold is gone once all came back"


def test_hold_all_of_nothing_holds_nothing_and_a_hold_ends_after_its_time() -> None:
    holds = Holds()
    holds.hold_all("alice.phone", [], "rate_limited", 0.0)
    assert not refused(holds, "m1")
    holds.hold_all("alice.phone", ["m2"], "rate_limited", 0.0)
    assert refused(holds, "m3", now=1.0)
    assert not refused(holds, "m3", now=61.0), "at most HOLD_S"


def test_a_message_refused_under_the_hold_waits_its_turn() -> None:
    holds = Holds()
    holds.hold_all("alice.phone", ["m1", "m2"], "rate_limited", 0.0)
    assert refused(holds, "m9"), "published after them: it goes behind them"
    assert not refused(holds, "m1") and not refused(holds, "m2")
    assert refused(holds, "m10"), "m9 is still owed"
    assert not refused(holds, "m9") and not refused(holds, "m10")
