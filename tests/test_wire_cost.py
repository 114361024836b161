"""What one durable one-to-one message costs on the wire: MQTT packets and bytes, counted through a
recording proxy between raw clients and the real broker (docs/ARCHITECTURE.md, "Packets per message").

One message, both ends online, the recipient acks it at once and the sender acks its receipts:
the publish, the downlink, the app ack, ``sent`` (unless folded into ``delivered``: PROTOCOL.md
section 6 rule 11), ``delivered``, its ack, and the PUBACKs of whichever of them are QoS 1.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from testkit.proxy import PUBLISH, MqttProxy, Packet
from tests.helpers import BrokerThread, Peer

DEPLOYMENTS = ("single", "amqtt-path")  # tests/conftest.py: the lean path, and amqtt's
PUBACK = 4
MESSAGES = 20


class Recorder(MqttProxy):
    """Records (direction, kind, topic, size) of every PUBLISH and PUBACK relayed; never cuts."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._lock = threading.Lock()
        self.seen: list[tuple[str, int, str | None, int]] = []
        self.rule = self._record

    def _record(self, packet: Packet) -> bool:
        if packet.kind in (PUBLISH, PUBACK):
            with self._lock:
                self.seen.append((packet.direction, packet.kind, packet.topic, len(packet.data)))
        return False

    def take(self) -> list[tuple[str, int, str | None, int]]:
        with self._lock:
            seen, self.seen = self.seen, []
        return seen


@pytest.fixture
def recorder(broker: BrokerThread) -> Iterator[Recorder]:
    proxy = Recorder(broker.port).start()
    yield proxy
    proxy.stop()


def connect(port: int, made: list[Peer], user: str, qos: int) -> Peer:
    peer = Peer(port, user, f"{user}-pw")
    made.append(peer)
    assert peer.connect() == 0
    peer.client.subscribe(f"u/{user}/in", qos=qos)
    assert peer.subacks.get(timeout=10) == [qos]
    return peer


def publish(peer: Peer, kind: str, payload: dict[str, Any], qos: int) -> None:
    peer.client.publish(f"u/{peer.user}/{kind}", json.dumps(payload).encode(), qos=qos).wait_for_publish(10)


def one_message(alice: Peer, bob: Peer, msg_id: str, qos: int) -> list[str]:
    """Send one message and ack what it brings; the statuses alice got for it, in order."""
    publish(alice, "out", {"id": msg_id, "to": "bob", "body": "x" * 100}, qos=1)
    item = bob.expect(lambda i: i.get("kind") == "msg" and i.get("id") == msg_id)
    publish(bob, "ack", {"seqs": [item["seq"]]}, qos)
    statuses = []
    while True:
        receipt = alice.expect(lambda i: i.get("kind") == "receipt" and msg_id in i.get("ids", []))
        statuses.append(receipt["status"])
        if receipt["status"] == "delivered":
            publish(alice, "ack", {"seqs": [receipt["seq"]]}, qos)
            return statuses


def cost(broker: BrokerThread, recorder: Recorder, made: list[Peer], qos: int) -> tuple[Counter[str], int, list[str]]:
    """Packets by name and bytes per message (steady state), and the statuses of the last message."""
    alice, bob = connect(recorder.port, made, "alice", qos), connect(recorder.port, made, "bob", qos)
    one_message(alice, bob, "warm", qos)
    assert alice.nothing_arrives(0.3) and bob.nothing_arrives(0.1)
    recorder.take()
    statuses: list[str] = []
    for n in range(MESSAGES):
        statuses = one_message(alice, bob, f"m{n}", qos)
    assert alice.nothing_arrives(0.3) and bob.nothing_arrives(0.1)  # nothing late (a PUBACK, a receipt)
    seen = recorder.take()
    names: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for direction, kind, topic, size in seen:
        name = f"{direction} {'PUBACK' if kind == PUBACK else topic}"
        names[name] += 1
        sizes[name] += size
    print(f"\nQoS {qos}, per message:", {name: (names[name] // MESSAGES, sizes[name] // MESSAGES) for name in names})
    return Counter({name: count // MESSAGES for name, count in names.items()}), sum(s for *_, s in seen) // MESSAGES, \
        statuses


@pytest.mark.parametrize("qos", [1, 0])
def test_packets_per_message(broker: BrokerThread, recorder: Recorder, peers: list[Peer], qos: int) -> None:
    names, size, statuses = cost(broker, recorder, peers, qos)
    print(f"\nQoS {qos}: {sum(names.values())} packets, {size} bytes per message: {dict(names)}")
    assert statuses == ["delivered"], "acked before the flush: 'delivered' stands for 'sent' too (rule 11)"
    assert sum(names.values()) == (10 if qos == 1 else 6)
