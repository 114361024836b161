"""What a client sends just before it leaves is delivered (generic topics).

A connection's received messages are handed on before its end is handled: a
PUBLISH the broker has read (and acknowledged, for QoS 1, or released with PUBREL,
for QoS 2) and a retained one are delivered and kept even when the client's
DISCONNECT, a close of the socket, or a takeover by the same client id follows at
once [MQTT-4.3.2-2, MQTT-4.3.3-2, MQTT-3.3.1-5]. This is what one-shot publishers
(``mosquitto_pub``, cron jobs, sensors that sleep between readings) do.

Stock amqtt 0.12.1 delivers them after DISCONNECT or a close (its message loop
waits on the delivery queue too), but loses them on a takeover: the old connection's
loop ends with its queue. The broker's leaner reader and message loops
(broker/handler.py, broker/server.py) lost them in all three cases (the issue
measured 8 of 30 with ``mosquitto_pub -q 0``); the first and the last tests below
check the ChatBroker alone for that reason.
"""

from __future__ import annotations

import subprocess

import pytest

from testkit.packets import (
    DISCONNECT,
    PUBREC,
    PUBREL,
    ack_packet,
    connect_packet,
    publish_packet,
    subscribe_packet,
)
from tests.mqtt.conftest import Target
from tests.test_mosquitto_clients import RUN_TIMEOUT_S, tool

pytestmark = pytest.mark.filterwarnings("ignore:.*psutil.*:DeprecationWarning")  # stock amqtt's $SYS plugin

PUBLISHERS = 30


def one_shot(target: Target, index: int, qos: int, ending: str) -> None:
    """Connect, publish once at ``qos``, then end at once: DISCONNECT, a bare close, or a takeover."""
    raw = target.raw()
    client_id = f"shot-{qos}-{ending}-{index}"
    raw.send(connect_packet(client_id))
    assert raw.connack() == 0
    message = publish_packet("shots/t", f"{qos}:{ending}:{index}".encode(), qos, packet_id=7)
    if qos == 2:
        raw.send(message)
        assert raw.expect(PUBREC).packet_id == 7
        message = ack_packet(PUBREL, 7)
    if ending == "disconnect":
        raw.send(message + DISCONNECT)
    elif ending == "close":
        raw.send(message)
    else:  # takeover: the same client id connects again straight after the publish
        raw.send(message)
        again = target.raw()
        again.send(connect_packet(client_id) + DISCONNECT)
        assert again.connack() == 0
    raw.abort()


def shoot(target: Target, ending: str) -> None:
    """PUBLISHERS one-shot publishers at QoS 0, 1, 2 in turn; a subscriber gets every message."""
    sub = target.client("shots-sub")
    sub.send(subscribe_packet(1, "shots/t", 2))
    assert sub.suback(1) == [2]
    sent = set()
    for index in range(PUBLISHERS):
        qos = index % 3
        one_shot(target, index, qos, ending)
        sent.add(f"{qos}:{ending}:{index}")
    got = {message.payload.decode() for message in sub.receive(PUBLISHERS)}
    assert got == sent


@pytest.mark.parametrize("ending", ["disconnect", "close"])
def test_one_shot_publishers_are_all_delivered(chatbroker: Target, ending: str) -> None:
    shoot(chatbroker, ending)


def test_a_publish_right_before_a_takeover_is_delivered(chatbroker: Target) -> None:
    # Stock amqtt loses some of these, but not on every run (it passed on Python 3.12.1 once):
    # a race cannot be a strict xfail, so this runs on our broker only, as the others here.
    shoot(chatbroker, "takeover")


def test_a_retained_one_shot_publish_is_kept(chatbroker: Target) -> None:
    target = chatbroker
    for qos in (0, 1, 2):
        raw = target.raw()
        raw.send(connect_packet(f"keeper-{qos}"))
        assert raw.connack() == 0
        message = publish_packet(f"kept/{qos}", b"last value", qos, packet_id=3, retain=True)
        if qos == 2:
            raw.send(message)
            assert raw.expect(PUBREC).packet_id == 3
            message = ack_packet(PUBREL, 3)
        raw.send(message + DISCONNECT)
        raw.abort()
    later = target.client("later")
    later.send(subscribe_packet(1, "kept/+", 2))
    assert later.suback(1) == [2]
    got = later.receive(3)
    assert sorted((m.topic, m.payload, m.retain) for m in got) == [
        (f"kept/{qos}", b"last value", True) for qos in (0, 1, 2)
    ]


def test_mosquitto_pub_qos0_one_shots_are_all_delivered(chatbroker: Target) -> None:
    """``mosquitto_pub -q 0``: CONNECT, PUBLISH, DISCONNECT and close, in one go (the issue's 8 of 30)."""
    sub = chatbroker.client("pub-sub")
    sub.send(subscribe_packet(1, "tools/t", 0))
    assert sub.suback(1) == [0]
    for index in range(PUBLISHERS):
        done = subprocess.run(
            [tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(chatbroker.port), "-V", "mqttv311", "-q", "0",
             "-i", f"tool-{index}", "-t", "tools/t", "-m", f"m{index}"],
            capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
        )
        assert done.returncode == 0, done.stderr
    got = {message.payload.decode() for message in sub.receive(PUBLISHERS)}
    assert got == {f"m{index}" for index in range(PUBLISHERS)}
