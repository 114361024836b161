"""Sessions, MQTT 3.1.1 sections 3.1.2.4 (clean_session), 3.2.2.2 (session present) and 4.4
(message delivery retry):

- a clean session lasts as long as its connection; nothing of it is reused by a later
  connection [MQTT-3.1.2-6], so session present is 0 after it [MQTT-3.2.2-1, -3]; a
  persistent session is resumed with session present 1 [MQTT-3.2.2-2];
- a persistent session keeps its subscriptions and stores QoS 1 and 2 messages while its
  client is offline [MQTT-3.1.2-4, MQTT-3.1.2-5]; they are delivered on reconnect with
  RETAIN=0, as they match an established subscription [MQTT-3.3.1-9], in order
  [MQTT-4.6.0-5], and retained messages are not sent again for old subscriptions
  [MQTT-3.3.1-6 sends them for a new subscription only];
- unacknowledged QoS 1 PUBLISH, QoS 2 PUBLISH and PUBREL are re-sent on reconnect with
  their packet ids, PUBLISH with DUP=1 [MQTT-4.4.0-1, MQTT-3.3.1-1], in the original
  order [MQTT-4.6.0-1]; once acknowledged they are not sent again.

Stock amqtt resumes a clean session taken over by a clean_session=0 CONNECT, delivers the
offline queue with RETAIN=1, sends retained messages again at each reconnect, and drops
unacknowledged messages when the connection ends.
"""

from __future__ import annotations

import pytest

from testkit.packets import (
    DISCONNECT,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    Packet,
    RawClient,
    ack_packet,
    parse_publish,
    subscribe_packet,
)
from tests.mqtt.conftest import Target

pytestmark = pytest.mark.filterwarnings("ignore:.*psutil.*:DeprecationWarning")  # stock amqtt's $SYS plugin


def leave(client: RawClient) -> None:
    """DISCONNECT (section 3.14), and wait until the broker has closed the connection."""
    client.send(DISCONNECT)
    assert client.closed()


def barrier(client: RawClient, packet_id: int, pubrel_expected: int | None = None) -> list[Packet]:
    """SUBSCRIBE to an unused filter; return every packet that arrives before its SUBACK.

    The SUBACK is written after what a (re)connect re-sends and after the offline queue.
    A PUBREL for ``pubrel_expected`` (a QoS 2 flow still completing) is answered and left out.
    """
    client.send(subscribe_packet(packet_id, f"barrier/{packet_id}", 0))
    before: list[Packet] = []
    while (got := client.read_packet()).kind != SUBACK:
        if got.kind == PUBREL and got.packet_id == pubrel_expected:
            client.send(ack_packet(PUBCOMP, got.packet_id))
            continue
        before.append(got)
    assert got.packet_id == packet_id
    return before


def test_clean_session_is_never_reused(target: Target) -> None:
    publisher = target.client("publisher")

    # A persistent session: new at first, then resumed.
    first, present = target.connect("dev-s", clean=False)
    assert present is False  # [MQTT-3.2.2-3]
    first.send(subscribe_packet(1, "s/a", 1))
    assert first.suback(1) == [1]
    leave(first)
    second, present = target.connect("dev-s", clean=False)
    assert present is True  # [MQTT-3.2.2-2]

    # clean_session=1 discards it, and starts a session that ends with its connection.
    third, present = target.connect("dev-s", clean=True)
    assert present is False  # [MQTT-3.2.2-1]
    assert second.closed()  # taken over [MQTT-3.1.4-2]
    third.send(subscribe_packet(2, "s/b", 1))
    assert third.suback(2) == [1]

    # Taken over while still connected, by clean_session=0: the clean session is not
    # resumed [MQTT-3.1.2-6] (stock amqtt resumes it: session present 1, s/b subscribed).
    fourth, present = target.connect("dev-s", clean=False)
    assert present is False, "a clean session's state was reused"
    assert third.closed()
    fourth.send(subscribe_packet(3, "s/c", 1))
    assert fourth.suback(3) == [1]
    publisher.send_publish("s/a", b"to the discarded persistent session", qos=1)
    publisher.send_publish("s/b", b"to the discarded clean session", qos=1, packet_id=2)
    publisher.send_publish("s/c", b"to the new one", qos=1, packet_id=3)
    got = fourth.receive(1)[0]  # the same publisher's earlier messages would come first
    assert (got.topic, got.payload) == ("s/c", b"to the new one")

    # A clean session ended by DISCONNECT is gone too: the next CONNECT finds nothing.
    leave(fourth)
    fifth, present = target.connect("dev-s", clean=True)
    leave(fifth)
    _, present = target.connect("dev-s", clean=False)
    assert present is False  # [MQTT-3.1.2-6], [MQTT-3.2.2-3]


