"""Chat sessions on the lean path (``mqtt.lean_sessions``: broker/lean.py, broker/chat_session.py), raw packets.

The other files of tests/mqtt/ run on a lean broker too (``chatbroker-conforms``, the default), but under
config/open-mqtt.yaml, whose generic ACL keeps every client on amqtt's path (reached by the
hand-off). Here the ``mqtt`` section opens no generic topic, so a chat device's CONNECT stays
on the sans-IO core, and the rules of docs/MQTT.md are checked on it: malformed input closes,
keepalive with the will, takeover (also of a connection on amqtt's path),
session present, QoS 2 closes, the inbox QoS, PINGREQ; and a client that is not a chat
device is served by amqtt on the same listener. Each runs over tcp and over WebSocket (ws).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from testkit.packets import PINGREQ, connect_packet, publish_packet, subscribe_packet, unsubscribe_packet
from tests.helpers import WAIT_S, BrokerThread, Peer, eventually
from tests.mqtt.conftest import USERS, Target
from tests.mqtt.test_malformed import AFTER_CONNACK, ALSO_STOCK_AFTER


@pytest.fixture(params=["asyncio", "uvloop"])
def lean_broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BrokerThread]:
    """A lean broker on asyncio's loop and on uvloop's (``chat-broker run``'s: its transports differ)."""
    loop = uvloop.new_event_loop() if request.param == "uvloop" else None
    chat = BrokerThread(tmp_path / "data", {"mqtt": {"lean_sessions": True, "allow_anonymous": True},
                                            "listeners.ws.bind": "127.0.0.1:0"}, loop).start()
    for name, password in USERS.items():
        chat.add_user(name, password)
    yield chat
    chat.stop()


@pytest.fixture(params=["tcp", "ws"])
def lean(lean_broker: BrokerThread, request: pytest.FixtureRequest) -> Iterator[Target]:
    """Raw connections to the lean broker over tcp, and over WebSocket (broker/lean_ws.py)."""
    websocket = request.param == "ws"
    target = Target("chatbroker", lean_broker.address("ws")[1] if websocket else lean_broker.port, websocket)
    yield target
    target.close()


def _on_lean_path(broker: BrokerThread, client_id: str) -> bool:
    async def live() -> bool:
        hub = broker.app.broker.lean
        return hub is not None and client_id in hub._live

    return broker.call(live())


def _linked(broker: BrokerThread, client_id: str) -> bool:
    async def link() -> bool:
        return broker.app.broker.bridge.links.get(client_id) is not None

    return broker.call(link())


def test_a_chat_device_is_served_by_the_core(lean_broker: BrokerThread, lean: Target) -> None:
    raw = lean.client("alice.phone", "alice")
    assert _on_lean_path(lean_broker, "alice.phone")
    raw.send(PINGREQ)
    assert raw.read_exact(2) == b"\xd0\x00"  # [MQTT-3.12.4-1]
    raw.send(subscribe_packet(1, "u/alice/in", 1, ("u/bob/in", 1), ("#", 0)))
    assert raw.suback(1) == [1, 0x80, 0x80]
    raw.send_publish("u/alice/req", json.dumps({"rid": "r1", "op": "ping"}).encode(), qos=1)
    got = raw.receive(1)[0]  # the PUBACK of our publish is read past by receive
    assert (got.topic, json.loads(got.payload)["rid"], got.qos) == ("u/alice/in", "r1", 1)


@pytest.mark.parametrize(("granted", "delivered"), [(0, 0), (1, 1), (2, 1)])
def test_chat_downlink_respects_the_inbox_qos(lean: Target, granted: int, delivered: int) -> None:
    raw = lean.client("alice.phone", "alice")
    raw.send(subscribe_packet(1, "u/alice/in", granted))
    assert raw.suback(1) == [min(granted, 1)]  # QoS 2 is amqtt's: at most 1 here [MQTT-3.8.4-6 allows less]
    raw.send_publish("u/alice/req", json.dumps({"rid": "r1", "op": "ping"}).encode(), qos=1)
    got = raw.receive(1)[0]
    assert (got.topic, json.loads(got.payload)["rid"], got.qos) == ("u/alice/in", "r1", delivered)


@pytest.mark.parametrize("data", [*AFTER_CONNACK.values(), *ALSO_STOCK_AFTER.values()],
                         ids=[*AFTER_CONNACK, *ALSO_STOCK_AFTER])
def test_malformed_packet_closes_a_chat_session(lean_broker: BrokerThread, lean: Target, data: bytes) -> None:
    raw = lean.client("alice.phone", "alice")
    raw.send(data)
    assert raw.answer_before_close() == b"", "answered instead of closing"
    eventually(lambda: not _on_lean_path(lean_broker, "alice.phone"), what="session gone")


def test_qos2_publish_closes_a_chat_session(lean: Target) -> None:
    raw = lean.client("alice.phone", "alice")
    raw.send(publish_packet("u/alice/out", b"{}", qos=2))
    assert raw.answer_before_close() == b""


def test_silent_chat_session_is_dropped_and_its_will_goes_to_the_bridge(lean_broker: BrokerThread,
                                                                        lean: Target) -> None:
    raw = lean.client("alice.raw", "alice", keepalive=1, will=("u/alice/hb", b'{"state":"away"}', 1, False))
    raw.send(subscribe_packet(1, "u/alice/in"))
    silent_since = time.monotonic()
    assert raw.suback(1) == [1]
    assert _linked(lean_broker, "alice.raw")
    assert not raw.closed_within(1.0), "closed before 1.5 x keepalive"  # [MQTT-3.1.2-24]
    assert raw.closed_within(5.0 - (time.monotonic() - silent_since)), "still open 5 s after its last packet"
    eventually(lambda: not _linked(lean_broker, "alice.raw"), what="link gone")
    heartbeats = lean_broker.app.broker.counters.uplink.get("hb", 0)
    assert heartbeats == 1, "the will went to the bridge as a heartbeat [MQTT-3.1.2-8]"


@pytest.mark.parametrize("clean", [True, False], ids=["clean_session=1", "clean_session=0"])
def test_second_login_takes_over_and_session_present(lean: Target, clean: bool) -> None:
    old, present = lean.connect("alice.phone", "alice", clean=clean)
    assert present is False
    old.send(subscribe_packet(1, "u/alice/in"))
    assert old.suback(1) == [1]
    new, present = lean.connect("alice.phone", "alice", clean=clean)
    assert old.closed_within(WAIT_S), "the old connection is closed [MQTT-3.1.4-2]"
    assert present is (not clean), "[MQTT-3.2.2-1, -2]"
    if not clean:  # the resumed session keeps its inbox subscription [MQTT-3.1.2-4]
        new.send_publish("u/alice/req", json.dumps({"rid": "r2", "op": "ping"}).encode(), qos=1)
        assert json.loads(new.receive(1)[0].payload)["rid"] == "r2"


def test_takeover_across_the_two_paths(lean_broker: BrokerThread, lean: Target) -> None:
    """A device on amqtt's path (a QoS 2 will keeps it there, over WebSocket) and the same device on the lean
    path take each other over."""
    ws_port = lean_broker.address("ws")[1]
    web = Peer(ws_port, "alice", "alice-pw", transport="websockets")
    web.client._reconnect_on_failure = False  # paho has no setter
    web.client.will_set("u/alice/req", b"{}", qos=2)
    try:
        assert web.connect() == 0 and web.subscribe() == [1]
        assert not _on_lean_path(lean_broker, "alice.phone")
        raw = lean.client("alice.phone", "alice")
        assert web.disconnected.wait(WAIT_S), "the amqtt connection is closed by the lean login"
        assert _on_lean_path(lean_broker, "alice.phone")
        again = Peer(ws_port, "alice", "alice-pw", transport="websockets")
        again.client.will_set("u/alice/req", b"{}", qos=2)
        try:
            assert again.connect() == 0
            assert raw.closed_within(WAIT_S), "the lean connection is closed by the amqtt login"
            assert again.subscribe() == [1] and again.request("ping")["ok"] is True
        finally:
            again.close()
    finally:
        web.close()


def test_other_clients_are_handed_to_amqtt(lean_broker: BrokerThread, lean: Target) -> None:
    """Not a chat device (anonymous, generic topics): amqtt serves it, on the same listener, from its first byte."""
    sub = lean.client("anon-sub")
    sub.send(subscribe_packet(1, "news/x", 1))
    assert sub.suback(1) == [0x80]  # no anonymous_acl: nothing open (amqtt's ACL, not the core's)
    chat = lean.client("alice.phone", "alice")
    chat.send(PINGREQ)
    assert chat.read_exact(2) == b"\xd0\x00"
    counts: Any = lean_broker.call(_open(lean_broker))
    assert counts == {"tcp": 0, "ws": 0} | {("ws" if lean.websocket else "tcp"): 2}


async def _open(broker: BrokerThread) -> dict[str, int]:
    return broker.app.broker.open_connections()


def test_anonymous_chat_client_id_is_refused(lean: Target) -> None:
    """The hand-off keeps amqtt's rules: an anonymous client may not use a chat device's id (0x02)."""
    raw = lean.raw()
    raw.send(connect_packet("alice.phone"))
    assert raw.connack() == 0x02


def test_unsubscribed_inbox_is_not_resumed(lean_broker: BrokerThread, lean: Target) -> None:
    old, _ = lean.connect("alice.phone", "alice", clean=False)
    old.send(subscribe_packet(1, "u/alice/in"))
    assert old.suback(1) == [1]
    old.send(unsubscribe_packet(2, "u/alice/in"))
    assert old.expect(11).packet_id == 2  # UNSUBACK
    assert not _linked(lean_broker, "alice.phone")
    old.close()
    _, present = lean.connect("alice.phone", "alice", clean=False)
    assert present is True  # the session, without its subscription [MQTT-3.2.2-2]
    assert not _linked(lean_broker, "alice.phone")
