"""Malformed input closes the connection, MQTT 3.1.1 section 4.8 ("unless stated otherwise,
if either the Server or Client encounters a protocol violation, it MUST close the Network
Connection") and the rules cited per case; nothing is answered (no CONNACK to a bad
CONNECT, no SUBACK to a bad SUBSCRIBE). A connection closed for a protocol error after
CONNECT publishes its will (section 3.1.2.5).

A first packet that is not CONNECT is refused on its first byte, before its body is
read [MQTT-3.1.0-1]: the client below announces a 16 KiB body and sends none of it.

Stock amqtt decodes invalid UTF-8 into the text "b'...'", accepts an empty will topic,
reads past a CONNECT's end for a will topic that is not there, parses any first packet as
a CONNECT, answers an empty SUBSCRIBE, and only logs a wildcard topic or QoS 3 (the
connection stays open): every case below leaves the connection open on it.
"""

from __future__ import annotations

import pytest

from testkit.packets import (
    PINGREQ,
    connect_packet,
    packet,
    publish_packet,
    subscribe_packet,
    utf8,
)
from tests.mqtt.conftest import Target

pytestmark = pytest.mark.filterwarnings("ignore:.*psutil.*:DeprecationWarning")  # stock amqtt's $SYS plugin


def _connect(flags: int, payload: bytes, name: str = "MQTT") -> bytes:
    """A CONNECT with these connect flags (section 3.1.2.3) and this payload, as is."""
    return packet(0x10, utf8(name) + bytes([4, flags]) + (60).to_bytes(2, "big") + payload)


BEFORE_CONNACK = {
    "client-id-not-utf8 [MQTT-1.5.3-1]": connect_packet(b"dev-\xff\xfe"),
    "client-id-with-U+0000 [MQTT-1.5.3-2]": connect_packet("dev-\x00"),
    # clean session, will flag, will QoS 1: but no will topic or message follow
    "will-flag-without-will-topic [MQTT-3.1.2-9]": _connect(0x02 | 0x04 | 0x08, utf8("no-will")),
    "will-retain-without-will-flag [MQTT-3.1.2-15]": _connect(0x02 | 0x20, utf8("dev-r")),
    "will-qos-without-will-flag [MQTT-3.1.2-13]": _connect(0x02 | 0x10, utf8("dev-q")),
    "password-without-user-name [MQTT-3.1.2-22]": _connect(0x02 | 0x40, utf8("dev-p") + utf8("secret")),
    "bytes-after-the-last-field [section 3.1.3]": _connect(0x02, utf8("dev-x") + b"\x00"),
    "empty-will-topic [MQTT-3.1.2-9, MQTT-4.7.3-1]": connect_packet("dev-w", will=("", b"x", 0, False)),
    "will-topic-with-wildcard [MQTT-3.3.2-2]": connect_packet("dev-w", will=("w/#", b"x", 0, False)),
    "will-topic-not-utf8 [MQTT-1.5.3-1]": connect_packet("dev-w", will=(b"w/\xc3\x28", b"x", 0, False)),
    "first-packet-PINGREQ [MQTT-3.1.0-1]": PINGREQ,
    "first-packet-PUBLISH-body-never-sent [MQTT-3.1.0-1]": b"\x30\x80\x80\x01",  # remaining length 16384
}

