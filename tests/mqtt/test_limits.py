"""Limits, enforced before the work they bound (docs/MQTT.md "Limits"):

- ``mqtt.max_packet_bytes``: a packet whose fixed header (section 2.2.3, remaining
  length) announces more is refused on that header, its body never read, and the
  connection closed; a packet of exactly the limit is served. Stock amqtt has no limit
  and waits for the whole announced body (up to 256 MiB, the protocol's maximum).
- ``mqtt.keepalive_min_s`` / ``keepalive_max_s``: MQTT 3.1.1 gives a server no way to
  impose another keepalive (section 3.1.2.10; MQTT 5 added one), so a CONNECT outside the
  bounds is refused with CONNACK 0x02 and closed [MQTT-3.2.2-5], as mosquitto's
  max_keepalive does for 3.1.1 clients; keepalive 0 (no timeout) counts as above any
  maximum below 65535. Stock amqtt accepts any keepalive.
- the smallest ``max_packet_bytes`` the config accepts still carries the largest valid
  chat message (ChatBroker only: stock amqtt has no chat).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from chatserver.config import ConfigError, LimitsSettings, build_settings, chat_packet_bytes
from testkit.packets import PUBACK, connect_packet, remaining_length, subscribe_packet, utf8
from tests.helpers import BrokerThread, Peer
from tests.mqtt.conftest import Target, open_mqtt_section

pytestmark = pytest.mark.filterwarnings("ignore:.*psutil.*:DeprecationWarning")  # stock amqtt's $SYS plugin

LIMIT = 400_000  # a little over what a chat message needs with the default limits (394,304)


def publish_header(total: int, topic: str = "big/t") -> tuple[bytes, int]:
    """The start of a QoS 1 PUBLISH (packet id 1) whose whole size is ``total``; returns it and the payload size."""
    variable = utf8(topic) + (1).to_bytes(2, "big")
    remaining = total - 4  # 1 type byte + 3 remaining-length bytes at this size
    header = b"\x32" + remaining_length(remaining)
    assert len(header) == 4
    return header + variable, remaining - len(variable)


def test_packet_over_the_limit_is_refused_on_its_header(launch: Callable[..., Target]) -> None:
    target = launch(mqtt={**open_mqtt_section(), "max_packet_bytes": LIMIT})
    sub = target.client("big-sub")
    sub.send(subscribe_packet(1, "big/t", 1))
    assert sub.suback(1) == [1]

    at_limit = target.client("big-ok")
    header, size = publish_header(LIMIT)
    at_limit.send(header + b"x" * size)
    assert at_limit.expect(PUBACK).packet_id == 1
    got = sub.receive(1)[0]
    assert (got.topic, len(got.payload)) == ("big/t", size)

    over = target.client("big-over")
    header, _ = publish_header(LIMIT + 1)
    over.send(header + b"only the start of the body")
    assert over.answer_before_close() == b"", "a packet over mqtt.max_packet_bytes was not refused on its header"

    first = target.raw()  # the same limit holds for the CONNECT itself
    big_connect = connect_packet("c" * 100)
    first.send(b"\x10" + remaining_length(LIMIT) + big_connect[2:40])
    assert first.answer_before_close() == b""


def test_keepalive_bounds(launch: Callable[..., Target]) -> None:
    target = launch(mqtt={**open_mqtt_section(), "keepalive_min_s": 5, "keepalive_max_s": 300})
    for keepalive, code in [(5, 0x00), (300, 0x00), (4, 0x02), (301, 0x02), (0, 0x02)]:
        raw = target.raw()
        raw.send(connect_packet(f"ka-{keepalive}", keepalive=keepalive))
        assert raw.connack_full() == (False, code), f"keepalive {keepalive}"
        if code:
            assert raw.closed(), "refused CONNECT left open [MQTT-3.2.2-5]"
        else:
            raw.ping()


def test_config_refuses_a_limit_below_a_chat_message() -> None:
    need = chat_packet_bytes(LimitsSettings())
    with pytest.raises(ConfigError, match=r"mqtt\.max_packet_bytes \(394303\) must be at least 394304"):
        build_settings({"mqtt": {"max_packet_bytes": need - 1}})
    with pytest.raises(ConfigError, match=r"mqtt: .*keepalive_min_s must not exceed keepalive_max_s"):
        build_settings({"mqtt": {"keepalive_min_s": 60, "keepalive_max_s": 30}})


def test_smallest_limit_carries_the_largest_chat_message(tmp_path: Path) -> None:
    need = chat_packet_bytes(LimitsSettings())
    broker = BrokerThread(tmp_path / "data", {"mqtt.max_packet_bytes": need}).start()
    peers: list[Peer] = []
    try:
        for name in ("alice", "bob"):
            broker.add_user(name, f"{name}-pw")
            peer = Peer(broker.port, name, f"{name}-pw")
            peers.append(peer)
            assert peer.connect() == 0
            assert peer.subscribe() == [1]
        alice, bob = peers
        body = "\x01" * LimitsSettings().max_body_bytes  # each character JSON-escaped as \u0001: 6 bytes
        payload = json.dumps({"id": "m" * 64, "to": "bob", "body": body, "type": "text", "ts": 2**53})
        assert len(payload) > 6 * len(body)
        alice.publish("u/alice/out", payload)
        sent = alice.expect(lambda i: i.get("kind") == "receipt" and i.get("status") == "sent")
        assert sent["ids"] == ["m" * 64]
        assert bob.expect(lambda i: i.get("kind") == "msg")["body"] == body
    finally:
        for peer in peers:
            peer.close()
        broker.stop()
