"""Keepalive, MQTT 3.1.1 section 3.1.2.10: a client silent for 1.5 x its keepalive is
disconnected [MQTT-3.1.2-24], and as that is not a DISCONNECT its will is published
[MQTT-3.1.2-8, section 3.1.2.5]; a client that keeps sending PINGREQ stays connected
(section 3.12). Stock amqtt never drops a silent client."""

from __future__ import annotations

import time

import pytest

from testkit.packets import subscribe_packet
from tests.mqtt.conftest import Target

pytestmark = pytest.mark.filterwarnings("ignore:.*psutil.*:DeprecationWarning")  # stock amqtt's $SYS plugin


def test_silent_client_is_dropped_and_its_will_published(target: Target) -> None:
    watcher = target.client("watcher")
    watcher.send(subscribe_packet(1, "will/ka1", 1))
    assert watcher.suback(1) == [1]
    pinger = target.client("pinger", keepalive=1)
    silent = target.client("silent", keepalive=1, will=("will/ka1", b"silent is gone", 1, False))
    quiet_since = time.monotonic()  # its last packet was CONNECT; the CONNACK is in

    closed_after = None
    while closed_after is None and time.monotonic() - quiet_since < 5.0:
        pinger.ping()  # PINGREQ every 0.4 s keeps a keepalive=1 client connected [MQTT-3.1.2-23]
        if silent.closed_within(0.4):
            closed_after = time.monotonic() - quiet_since
    assert closed_after is not None, "a client silent for 5 s with keepalive 1 s is still connected"
    assert closed_after >= 1.4, f"closed after {closed_after:.2f}s, before 1.5 x keepalive"

    will = watcher.receive(1)[0]
    assert (will.topic, will.payload, will.qos, will.retain) == ("will/ka1", b"silent is gone", 1, False)
    pinger.ping()  # still served