def test_persistent_session_queues_while_offline(target: Target) -> None:
    publisher = target.client("publisher")
    witness = target.client("witness")
    witness.send(subscribe_packet(1, "q/t", 2))
    assert witness.suback(1) == [2]
    publisher.send_publish("q/t", b"retained before", qos=1, retain=True)
    assert [m.payload for m in witness.receive(1)] == [b"retained before"]

    sub, _ = target.connect("dev-q", clean=False)
    sub.send(subscribe_packet(1, "q/t", 2))
    assert sub.suback(1) == [2]
    first = sub.receive(1)[0]
    assert (first.payload, first.retain) == (b"retained before", True)  # new subscription [MQTT-3.3.1-8]
    leave(sub)

    publisher.send_publish("q/t", b"one", qos=1, packet_id=11)
    publisher.send_publish("q/t", b"two", qos=2, packet_id=12)
    publisher.send_publish("q/t", b"three", qos=1, packet_id=13)
    # The witness has them: the broker has handled them for every subscriber.
    assert [m.payload for m in witness.receive(3)] == [b"one", b"two", b"three"]

    back, present = target.connect("dev-q", clean=False)
    assert present is True
    queued = back.receive(3)
    assert [(m.topic, m.payload, m.qos, m.retain) for m in queued] == [
        ("q/t", b"one", 1, False), ("q/t", b"two", 2, False), ("q/t", b"three", 1, False),
    ], "offline queue: in order, at the publish QoS, RETAIN=0, and no retained message again"
    assert barrier(back, 2, pubrel_expected=queued[1].packet_id) == []

    # Still subscribed (the subscription is part of the session), and live again.
    publisher.send_publish("q/t", b"live", qos=1, packet_id=14)
    live = back.receive(1)[0]
    assert (live.payload, live.retain) == (b"live", False)


def test_unacknowledged_messages_are_resent_with_dup(target: Target) -> None:
    publisher = target.client("publisher")
    sub, _ = target.connect("dev-r", clean=False)
    sub.send(subscribe_packet(1, "r/t", 2))
    assert sub.suback(1) == [2]

    publisher.send_publish("r/t", b"qos1 unacked", qos=1, packet_id=21)
    publisher.send_publish("r/t", b"qos2 unacked", qos=2, packet_id=22)
    publisher.send_publish("r/t", b"qos2 pubrec'd", qos=2, packet_id=23)
    one, two, three = sub.receive(3, ack=False)
    assert (one.qos, two.qos, three.qos) == (1, 2, 2) and not (one.dup or two.dup or three.dup)
    sub.send(ack_packet(PUBREC, three.packet_id or 0))
    assert sub.expect(PUBREL).packet_id == three.packet_id  # [MQTT-4.3.3-1]
    sub.abort()  # no PUBACK, PUBREC, PUBCOMP: all three are in flight

    back, present = target.connect("dev-r", clean=False)
    assert present is True
    got = [back.read_packet() for _ in range(3)]
    assert [p.kind for p in got] == [PUBLISH, PUBLISH, PUBREL], "re-sent in the original order [MQTT-4.6.0-1]"
    again_one, again_two = parse_publish(got[0]), parse_publish(got[1])
    assert (again_one.packet_id, again_one.payload, again_one.qos) == (one.packet_id, b"qos1 unacked", 1)
    assert (again_two.packet_id, again_two.payload, again_two.qos) == (two.packet_id, b"qos2 unacked", 2)
    assert got[2].packet_id == three.packet_id  # PUBREL again [MQTT-4.4.0-1]
    assert again_one.dup and again_two.dup, "a re-sent PUBLISH has DUP=1 [MQTT-3.3.1-1]"

    back.send(ack_packet(PUBACK, one.packet_id or 0))
    back.send(ack_packet(PUBREC, two.packet_id or 0))
    assert back.expect(PUBREL).packet_id == two.packet_id
    back.send(ack_packet(PUBCOMP, two.packet_id or 0))
    back.send(ack_packet(PUBCOMP, three.packet_id or 0))
    assert barrier(back, 2) == []
    leave(back)

    again, present = target.connect("dev-r", clean=False)
    assert present is True
    assert barrier(again, 3) == [], "acknowledged messages were sent again"
