"""The chaos ledger (bench/chaos/ledger.py) counts each kind of failure it exists to catch.

Driven with a fake clock and no I/O: a clean run is clean, and a lost, duplicated,
reordered, misrouted or unknown delivery, and a 'sent' for a lost message, are each counted.
"""

from __future__ import annotations

from bench.chaos.ledger import Ledger


def fresh() -> Ledger:
    ticks = iter(range(1000))
    ledger = Ledger(clock=lambda: float(next(ticks)))
    for n in range(3):
        body = ledger.intend("a", n, "b", ("b.phone", "b.tablet"))
        assert body == f"a:{n}"
        ledger.accepted("a", n, f"id{n}")
    return ledger


def deliver_all(ledger: Ledger, order: tuple[int, ...] = (0, 1, 2), devices: tuple[str, ...] = ("b.phone", "b.tablet"),
                ) -> None:
    for device in devices:
        for n in order:
            ledger.delivered(device, "a", "b", f"a:{n}")


def test_a_clean_run_is_clean() -> None:
    ledger = fresh()
    ledger.sent_receipt(["id0", "id1", "id2"])
    deliver_all(ledger)
    v = ledger.verdict()
    assert v.clean and v.messages == 3 and v.deliveries_expected == 6 and v.sent_receipts == 3
    assert ledger.missing() == 0 and len(ledger.latencies()) == 6


def test_lost_and_false_sent() -> None:
    ledger = fresh()
    ledger.sent_receipt(["id2"])
    deliver_all(ledger, order=(0, 1))
    v = ledger.verdict()
    assert (v.lost, v.false_sent) == (2, 1) and ledger.missing() == 2


def test_duplicates_and_reorders() -> None:
    ledger = fresh()
    deliver_all(ledger, devices=("b.tablet",))
    deliver_all(ledger, order=(0, 2, 1, 1), devices=("b.phone",))
    v = ledger.verdict()
    assert (v.lost, v.duplicated, v.reordered) == (0, 1, 1)


def test_misrouted_spoofed_and_unknown() -> None:
    ledger = fresh()
    deliver_all(ledger)
    ledger.delivered("c.phone", "a", "c", "a:0")  # read by someone it was not for
    ledger.delivered("b.phone", "mallory", "b", "a:1")  # spoofed body
    ledger.delivered("b.phone", "a", "b", "a:99")  # never sent
    v = ledger.verdict()
    assert (v.misrouted, v.unknown) == (2, 1) and not v.clean


def test_a_delivery_reported_before_its_send_still_counts() -> None:
    ledger = Ledger()
    ledger.delivered("b.phone", "c", "b", "c:0")  # the child's "I 0" line is read after this
    ledger.intend("c", 0, "b", ("b.phone",))
    ledger.accepted("c", 0, "x")
    assert ledger.verdict().clean and ledger.unsent("c") == 1


def test_history_copies_to_the_senders_other_devices() -> None:
    ticks = iter(range(1000))
    ledger = Ledger(clock=lambda: float(next(ticks)))
    ledger.intend("a", 0, "b", ("b.phone", "a.tablet"))  # the sender's tablet gets a copy (end-to-end)
    ledger.accepted("a", 0, "id0")
    ledger.delivered("b.phone", "a", "b", "a:0")
    ledger.delivered("a.tablet", "a", "b", "a:0")
    assert ledger.verdict().clean
    ledger.delivered("c.phone", "a", "b", "a:0")  # a third user's device: misrouted
    assert ledger.verdict().misrouted == 1
