"""The sans-IO MQTT core (broker/mqtt/): one test per rule of docs/MQTT.md it holds, driven with explicit times."""

from __future__ import annotations

import math

import pytest

from broker.mqtt.connection import ServerConnection, State, keepalive_deadline
from broker.mqtt.encoding import encode
from broker.mqtt.errors import ConnectRefused, LocalProtocolError, ProtocolViolation
from broker.mqtt.events import (
    Closed,
    ConnAck,
    Connect,
    Disconnect,
    Event,
    NotHandled,
    PingReq,
    PubAck,
    Publish,
    PubRel,
    Subscribe,
    Unsubscribe,
    Will,
)
from broker.mqtt.limits import WireLimits

LIMITS = WireLimits(max_packet_bytes=4096, max_connect_bytes=512)
WILL = Will("will/t", b"gone", 1, False)


def events(conn: ServerConnection) -> list[Event]:
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def fresh(data: bytes = b"", limits: WireLimits = LIMITS, now: float = 0.0, **kw: int) -> ServerConnection:
    conn = ServerConnection(limits, now, **kw)  # type: ignore[arg-type]
    if data:
        conn.receive_data(data, now)
    return conn


def connected(connect: Connect | None = None, limits: WireLimits = LIMITS, **kw: int) -> ServerConnection:
    conn = fresh(encode(connect or Connect("alice.phone", keepalive=10, will=WILL)), limits, **kw)
    assert isinstance(conn.next_event(), Connect)
    conn.accept()
    assert conn.data_to_send() == b"\x20\x02\x00\x00"
    return conn


def violation(conn: ServerConnection, data: bytes) -> ProtocolViolation:
    conn.receive_data(data, 1.0)
    with pytest.raises(ProtocolViolation) as info:
        events(conn)
    assert conn.state is State.CLOSED
    return info.value


# CONNECT first and only once (section 3.1).

def test_first_packet_not_connect_is_refused_on_its_first_byte() -> None:
    assert violation(fresh(), b"\xc0").rule == "MQTT-3.1.0-1"  # PINGREQ's first byte, nothing after


def test_a_second_connect_closes() -> None:
    assert violation(connected(), encode(Connect("again"))).rule == "MQTT-3.1.0-2"


def test_packets_after_connect_wait_for_the_shells_answer() -> None:
    conn = fresh(encode(Connect("alice.phone")) + encode(Publish("t/a", b"x")) + b"\xc0\x00")
    assert isinstance(conn.next_event(), Connect)
    assert conn.state is State.CONNECTING
    assert conn.next_event() is None  # logging in: nothing more is parsed
    conn.accept()
    assert events(conn) == [Publish("t/a", b"x")]
    assert conn.data_to_send() == b"\x20\x02\x00\x00\xd0\x00"  # CONNACK, then the PINGRESP


def test_refuse_answers_connack_and_closes() -> None:
    conn = fresh(encode(Connect("alice.phone")) + b"\xc0\x00")
    conn.next_event()
    conn.refuse(0x05)
    assert conn.data_to_send() == b"\x20\x02\x00\x05"  # session present 0 [MQTT-3.2.2-4]
    assert conn.state is State.CLOSED
    assert conn.next_event() is None
    with pytest.raises(LocalProtocolError):
        fresh().refuse(0x05)  # no CONNECT to refuse


def test_the_end_of_the_stream_while_logging_in() -> None:
    conn = fresh(encode(Connect("alice.phone", will=WILL)))
    conn.next_event()
    conn.receive_data(b"", 1.0)
    assert conn.next_event() == Closed("the client closed the connection", "MQTT-3.1.2-8", None)  # no will yet
    conn.accept()  # the login finished after the client went: nothing happens
    assert (conn.state, conn.data_to_send()) == (State.CLOSED, b"")


def test_session_present_only_without_clean_session() -> None:
    for clean, expected in ((True, 0), (False, 1)):
        conn = fresh(encode(Connect("alice.phone", clean_session=clean)))
        conn.next_event()
        conn.accept(session_present=True)
        assert conn.data_to_send() == bytes((0x20, 2, expected, 0))  # [MQTT-3.2.2-1, -2]


# Protocol name and level (section 3.1.2.1, 3.1.2.2).

def _connect_with(name: bytes, level: int, flags: int = 0x02, client_id: bytes = b"dev") -> bytes:
    body = len(name).to_bytes(2, "big") + name + bytes((level, flags)) + b"\x00\x3c"
    body += len(client_id).to_bytes(2, "big") + client_id
    return bytes((0x10, len(body))) + body


