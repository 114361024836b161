"""Delivered QoS, MQTT 3.1.1 section 3.8.4 and 3.3.5: a message goes to a subscriber at
the minimum of the QoS it was published with and the QoS granted to the subscription
[MQTT-3.8.4-6]; a SUBSCRIBE repeating a filter replaces the subscription, its QoS
included [MQTT-3.8.4-3]. Stock amqtt delivers every message at the subscription's QoS
(a QoS 0 publish reaches a QoS 2 subscriber as QoS 2), and keeps the first QoS granted
for a filter whatever a later SUBSCRIBE asks (while its SUBACK says otherwise).

Chat downlink (the bridge publishes every item at QoS 1) follows the same rule: a device
that subscribed to its inbox at QoS 0 gets its items at QoS 0. That test runs on the
ChatBroker only, as stock amqtt has no chat bridge to answer.
"""

from __future__ import annotations

import json

import pytest

from testkit.packets import connect_packet, subscribe_packet
from tests.mqtt.conftest import Target

pytestmark = pytest.mark.filterwarnings("ignore:.*psutil.*:DeprecationWarning")  # stock amqtt's $SYS plugin


def test_delivered_qos_is_the_minimum(target: Target) -> None:
    subscribers = {}
    for granted in (0, 1, 2):
        sub = target.client(f"sub-qos{granted}")
        sub.send(subscribe_packet(1, "qos/t", granted))
        assert sub.suback(1) == [granted]
        subscribers[granted] = sub
    publisher = target.client("publisher")
    for n, published in enumerate((2, 1, 0), start=1):
        publisher.send_publish("qos/t", f"published at {published}".encode(), published, packet_id=n)

    for granted, sub in subscribers.items():
        got = sub.receive(3)
        assert [(m.payload, m.qos) for m in got] == [
            (f"published at {published}".encode(), min(published, granted)) for published in (2, 1, 0)
        ], f"subscription QoS {granted}"


def test_resubscribe_replaces_the_qos(target: Target) -> None:
    sub = target.client("sub-again")
    sub.send(subscribe_packet(1, "again/t", 2))
    assert sub.suback(1) == [2]
    sub.send(subscribe_packet(2, "again/t", 0))
    assert sub.suback(2) == [0]
    publisher = target.client("publisher")
    publisher.send_publish("again/t", b"after the second SUBSCRIBE", qos=2)
    got = sub.receive(1)[0]
    assert (got.payload, got.qos) == (b"after the second SUBSCRIBE", 0)


@pytest.mark.parametrize(("granted", "delivered"), [(0, 0), (1, 1), (2, 1)])
def test_chat_downlink_respects_the_inbox_qos(chatbroker: Target, granted: int, delivered: int) -> None:
    raw = chatbroker.raw()
    raw.send(connect_packet("alice.phone", "alice", "alice-pw"))
    assert raw.connack() == 0
    raw.send(subscribe_packet(1, "u/alice/in", granted))
    assert raw.suback(1) == [granted]
    raw.send_publish("u/alice/req", json.dumps({"rid": "r1", "op": "ping"}).encode(), qos=1)
    got = raw.receive(1)[0]
    assert (got.topic, json.loads(got.payload)["rid"], got.qos) == ("u/alice/in", "r1", delivered)