AFTER_CONNACK = {
    "publish-topic-not-utf8 [MQTT-1.5.3-1]": publish_packet(b"t/\xed\xa0\x80", b"surrogate", qos=1),
    "publish-topic-with-U+0000 [MQTT-1.5.3-2]": publish_packet("t/\x00", b"x", qos=1),
    "publish-topic-with-plus [MQTT-3.3.2-2]": publish_packet("t/+/x", b"x", qos=1),
    "publish-topic-with-hash [MQTT-3.3.2-2]": publish_packet("t/#", b"x", qos=1),
    "publish-empty-topic [MQTT-4.7.3-1]": publish_packet("", b"x", qos=1),
    "publish-qos-3 [MQTT-3.3.1-4]": b"\x36" + publish_packet("t/q3", b"x", qos=1)[1:],
    "subscribe-without-filter [MQTT-3.8.3-3]": packet(0x82, (7).to_bytes(2, "big")),
    "unsubscribe-without-filter [MQTT-3.10.3-2]": packet(0xA2, (7).to_bytes(2, "big")),
    "subscribe-filter-not-utf8 [MQTT-1.5.3-1]": subscribe_packet(7, b"t/\xff", 1),
    "subscribe-requested-qos-3 [MQTT-3-8.3-4]": subscribe_packet(7, "t/x", 3),
    "subscribe-empty-filter [MQTT-4.7.3-1]": subscribe_packet(7, "", 1),
    "subscribe-flags-0000 [MQTT-3.8.1-1]": b"\x80" + subscribe_packet(7, "t/x", 1)[1:],
    "pubrel-flags-0000 [MQTT-3.6.1-1]": b"\x60\x02\x00\x01",
    "publish-qos0-with-dup [MQTT-3.3.1-2]": b"\x38" + publish_packet("t/d", b"x")[1:],
    "publish-packet-id-0 [MQTT-2.3.1-1]": b"\x32\x07" + utf8("t/a") + b"\x00\x00",
    "pingreq-with-a-body [MQTT-2.2.2-2]": b"\xc0\x01\x00",
    "connack-from-a-client [section 2.2.1]": b"\x20\x02\x00\x00",
    "remaining-length-of-5-bytes [section 2.2.3]": b"\x30\xff\xff\xff\xff\x01",
}

# Stock amqtt closes the connection on these too, so they run on the ChatBroker only:
# they guard the gate (broker/wire.py) against regressions.
ALSO_STOCK_BEFORE = {
    "connect-reserved-flag [MQTT-3.1.2-3]": _connect(0x03, utf8("dev-1")),
    "will-qos-3 [MQTT-3.1.2-14]": _connect(0x02 | 0x04 | 0x18, utf8("dev-3") + utf8("w/t") + utf8("x")),
    "protocol-name-MQTX [MQTT-3.1.2-1]": _connect(0x02, utf8("dev-n"), name="MQTX"),
}
ALSO_STOCK_AFTER = {
    "second-connect [MQTT-3.1.0-2]": connect_packet("again"),
    "reserved-packet-type-15 [section 2.2.1]": b"\xf0\x00",
}


@pytest.mark.parametrize("data", list(BEFORE_CONNACK.values()), ids=list(BEFORE_CONNACK))
def test_malformed_connect_is_closed_unanswered(target: Target, data: bytes) -> None:
    raw = target.raw()
    raw.send(data)
    assert raw.answer_before_close() == b"", "answered instead of closing"


@pytest.mark.parametrize("data", list(AFTER_CONNACK.values()), ids=list(AFTER_CONNACK))
def test_malformed_packet_closes_the_connection(target: Target, data: bytes) -> None:
    raw = target.client("malformed")
    raw.send(data)
    assert raw.answer_before_close() == b"", "answered instead of closing"


def test_protocol_error_publishes_the_will(target: Target) -> None:
    watcher = target.client("watcher")
    watcher.send(subscribe_packet(1, "will/malformed", 1))
    assert watcher.suback(1) == [1]
    raw = target.client("malformed", will=("will/malformed", b"closed for a protocol error", 1, False))
    raw.send(publish_packet("t/+", b"wildcard", qos=1))
    assert raw.answer_before_close() == b""
    will = watcher.receive(1)[0]
    assert (will.topic, will.payload) == ("will/malformed", b"closed for a protocol error")


@pytest.mark.parametrize(
    ("after_connect", "data"),
    [(False, d) for d in ALSO_STOCK_BEFORE.values()] + [(True, d) for d in ALSO_STOCK_AFTER.values()],
    ids=[*ALSO_STOCK_BEFORE, *ALSO_STOCK_AFTER],
)
def test_more_malformed_input_closes(chatbroker: Target, after_connect: bool, data: bytes) -> None:
    raw = chatbroker.client("malformed") if after_connect else chatbroker.raw()
    raw.send(data)
    assert raw.answer_before_close() == b"", "answered instead of closing"