@pytest.mark.parametrize(("name", "level"), [(b"MQTT", 3), (b"MQTT", 5), (b"MQIsdp", 3)])
def test_unsupported_protocol_level_gets_connack_1(name: bytes, level: int) -> None:
    conn = fresh()
    exc = violation(conn, _connect_with(name, level))
    assert isinstance(exc, ConnectRefused)
    assert (exc.code, exc.rule) == (1, "MQTT-3.1.2-2")
    assert conn.data_to_send() == b"\x20\x02\x00\x01"


def test_other_protocol_name_closes_unanswered() -> None:
    conn = fresh()
    assert violation(conn, _connect_with(b"MQTX", 4)).rule == "MQTT-3.1.2-1"
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(("flags", "rule"), [
    (0x03, "MQTT-3.1.2-3"), (0x02 | 0x10, "MQTT-3.1.2-13"), (0x02 | 0x20, "MQTT-3.1.2-15"),
    (0x02 | 0x04 | 0x18, "MQTT-3.1.2-14"), (0x02 | 0x40, "MQTT-3.1.2-22"),
])
def test_connect_flags(flags: int, rule: str) -> None:
    assert violation(fresh(), _connect_with(b"MQTT", 4, flags)).rule == rule


# Client id (section 3.1.3.1).

def test_empty_client_id_needs_clean_session() -> None:
    conn = fresh()
    exc = violation(conn, _connect_with(b"MQTT", 4, 0x00, b""))
    assert isinstance(exc, ConnectRefused)
    assert (exc.code, exc.rule) == (2, "MQTT-3.1.3-8")
    assert conn.data_to_send() == b"\x20\x02\x00\x02"
    conn = fresh(_connect_with(b"MQTT", 4, 0x02, b""))
    assert conn.next_event() == Connect("", True, 60)  # the shell assigns one [MQTT-3.1.3-6]


@pytest.mark.parametrize(("client_id", "rule"), [(b"dev-\xff", "MQTT-1.5.3-1"), (b"dev-\x00", "MQTT-1.5.3-2"),
                                                 (b"\xed\xa0\x80", "MQTT-1.5.3-1")])
def test_client_id_must_be_utf8_without_nul(client_id: bytes, rule: str) -> None:
    assert violation(fresh(), _connect_with(b"MQTT", 4, 0x02, client_id)).rule == rule


# Keepalive (section 3.1.2.10).

@pytest.mark.parametrize(("keepalive", "low", "high"), [(5, 10, 600), (601, 10, 600), (0, 0, 600)])
def test_keepalive_outside_the_bounds_is_refused(keepalive: int, low: int, high: int) -> None:
    conn = fresh(limits=WireLimits(4096, keepalive_min_s=low, keepalive_max_s=high))
    exc = violation(conn, encode(Connect("dev", keepalive=keepalive)))
    assert isinstance(exc, ConnectRefused)
    assert exc.code == 2
    assert conn.data_to_send() == b"\x20\x02\x00\x02"


def test_keepalive_deadline_is_one_and_a_half_times_rounded_up() -> None:
    assert [keepalive_deadline(k) for k in (0, 1, 2, 10, 65535)] == [0, 2, 3, 15, 98303]


def test_silence_past_the_keepalive_closes_with_the_will() -> None:
    conn = connected()  # keepalive 10: 15 s
    assert conn.deadline() == 15.0
    conn.receive_data(b"\xc0\x00", 12.0)
    assert events(conn) == []
    assert conn.deadline() == 27.0  # a packet restarts it
    assert conn.check_time(26.9) is None
    closed = conn.check_time(27.0)
    assert closed == Closed("silent for 1.5 x keepalive", "MQTT-3.1.2-24", WILL)
    assert conn.deadline() == math.inf


def test_keepalive_zero_never_times_out() -> None:
    conn = connected(Connect("dev", keepalive=0))
    assert conn.deadline() == math.inf
    assert conn.check_time(1e9) is None


def test_connect_not_done_in_time_closes() -> None:
    conn = fresh(b"\x10", connect_timeout_s=10)  # type: ignore[arg-type]
    assert conn.next_event() is None
    assert conn.deadline() == 10.0
    assert conn.check_time(10.0) == Closed("CONNECT not completed within limits.connect_timeout_s",
                                           "section 3.1.2.10", None)


def test_a_packet_left_incomplete_closes_after_the_packet_deadline() -> None:
    conn = connected(Connect("dev", keepalive=0))
    conn.receive_data(encode(Publish("t/a", b"x" * 50))[:10], 5.0)
    assert events(conn) == []
    assert conn.deadline() == 35.0  # packet_deadline_s 30
    closed = conn.check_time(35.0)
    assert closed is not None
    assert closed.rule == "mqtt.packet_deadline_s"


