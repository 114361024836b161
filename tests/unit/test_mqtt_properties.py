"""Properties of the sans-IO MQTT core (broker/mqtt/), with Hypothesis, and the wire gate's hostile inputs.

- any byte split of a valid stream gives the same events (and the same error, if any);
- ``decode(encode(p)) == p`` and the bytes round-trip, for every packet type;
- random bytes, alone or after a valid CONNECT, raise nothing but ``ProtocolViolation`` and end;
- the malformed packets of the conformance tests (tests/mqtt/test_malformed.py) and the raw
  packets of the chaos harness's strangers (bench/chaos/hostile.py) are refused by the core
  as by the wire gate.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.chaos.hostile import raw_connect
from bench.common import connect_packet
from broker.mqtt.codec import FROM_CLIENT, FROM_SERVER, Decoder, decode
from broker.mqtt.connection import ServerConnection, State
from broker.mqtt.encoding import encode
from broker.mqtt.errors import ProtocolViolation
from broker.mqtt.events import (
    ConnAck,
    Connect,
    Disconnect,
    Event,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
)
from broker.mqtt.limits import WireLimits
from tests.mqtt.test_malformed import AFTER_CONNACK, ALSO_STOCK_AFTER, ALSO_STOCK_BEFORE, BEFORE_CONNACK

LIMITS = WireLimits(max_packet_bytes=1 << 20)

# Well-formed UTF-8 without U+0000 [MQTT-1.5.3-1, -2]: no surrogates, no NUL.
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20)
TOPIC = TEXT.filter(lambda t: t and "+" not in t and "#" not in t)
FILTER = TEXT.filter(bool)
IDS = st.integers(1, 65535)
QOS = st.integers(0, 2)
DATA = st.binary(max_size=300)


@st.composite
def publishes(draw: st.DrawFn, qos: st.SearchStrategy[int] = QOS) -> Publish:
    level = draw(qos)
    return Publish(draw(TOPIC), draw(DATA), level, draw(st.booleans()), draw(st.booleans()) if level else False,
                   draw(IDS) if level else None)


CONNECTS = st.builds(
    Connect, TEXT.filter(bool), st.booleans(), st.integers(0, 65535), st.none() | TEXT,
    st.none(), st.none() | st.builds(Will, TOPIC, DATA, QOS, st.booleans()),
).flatmap(lambda c: st.builds(lambda pw: _with_password(c, pw), st.none() | DATA))


def _with_password(connect: Connect, password: bytes | None) -> Connect:
    if connect.username is not None:  # a password needs a user name [MQTT-3.1.2-22]
        connect.password = password
    return connect


FROM_CLIENT_PACKETS: st.SearchStrategy[Packet] = st.one_of(
    publishes(), st.builds(PubAck, IDS), st.builds(PubRec, IDS), st.builds(PubRel, IDS), st.builds(PubComp, IDS),
    st.builds(Subscribe, IDS, st.lists(st.tuples(FILTER, QOS), min_size=1, max_size=4).map(tuple)),
    st.builds(Unsubscribe, IDS, st.lists(FILTER, min_size=1, max_size=4).map(tuple)),
    st.just(PingReq()), st.just(Disconnect()),
)
FROM_SERVER_PACKETS: st.SearchStrategy[Packet] = st.one_of(
    st.builds(ConnAck, st.integers(0, 5), st.booleans()), publishes(), st.builds(PubAck, IDS),
    st.builds(SubAck, IDS, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=4).map(tuple)),
    st.builds(UnsubAck, IDS), st.just(PingResp()),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def run(chunks: list[bytes], accept: bool = True) -> tuple[list[Event], str | None]:
    """Events of a ServerConnection fed these chunks (the CONNECT accepted), and the violation's rule if any."""
    conn = ServerConnection(LIMITS, 0.0)
    out: list[Event] = []
    budget = sum(len(c) for c in chunks) + 2  # every event consumes bytes: a loop would exhaust this
    try:
        for index, chunk in enumerate(chunks):
            conn.receive_data(chunk, float(index))
            while (event := conn.next_event()) is not None:
                out.append(event)
                budget -= 1
                assert budget > 0, "next_event does not end"
                if isinstance(event, Connect) and accept:
                    conn.accept()
                if isinstance(event, Publish) and event.qos == 1:
                    conn.puback(event.packet_id or 0)
        conn.receive_data(b"", float(len(chunks)))
        out.extend(e for e in [conn.next_event()] if e is not None)
    except ProtocolViolation as exc:
        assert conn.state is State.CLOSED
        return out, exc.rule
    return out, None


@settings(max_examples=300, deadline=None)
@given(CONNECTS, st.lists(FROM_CLIENT_PACKETS, max_size=12), st.lists(st.integers(0, 10_000), max_size=30))
def test_any_byte_split_gives_the_same_events(connect: Connect, packets: list[Packet], cuts: list[int]) -> None:
    stream = b"".join(encode(p) for p in [connect, *packets])
    whole = run([stream])
    assert run(split(stream, cuts)) == whole
    assert run([stream[i:i + 1] for i in range(len(stream))]) == whole


@settings(max_examples=300, deadline=None)
@given(st.lists(FROM_CLIENT_PACKETS, min_size=1, max_size=12), st.lists(st.integers(0, 10_000), max_size=30))
def test_decoder_gives_back_the_packets_whatever_the_split(packets: list[Packet], cuts: list[int]) -> None:
    stream = b"".join(encode(p) for p in packets)
    decoder = Decoder(FROM_CLIENT, 1 << 20)
    out = []
    for chunk in split(stream, cuts):
        decoder.feed(chunk)
        while (packet := decoder.next_packet()) is not None:
            out.append(packet)
    assert out == packets
    assert decoder.buffered == 0


