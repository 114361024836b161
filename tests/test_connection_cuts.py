"""Connections cut at the worst moments (issue 3): between a PUBLISH and its ``sent``, and between a delivery
and its ack. Through a packet-aware proxy, with the real SDK on both ends: no loss, no duplicate handed to the app."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client_sdk import Client
from client_sdk.events import Message, Receipt
from testkit.proxy import DOWN, PUBLISH, UP, MqttProxy
from tests.helpers import BrokerThread
from tests.sdk.conftest import Collector


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[BrokerThread, MqttProxy]]:
    broker = BrokerThread(tmp_path / "data").start()
    for name in ("alice", "bob"):
        broker.add_user(name, f"{name}-pw")
    proxy = MqttProxy(broker.port).start()
    yield broker, proxy
    proxy.stop()
    broker.stop()


def client(tmp_path: Path, user: str, port: int) -> Client:
    return Client(user, f"{user}-pw", device="phone", port=port, store=str(tmp_path / f"{user}.db"),
                  reconnect_delay=(0.1, 0.5), resend_interval=2.0)


def test_cut_between_publish_and_sent(setup: tuple[BrokerThread, MqttProxy], tmp_path: Path) -> None:
    broker, proxy = setup
    alice, bob = client(tmp_path, "alice", proxy.port), client(tmp_path, "bob", broker.port)
    alice_events, bob_events = Collector(alice), Collector(bob)
    alice.connect()
    bob.connect()
    try:
        proxy.cut_after(lambda p: p.direction == UP and p.kind == PUBLISH and p.topic == "u/alice/out")
        msg_id = alice.send("bob", "cut after publish")
        received = bob_events.next(Message)
        assert received.id == msg_id and received.body == "cut after publish"
        alice_events.next(Receipt, where=lambda r: r.status == "sent" and msg_id in r.ids)
        assert proxy.cuts == 1, "the connection was cut once, right after the publish"
        assert alice.outbox() == []
        # The re-published message was recognised: bob's app saw it exactly once.
        alice.send("bob", "next")
        assert bob_events.next(Message).body == "next"
        assert not [e for e in bob_events.all_now() if isinstance(e, Message)]
    finally:
        alice.close()
        bob.close()


def test_cut_between_delivery_and_ack(setup: tuple[BrokerThread, MqttProxy], tmp_path: Path) -> None:
    broker, proxy = setup
    alice, bob = client(tmp_path, "alice", broker.port), client(tmp_path, "bob", proxy.port)
    alice_events, bob_events = Collector(alice), Collector(bob)
    alice.connect()
    bob.connect()
    try:
        proxy.cut_after(lambda p: p.direction == DOWN and p.kind == PUBLISH and b'"kind":"msg"' in p.data)
        msg_id = alice.send("bob", "cut before the ack")
        assert bob_events.next(Message).id == msg_id
        # The ack could not pass; after the reconnect the server delivers again and the SDK drops the copy,
        # then acks it: the sender hears 'delivered'.
        alice_events.next(Receipt, timeout=15, where=lambda r: r.status == "delivered" and msg_id in r.ids)
        assert proxy.cuts == 1
        alice.send("bob", "after")
        assert bob_events.next(Message).body == "after"
        assert not [e for e in bob_events.all_now() if isinstance(e, Message)], "no duplicate handed over"
    finally:
        alice.close()
        bob.close()