# Packet ids and QoS 1, client to server (section 4.3.2, 4.6).

def test_incoming_qos1_is_acknowledged_in_order() -> None:
    conn = connected()
    conn.receive_data(encode(Publish("t/a", b"1", 1, packet_id=5)) + encode(Publish("t/a", b"2", 1, packet_id=6)), 1)
    assert [e.packet_id for e in events(conn)] == [5, 6]  # type: ignore[union-attr]
    with pytest.raises(LocalProtocolError):
        conn.puback(6)  # [MQTT-4.6.0-2]: 5 first
    conn.puback(5)
    conn.puback(6)
    assert conn.data_to_send() == b"\x40\x02\x00\x05\x40\x02\x00\x06"
    with pytest.raises(LocalProtocolError):
        conn.puback(7)  # no such PUBLISH


def test_a_resent_unacknowledged_publish_is_delivered_and_acknowledged_again() -> None:
    conn = connected()
    first, again = Publish("t/a", b"1", 1, packet_id=5), Publish("t/a", b"1", 1, dup=True, packet_id=5)
    conn.receive_data(encode(first) + encode(again), 1)
    assert events(conn) == [first, again]  # QoS 1 is at least once (section 4.3.2)
    conn.puback(5)
    conn.puback(5)
    assert conn.data_to_send() == b"\x40\x02\x00\x05" * 2
    with pytest.raises(LocalProtocolError):
        conn.puback(5)


# QoS 1, server to client: ids, PUBACK matching, DUP on re-send, the unacked cap.

def test_outgoing_ids_skip_those_in_flight_and_wrap() -> None:
    conn = connected()
    assert [conn.publish("t/a", b"x", 1) for _ in range(3)] == [1, 2, 3]
    conn.receive_data(encode(PubAck(2)), 1)
    assert events(conn) == [PubAck(2)]
    conn._next_id = 65534  # as after 65,534 messages
    assert [conn.publish("t/a", b"x", 1) for _ in range(3)] == [65535, 2, 4]  # 1 and 3 still in flight
    assert conn.publish("t/a", b"x", 0) == 0
    assert conn.data_to_send().endswith(b"\x30\x06\x00\x03t/ax")


def test_a_puback_for_no_message_of_ours_is_ignored() -> None:
    conn = connected()
    conn.receive_data(encode(PubAck(9)) + encode(Publish("t/a", b"x")), 1)
    assert events(conn) == [Publish("t/a", b"x")]


def test_the_unacked_cap() -> None:
    conn = connected(max_unacked=2)
    assert conn.publish("t/a", b"x", 1) == 1
    assert conn.publish(b"t/a", b"x", 1) == 2
    assert conn.over_unacked
    assert conn.publish("t/a", b"x", 1) is None  # not sent
    assert conn.publish("t/a", b"x", 0) == 0  # QoS 0 holds no id
    conn.receive_data(encode(PubAck(1)), 1)
    events(conn)
    assert (conn.unacked, conn.over_unacked) == (1, False)
    assert conn.publish("t/a", b"x", 1) == 3


def test_republish_sets_dup_and_keeps_the_id() -> None:
    conn = connected()
    conn.republish(77, "t/a", b"x")  # [MQTT-3.3.1-1], [MQTT-4.4.0-1]
    assert conn.data_to_send() == encode(Publish("t/a", b"x", 1, dup=True, packet_id=77))
    assert conn.unacked == 1
    conn.receive_data(encode(PubAck(77)), 1)
    assert events(conn) == [PubAck(77)]


# QoS 2 is not handled here.

def test_qos2_is_reported_not_handled() -> None:
    conn = connected()
    publish = Publish("t/a", b"x", 2, packet_id=3)
    conn.receive_data(encode(publish) + encode(PubRel(3)), 1)
    assert events(conn) == [NotHandled(publish), NotHandled(PubRel(3))]
    with pytest.raises(LocalProtocolError):
        conn.publish("t/a", b"x", 2)


# SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT.

