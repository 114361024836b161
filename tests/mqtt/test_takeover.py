"""Client id takeover, MQTT 3.1.1 section 3.1.4 step 3: when a client connects with the
client id of a connected client, the server closes the existing connection
[MQTT-3.1.4-2] and serves the new one; with clean_session=0 the new connection resumes
the session [MQTT-3.2.2-2], with clean_session=1 it starts empty [MQTT-3.1.2-6].

Stock amqtt, for clean_session=1, deletes the old session but leaves its connection open:
two connections share one client id, and the old one is never closed."""

from __future__ import annotations

import pytest

from testkit.packets import subscribe_packet
from tests.mqtt.conftest import Target

pytestmark = pytest.mark.filterwarnings("ignore:.*psutil.*:DeprecationWarning")  # stock amqtt's $SYS plugin


@pytest.mark.parametrize("clean", [True, False], ids=["clean_session=1", "clean_session=0"])
def test_new_connection_closes_the_old_one(target: Target, clean: bool) -> None:
    old = target.client("device-1", clean=clean)
    old.send(subscribe_packet(1, "to/device-1", 1))
    assert old.suback(1) == [1]

    new, session_present = target.connect("device-1", clean=clean)
    assert old.closed(), "the old connection is still open [MQTT-3.1.4-2]"
    assert session_present is (not clean)  # [MQTT-3.2.2-1], [MQTT-3.2.2-2]
    if clean:
        new.send(subscribe_packet(2, "to/device-1", 1))
        assert new.suback(2) == [1]

    publisher = target.client("publisher")
    publisher.send_publish("to/device-1", b"for the new connection", qos=1)
    got = new.receive(1)[0]
    assert (got.topic, got.payload, got.qos) == ("to/device-1", b"for the new connection", 1)
    new.ping()