@settings(max_examples=500, deadline=None)
@given(CONNECTS | FROM_CLIENT_PACKETS | FROM_SERVER_PACKETS)
def test_encode_decode_round_trip(packet: Packet) -> None:
    data = encode(packet)
    kinds = None if isinstance(packet, Connect) else FROM_CLIENT if data[0] >> 4 in FROM_CLIENT else FROM_SERVER
    decoder = Decoder(kinds, 1 << 20)
    decoder.feed(data)
    decoded = decoder.next_packet()
    assert decoded == packet
    assert encode(decoded) == data
    header = 2 if len(data) < 130 else 3 if len(data) < 16_387 else 4
    assert decode(data[0], data, header, len(data)) == packet


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 400), max_size=10))
def test_random_bytes_raise_only_protocol_violations(data: bytes, cuts: list[int]) -> None:
    run(split(data, cuts))


@settings(max_examples=500, deadline=None)
@given(CONNECTS, st.binary(max_size=200), st.lists(st.integers(0, 400), max_size=10))
def test_random_bytes_after_connect_raise_only_protocol_violations(connect: Connect, data: bytes,
                                                                   cuts: list[int]) -> None:
    run(split(encode(connect) + data, cuts))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([0, 3, 5, 255, 4]), st.integers(0, 255), st.sampled_from(["raw", "length", "reserved",
                                                                                 "truncated", "connect"]),
       st.binary(max_size=64))
def test_the_chaos_harness_raw_packets(level: int, flags: int, shape: str, junk: bytes) -> None:
    """The shapes bench/chaos/hostile.py's strangers send the broker, against the core."""
    if shape == "connect":
        data = raw_connect(level, flags, b"alice", b"alice.phone")
    elif shape == "length":
        data = b"\x10\xff\xff\xff\xff\x7f" + junk
    elif shape == "reserved":
        data = bytes([0x10 | (flags & 0x0F) | 1]) + b"\x00"
    elif shape == "truncated":
        data = connect_packet("alice.phone", "alice", "pw", 60)[: 1 + len(junk) % 20]
    else:
        data = junk
    events, rule = run([data])
    if shape in ("length", "reserved"):
        assert rule in ("section 2.2.3", "MQTT-3.1.0-1")
    if shape == "truncated":
        assert rule is None and len(events) == 1  # the end of the stream: Closed


@pytest.mark.parametrize("data", [*BEFORE_CONNACK.values(), *ALSO_STOCK_BEFORE.values()],
                         ids=[*BEFORE_CONNACK, *ALSO_STOCK_BEFORE])
def test_malformed_connects_of_the_conformance_tests(data: bytes) -> None:
    events, rule = run([data])
    assert rule is not None
    assert events == []


@pytest.mark.parametrize("data", [*AFTER_CONNACK.values(), *ALSO_STOCK_AFTER.values()],
                         ids=[*AFTER_CONNACK, *ALSO_STOCK_AFTER])
def test_malformed_packets_of_the_conformance_tests(data: bytes) -> None:
    events, rule = run([encode(Connect("alice.phone")), data])
    assert rule is not None
    assert events == [Connect("alice.phone")]


def test_the_core_imports_no_io() -> None:
    code = ("import sys, broker.mqtt.connection, broker.mqtt.codec; "
            "print(sorted(m for m in ('asyncio', 'amqtt', 'socket', 'selectors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


COMMANDS = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.integers(0, 1), DATA),
    st.tuples(st.just("client"), FROM_CLIENT_PACKETS.filter(lambda p: not isinstance(p, Disconnect))),
    st.tuples(st.just("ack"), st.integers(0, 5)),  # the client acknowledges our n-th PUBLISH in flight
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(COMMANDS, st.integers(1, 4))
def test_what_the_core_sends_is_valid_mqtt(commands: list[tuple[object, ...]], cap: int) -> None:
    """Whatever the client sends and we command, data_to_send parses as server packets; QoS 1 ids in flight
    are unique and never more than the cap; every SUBSCRIBE / UNSUBSCRIBE / QoS 1 PUBLISH gets its answer."""
    conn = ServerConnection(LIMITS, 0.0, max_unacked=cap)
    conn.receive_data(encode(Connect("alice.phone")), 0.0)
    conn.next_event()
    conn.accept()
    inflight: list[int] = []
    client = Decoder(FROM_SERVER, 1 << 20)
    for command in commands:
        if command[0] == "publish":
            packet_id = conn.publish("u/alice/in", command[2], command[1])  # type: ignore[arg-type]
            if packet_id:
                assert packet_id not in inflight
                inflight.append(packet_id)
            assert len(inflight) <= cap
        elif command[0] == "ack" and inflight:
            conn.receive_data(encode(PubAck(inflight.pop(command[1] % len(inflight)))), 0.0)  # type: ignore[operator]
        elif command[0] == "client":
            packet = command[1]
            if isinstance(packet, PubAck) and packet.packet_id in inflight:
                inflight.remove(packet.packet_id)
            conn.receive_data(encode(packet), 0.0)  # type: ignore[arg-type]
        while (event := conn.next_event()) is not None:
            if isinstance(event, Publish) and event.qos == 1:
                conn.puback(event.packet_id or 0)
            elif isinstance(event, Subscribe):
                conn.suback(event.packet_id, [min(qos, 1) for _, qos in event.filters])
            elif isinstance(event, Unsubscribe):
                conn.unsuback(event.packet_id)
        client.feed(conn.data_to_send())
        while client.next_packet() is not None:
            pass
        assert client.buffered == 0  # whole packets only
    assert conn.unacked == len(inflight)
