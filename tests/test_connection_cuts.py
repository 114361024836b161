"""Connections cut at the worst moments (issue 3): between a PUBLISH and its ``sent``, and between a delivery
and its ack. Through a packet-aware proxy, with the real SDK on both ends: no loss, no duplicate handed to the app.
The SDK subscribes to its inbox at QoS 0 and acks at QoS 0 (PROTOCOL.md section 3, "QoS"): on both connection
paths (``DEPLOYMENTS``), the staging store alone makes up for what a cut loses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client_sdk import Client
from client_sdk.events import Message, Receipt
from testkit.proxy import DOWN, PUBLISH, UP, MqttProxy, Packet
from tests.deployment import settings_of
from tests.helpers import BrokerThread, Peer, eventually
from tests.sdk.conftest import Collector

DEPLOYMENTS = ("single", "amqtt-path")  # tests/conftest.py: the lean path, and amqtt's


@pytest.fixture
def setup(tmp_path: Path, deployment: str) -> Iterator[tuple[BrokerThread, MqttProxy]]:
    broker = BrokerThread(tmp_path / "data", settings_of(deployment)).start()
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


def test_a_stream_cut_again_and_again_on_a_qos0_inbox_loses_and_repeats_nothing(
    setup: tuple[BrokerThread, MqttProxy], tmp_path: Path
) -> None:
    broker, proxy = setup
    alice, bob = client(tmp_path, "alice", broker.port), client(tmp_path, "bob", proxy.port)
    alice_events, bob_events = Collector(alice), Collector(bob)
    alice.connect()
    bob.connect()
    qos: set[int] = set()

    def after(count: int, direction: str, what: bytes) -> None:
        """Cut bob's connection after the ``count``-th packet that matches; note the QoS of what comes down."""
        seen = [0]

        def rule(p: Packet) -> bool:
            if p.direction == DOWN and p.kind == PUBLISH:
                qos.add((p.data[0] >> 1) & 3)
            if p.direction == direction and p.kind == PUBLISH and what in p.data:
                seen[0] += 1
            return seen[0] >= count

        proxy.cut_after(rule)

    try:
        ids: list[str] = []
        # An ack cut comes at the first ack: the SDK acks per read, so 15 items may take a single ack.
        cuts = [(3, DOWN, b'"kind":"msg"'), (1, UP, b'"seqs"'), (5, DOWN, b'"kind":"msg"'), (1, UP, b'"seqs"')]
        for n, (count, direction, what) in enumerate(cuts, 1):
            after(count, direction, what)
            ids += [alice.send("bob", f"m{len(ids) + i}") for i in range(15)]
            eventually(lambda n=n: proxy.cuts == n, what=f"cut {n}")  # type: ignore[misc]
        received = bob_events.messages(len(ids), timeout=30)
        assert [m.id for m in received] == ids, "every message, once, in publish order"
        delivered: set[str] = set()
        while delivered != set(ids):
            delivered.update(alice_events.next(Receipt, timeout=30, where=lambda r: r.status == "delivered").ids)
        eventually(lambda: alice.outbox() == [], what="alice's outbox empty")
        assert not [e for e in bob_events.all_now() if isinstance(e, Message)], "no duplicate handed over"
        assert qos == {0}, "the SDK's inbox is at QoS 0"
    finally:
        alice.close()
        bob.close()


def qos0_peer(port: int, user: str) -> Peer:
    peer = Peer(port, user, f"{user}-pw")
    assert peer.connect() == 0
    peer.client.subscribe(f"u/{user}/in", qos=0)
    assert peer.subacks.get(timeout=10) == [0]
    return peer


def test_a_qos0_inbox_gets_again_what_it_did_not_ack_on_a_live_connection_and_after_a_takeover(
    tmp_path: Path, deployment: str
) -> None:
    broker = BrokerThread(tmp_path / "d", settings_of(deployment, {"delivery.redeliver_after_s": 0.5})).start()
    peers: list[Peer] = []
    try:
        broker.add_users({"alice": "alice-pw", "bob": "bob-pw"})
        alice = qos0_peer(broker.port, "alice")
        bob = qos0_peer(broker.port, "bob")
        peers += [alice, bob]
        alice.publish("u/alice/out", {"id": "m1", "to": "bob", "body": "hi"})
        is_m1 = lambda i: i.get("kind") == "msg" and i.get("id") == "m1"  # noqa: E731
        first = bob.expect(is_m1)
        assert bob.expect(is_m1)["seq"] == first["seq"], "not acked: sent again on the live connection (rule 8)"
        again = qos0_peer(broker.port, "bob")  # same client id: takes the first connection over
        peers.append(again)
        assert again.expect(is_m1)["seq"] == first["seq"], "not acked: sent again to the new connection"
        again.publish("u/bob/ack", {"seqs": [first["seq"]]})
        assert alice.expect(lambda i: i.get("kind") == "receipt" and i.get("status") == "delivered")["ids"] == ["m1"]
        assert again.nothing_arrives(1.0), "acked: never sent again"
    finally:
        for peer in peers:
            peer.close()
        broker.stop()
