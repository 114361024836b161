"""The SDK's receipt ledger (client_sdk/receipts.py): each status once per message, never a lower after a higher."""

from __future__ import annotations

from client_sdk.events import Receipt
from client_sdk.receipts import ReceiptLedger


def r(status: str, *ids: str) -> Receipt:
    return Receipt(status, ids, "bob", 1)


def handed(ledger: ReceiptLedger, *receipts: Receipt) -> list[tuple[str, tuple[str, ...]]]:
    return [(out.status, out.ids) for receipt in receipts for out in ledger.admit(receipt)]


def test_in_order_everything_passes_once() -> None:
    ledger = ReceiptLedger()
    assert handed(ledger, r("sent", "m1"), r("delivered", "m1"), r("seen", "m1")) == [
        ("sent", ("m1",)), ("delivered", ("m1",)), ("seen", ("m1",))]
    assert handed(ledger, r("seen", "m1"), r("delivered", "m1"), r("sent", "m1")) == []


def test_a_lower_status_after_a_higher_one_is_dropped_per_id() -> None:
    ledger = ReceiptLedger()
    handed(ledger, r("sent", "m1", "m2"), r("delivered", "m1"))
    assert handed(ledger, r("delivered", "m1", "m2")) == [("delivered", ("m2",))]
    assert handed(ledger, r("sent", "m1", "m3", "m3")) == [("sent", ("m3",))]


def test_seen_implies_delivered_first() -> None:
    ledger = ReceiptLedger()
    handed(ledger, r("sent", "m1", "m2"), r("delivered", "m1"))
    assert handed(ledger, r("seen", "m1", "m2")) == [("delivered", ("m2",)), ("seen", ("m1", "m2"))]
    assert handed(ledger, r("seen", "m3")) == [("delivered", ("m3",)), ("seen", ("m3",))]  # another device's message


def test_expired_once_whatever_else() -> None:
    ledger = ReceiptLedger()
    handed(ledger, r("sent", "m1"), r("delivered", "m1"))
    assert handed(ledger, r("expired", "m1"), r("expired", "m1")) == [("expired", ("m1",))]
    assert handed(ledger, r("seen", "m1")) == [("seen", ("m1",))]
    assert handed(ledger, r("expired", "m1")) == []


def test_memory_is_bounded_least_recent_first() -> None:
    ledger = ReceiptLedger(max_ids=2)
    handed(ledger, r("seen", "m1"), r("seen", "m2"), r("seen", "m3"))
    assert handed(ledger, r("seen", "m3")) == []
    assert handed(ledger, r("seen", "m1")) == [("delivered", ("m1",)), ("seen", ("m1",))]  # forgotten
