"""Receipts as the app sees them through the SDK, two devices on each side (PROTOCOL.md delivery rule 11):
per message sent -> delivered -> seen on the sending device, delivered -> seen on the other, each once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client_sdk import Message, Receipt
from tests.deployment import start_broker
from tests.helpers import BrokerProcess
from tests.sdk.conftest import Collector, Factory

DEPLOYMENTS = ("single", "cluster")  # tests/conftest.py: tests using `deployment` run on both

WAIT_S = 15.0


@pytest.fixture
def broker(tmp_path: Path, deployment: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``sent`` waits 1.5 s for the copy of bob's offline laptop to be written: time for bob's phone to ack
    and report `seen` before it (one process; a cluster writes through: no such wait)."""
    users = {"alice": "alice-pw", "bob": "bob-pw"}
    if deployment == "cluster":
        running = start_broker(deployment, tmp_path, request, {"staging.flush_ms": 1500})
        running.add_users(users)
    else:  # users first: the process reads its data folder
        running = BrokerProcess(tmp_path / "data", {"staging.flush_ms": 1500})
        running.add_users(users)
        running.start()
    yield running
    running.stop()


def statuses_until_seen(events: Collector, msg_id: str, marker: str) -> list[str]:
    """Statuses of the receipts naming ``msg_id``, in hand-over order, until ``seen`` of ``marker``."""
    got: list[str] = []
    while True:
        receipt = events.next(Receipt, WAIT_S)
        if msg_id in receipt.ids:
            got.append(receipt.status)
        if receipt.status == "seen" and marker in receipt.ids:
            return got


def test_each_sender_device_gets_each_receipt_once_in_order(make_client: Factory) -> None:
    laptop = make_client("bob", device="laptop", store="bob-laptop.db")
    laptop.connect(timeout=10)  # known, with keys ...
    laptop.close()  # ... and offline
    bob = make_client("bob", store="bob.db")
    bob_events = Collector(bob)
    bob.connect(timeout=10)
    alice = make_client("alice", store="alice.db")
    alice_events = Collector(alice)
    alice.connect(timeout=10)
    alice_laptop = make_client("alice", device="laptop", store="alice-laptop.db")
    laptop_events = Collector(alice_laptop)
    alice_laptop.connect(timeout=10)

    mid = alice.send("bob", "hi")
    assert bob_events.next(Message, WAIT_S, lambda m: m.id == mid).body == "hi"
    bob.mark_seen("alice", [mid])
    assert statuses_until_seen(alice_events, mid, mid) == ["sent", "delivered", "seen"]
    assert statuses_until_seen(laptop_events, mid, mid) == ["delivered", "seen"]
    bob.mark_seen("alice", [mid])  # apps report again (the chat opened twice): alice has it already
    marker = alice.send("bob", "later")  # its `seen` comes after any other receipt of `mid`
    bob_events.next(Message, WAIT_S, lambda m: m.id == marker)
    bob.mark_seen("alice", [marker])
    assert statuses_until_seen(alice_events, mid, marker) == []
    assert statuses_until_seen(laptop_events, mid, marker) == []