def test_subscribe_and_its_suback() -> None:
    conn = connected()
    conn.receive_data(encode(Subscribe(4, (("a/#", 1), ("b", 0), ("c", 2)))), 1)
    assert events(conn) == [Subscribe(4, (("a/#", 1), ("b", 0), ("c", 2)))]
    with pytest.raises(LocalProtocolError):
        conn.suback(4, (1, 0))  # one code per filter [MQTT-3.8.4-5]
    with pytest.raises(LocalProtocolError):
        conn.suback(4, (1, 1, 1))  # more than requested for "b"
    with pytest.raises(LocalProtocolError):
        conn.suback(5, (0,))  # no such SUBSCRIBE
    conn.suback(4, (1, 0x80, 1))
    assert conn.data_to_send() == b"\x90\x05\x00\x04\x01\x80\x01"


def test_unsubscribe_and_its_unsuback() -> None:
    conn = connected()
    conn.receive_data(encode(Unsubscribe(8, ("a/#",))), 1)
    assert events(conn) == [Unsubscribe(8, ("a/#",))]
    conn.unsuback(8)
    assert conn.data_to_send() == b"\xb0\x02\x00\x08"
    with pytest.raises(LocalProtocolError):
        conn.unsuback(8)


def test_pingreq_is_answered() -> None:
    conn = connected()
    conn.receive_data(encode(PingReq()), 1)
    assert events(conn) == []
    assert conn.data_to_send() == b"\xd0\x00"  # [MQTT-3.12.4-1]


def test_disconnect_drops_the_will_and_ends() -> None:
    conn = connected()
    conn.receive_data(encode(Disconnect()) + encode(Publish("t/a", b"after")), 1)
    assert events(conn) == [Disconnect()]
    assert (conn.state, conn.will) == (State.CLOSED, None)  # [MQTT-3.1.2-10]
    assert conn.publish("t/a", b"x", 1) is None  # commands after the end are dropped


def test_end_of_stream_publishes_the_will() -> None:
    conn = connected()
    conn.receive_data(b"\x30\x05\x00", 1)
    conn.receive_data(b"", 2)
    assert events(conn) == [Closed("the client closed the connection in the middle of a packet", "MQTT-3.1.2-8",
                                   WILL)]


def test_a_violation_after_connack_leaves_the_will_to_publish() -> None:
    conn = connected()
    violation(conn, encode(Publish("t/a", b"x"))[:1] + b"\x03\x00\x01+")
    assert conn.will == WILL  # section 3.1.2.5: closed for a protocol error


def test_server_close() -> None:
    conn = connected()
    assert conn.close("taken over", "MQTT-3.1.4-2") == Closed("taken over", "MQTT-3.1.4-2", WILL)
    assert conn.close("again") is None


def test_commands_before_connack_are_a_bug() -> None:
    with pytest.raises(LocalProtocolError):
        fresh().publish("t/a", b"x")
    with pytest.raises(LocalProtocolError):
        fresh().accept()


# Size limits and framing (section 2.2.3).

def test_a_connect_over_max_connect_bytes_is_refused_on_its_fixed_header() -> None:
    exc = violation(fresh(), b"\x10\x80\x04")  # 512 + 3 bytes announced, none sent
    assert exc.rule == "section 2.2.3, mqtt.max_connect_bytes"


def test_a_packet_over_max_packet_bytes_is_refused_on_its_fixed_header() -> None:
    assert violation(connected(), b"\x30\x80\x20").rule == "section 2.2.3, mqtt.max_packet_bytes"
    conn = connected()
    conn.receive_data(b"\x30\xfa\x1f", 1)  # 4,093 bytes: exactly the limit, fine
    assert events(conn) == []


def test_remaining_length_of_five_bytes() -> None:
    assert violation(connected(), b"\x30\xff\xff\xff\xff").rule == "section 2.2.3"


@pytest.mark.parametrize(("data", "rule"), [
    (b"\x80\x03\x00\x01\x00", "MQTT-3.8.1-1"), (b"\xa0\x03\x00\x01\x00", "MQTT-3.10.1-1"),
    (b"\x60\x02\x00\x01", "MQTT-3.6.1-1"), (b"\xc1\x00", "MQTT-2.2.2-2"), (b"\x41\x02\x00\x01", "MQTT-2.2.2-2"),
    (b"\xf0\x00", "section 2.2.1, 4.8"), (b"\x00\x00", "section 2.2.1, 4.8"),
    (b"\x20\x02\x00\x00", "section 2.2.1, 4.8"),
])
def test_reserved_and_wrong_fixed_header_flags(data: bytes, rule: str) -> None:
    conn = connected()
    conn.receive_data(data[:1], 1)  # refused on the first byte
    with pytest.raises(ProtocolViolation) as info:
        conn.next_event()
    assert info.value.rule == rule


def test_a_connack_encodes_what_the_connection_sends() -> None:
    assert encode(ConnAck(0, True)) == b"\x20\x02\x01\x00"
