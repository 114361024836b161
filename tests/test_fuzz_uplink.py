"""Fuzzing the uplink through the real broker (Hypothesis).

Proves that garbage published by an authenticated device -- arbitrary bytes,
arbitrary JSON, 10,000-deep nesting, payloads far over the limits, invalid
UTF-8, requests with wrong-typed fields, publishes to forbidden topics -- never
kills the broker, that every such publish gets exactly one clear answer on the
sender's inbox (an ``error`` item, or a ``res`` for a well-formed request), and
that another connected user receives nothing and keeps working. Raw-socket
tests send broken MQTT (garbage, truncated packets, huge remaining-length
claims, protocol violations) before and after CONNECT: the broker closes or
keeps waiting, but stays up, and a fresh client can still ping afterwards.

Each example is followed by a fence: a ``ping`` request with a unique rid.
Items that arrive before the fence's ``res`` belong to the example, so a
missing answer and a doubled answer are both caught; the fence is also the
periodic liveness check. After every test, the bystander is checked and a new
client logs in and pings.
"""

from __future__ import annotations

import json
import queue
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from testkit.packets import connect_packet, packet, publish_packet, utf8
from tests.deployment import settings_of
from tests.helpers import WAIT_S, BrokerThread, Peer, is_text

UPLINK_KINDS = ("out", "ack", "seen", "hb", "req")
ALLOWED_TOPICS = {f"u/mallory/{kind}" for kind in UPLINK_KINDS}
# Codes that name a fault of the input; "internal" (a server bug) is never acceptable here.
INPUT_FAULTS = {"bad_json", "bad_envelope", "too_large", "unsupported"}
# No uplink may refuse a payload this small as too large (a heartbeat is the smallest item).
SMALLEST_LIMIT = 1024
# Per kind, a field with a wrong type: the object can never be a valid item of that kind.
POISON: dict[str, tuple[str, Any]] = {
    "out": ("to", 5),
    "ack": ("seqs", "17"),
    "seen": ("ids", 7),
    "hb": ("state", ["away"]),
    "req": ("rid", 12),
}

FUZZ = settings(
    max_examples=150, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@dataclass
class Fuzz:
    broker: BrokerThread
    mallory: Peer  # the fuzzer
    bob: Peer  # a bystander who must not notice anything
    max_request: int
    max_body: int
    made: int = 0  # devices made so far, for unique client ids

    def device(self, prefix: str) -> str:
        self.made += 1
        return f"{prefix}{self.made}"


@pytest.fixture(scope="module", params=["single", "amqtt-path"])
def fuzz(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Fuzz]:
    """One broker and two connected, subscribed devices for the whole module; on the lean path
    and on amqtt's (``mqtt.lean_sessions`` off, tests/deployment.py)."""
    # The fuzzer publishes hundreds of items a second: the send rate limit is not
    # what this file tests, so it must not turn an answer into "rate_limited". Its raw
    # clients log in as ever new devices: the device limit is not tested here either.
    overrides = {"limits.send_rate_per_s": 1e6, "limits.send_burst": 1_000_000,
                 "limits.max_devices_per_message": 1000, "limits.max_devices_per_user": 1000}
    home = Path(tmp_path_factory.mktemp("fuzz"))
    running = BrokerThread(home / "data", settings_of(request.param, overrides)).start()
    made: list[Peer] = []
    try:
        for name in ("alice", "bob", "mallory"):
            running.add_user(name, f"{name}-pw")
        for name in ("mallory", "bob"):
            peer = Peer(running.port, name, f"{name}-pw")
            made.append(peer)
            assert peer.connect() == 0
            # Without TCP_NODELAY, paho's back-to-back small writes wait for the
            # broker's delayed ACK: ~40 ms per exchange instead of ~0.5 ms.
            peer.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert peer.subscribe() == [1]
        limits = running.settings.limits
        yield Fuzz(running, made[0], made[1], limits.max_request_bytes, limits.max_body_bytes)
    finally:
        for peer in made:
            peer.close()
        running.stop()


@pytest.fixture(autouse=True)
def healthy_afterwards(fuzz: Fuzz) -> Iterator[None]:
    """After every test: bob got nothing and still works, and a fresh client can ping."""
    yield
    ping(fuzz.bob)
    alice = Peer(fuzz.broker.port, "alice", "alice-pw", device=fuzz.device("fresh"))
    try:
        assert alice.connect() == 0
        assert alice.subscribe() == [1]
        assert alice.request("ping")["ok"] is True
    finally:
        alice.close()


# --- the exchange: one publish, exactly one answer ------------------------------


def _next_item(peer: Peer, deadline: float) -> dict[str, Any]:
    try:
        topic, payload, _retain = peer.messages.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise AssertionError(f"{peer.client_id}: no answer within {WAIT_S}s") from None
    assert topic == f"u/{peer.user}/in"
    item = json.loads(payload.decode("utf-8"))  # every item must be valid UTF-8 JSON
    assert isinstance(item, dict) and isinstance(item.get("kind"), str), item
    return item


def ping(peer: Peer) -> None:
    """A ping round trip that must be the very next item ``peer`` receives."""
    rid = f"ping-{uuid.uuid4().hex}"
    peer.publish(f"u/{peer.user}/req", json.dumps({"rid": rid, "op": "ping"}).encode())
    item = _next_item(peer, time.monotonic() + WAIT_S)
    assert item.get("rid") == rid and item["ok"] is True, f"{peer.client_id} received {item}"


def exchange(peer: Peer, topic: str, payload: bytes, rid: str | None = None) -> dict[str, Any]:
    """Publish ``payload`` and return its one answer (``rid``: a res may follow the fence)."""
    fence = f"fence-{uuid.uuid4().hex}"
    peer.publish(topic, payload)
    peer.publish(f"u/{peer.user}/req", json.dumps({"rid": fence, "op": "ping"}).encode())
    answers: list[dict[str, Any]] = []
    fenced = False
    deadline = time.monotonic() + WAIT_S
    while not (fenced and answers):
        item = _next_item(peer, deadline)
        if item.get("kind") == "res" and item.get("rid") == fence:
            assert item["ok"] is True, item
            fenced = True
        else:
            answers.append(item)
            # An error for bad input is sent while the input is handled, before the
            # fence is even read; only a res of a valid request may come after it.
            assert not fenced or (rid is not None and item.get("rid") == rid), (
                f"unexpected late item {item} for {payload[:80]!r} on {topic}")
    assert len(answers) == 1, f"{len(answers)} answers to {payload[:80]!r} on {topic}: {answers}"
    return answers[0]


def check_error(item: dict[str, Any], codes: set[str], ref: str | None = None) -> None:
    assert item["kind"] == "error", item
    assert item["code"] in codes, item
    assert isinstance(item["detail"], str) and item["detail"], item
    assert set(item) <= {"kind", "code", "detail", "ref"}, item
    if ref is not None:
        assert item.get("ref") == ref, item


def with_size(fuzz: Fuzz, kind: str, payload: bytes, codes: set[str]) -> set[str]:
    """``codes``, plus ``too_large`` where the payload may exceed the kind's limit."""
    if kind == "req" and len(payload) > fuzz.max_request:
        return {"too_large"}
    floor = {"req": fuzz.max_request, "out": fuzz.max_body}.get(kind, SMALLEST_LIMIT)
    return codes | {"too_large"} if len(payload) > floor else codes


def _is_json_object(payload: bytes) -> bool:
    try:
        return isinstance(json.loads(payload.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- strategies ------------------------------------------------------------------

kinds = st.sampled_from(UPLINK_KINDS)
# Every code point, lone surrogates included (JSON carries them as \udxxx escapes),
# with the troublesome ones drawn often.
SPICY = ["\ud800", "\udfff", "\udc80", "\x00", "\u2028", "\ufeff", "\uffff", "\u00e9", "\U0001f600", "\\", '"', "\x7f"]
any_text = st.text(alphabet=st.sampled_from(SPICY) | st.characters(exclude_categories=()), max_size=20)
json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(any_text, children, max_size=5),
    max_leaves=25,
)
# Objects that name the fields of real items, with values of any type.
item_like = st.fixed_dictionaries({}, optional={
    key: json_values for key in ("id", "to", "body", "type", "ts", "seqs", "ids", "state", "rid", "op", "args")
})
good_rid = st.uuids().map(lambda u: u.hex[:16])
MISSING = object()


@st.composite
def requests(draw: st.DrawFn) -> tuple[dict[str, Any], bool, bool]:
    """A request object, whether its rid is usable, and whether the whole envelope is valid."""
    rid_ok = draw(st.booleans())
    rid = draw(good_rid) if rid_ok else draw(st.sampled_from(
        [12, 0, -1, 1.5, None, True, ["r1"], {"r": 1}, "", "x" * 65, "a b", "r/1", "r\u00e9", "r\ud800", MISSING]))
    op_ok = draw(st.booleans())
    op = draw(st.sampled_from(["ping", "no.such_op", "auth.frobnicate"])) if op_ok else draw(st.sampled_from(
        [["ping"], 7, None, False, {"op": "ping"}, "", "PING", "ping!", "1ping", "p" * 65, "ping\ud800", MISSING]))
    args_ok = draw(st.booleans())
    args = draw(st.sampled_from([MISSING, {}, {}, {"pad": 1}, {"\ud800": 1}])) if args_ok else draw(st.sampled_from(
        ["string", "", ["a"], 3, None, True]))
    extra_ok = draw(st.booleans())
    obj: dict[str, Any] = {}
    for key, value in (("rid", rid), ("op", op), ("args", args)):
        if value is not MISSING:
            obj[key] = value
    if not extra_ok:
        obj.update(draw(st.dictionaries(
            any_text.filter(lambda k: k not in ("rid", "op", "args")), json_scalars, min_size=1, max_size=3)))
    return obj, rid_ok, op_ok and args_ok and extra_ok


@st.composite
def forbidden_topics(draw: st.DrawFn) -> str:
    # Wildcards and empty topics are protocol violations (the raw tests cover them);
    # NUL is forbidden in topic names [MQTT-1.5.3-2].
    free = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="+#\x00"), min_size=1, max_size=60)
    topic = draw(st.one_of(
        st.sampled_from([
            "u/bob/req", "u/bob/out", "u/bob/in", "u/mallory/in", "u/mallory", "u/mallory/", "u/mallory/req/x",
            "u/mallory//req", "u//req", "u/Mallory/req", "U/mallory/req", "/u/mallory/req", "u/mallory/req ",
            "$SYS/broker/uptime", "chat", "/", "u/mallory/in/../req",
        ]),
        free,
        st.builds(lambda user, rest: f"u/{user}/{rest}", st.sampled_from(["mallory", "bob", "alice", "x"]), free),
    ))
    return topic if topic not in ALLOWED_TOPICS else f"{topic}x"


INVALID_UTF8 = st.one_of(
    st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                     b"\xc3", b"\xf0\x9f\x98", b"\xf8\x88\x80\x80\x80"]),
    st.binary(min_size=1, max_size=8).filter(lambda b: not _decodes(b)),
)
TEMPLATES = {
    "out": '{"id":"m1","to":"bob","body":"hello world","type":"text"}',
    "ack": '{"seqs":[17,18]}',
    "seen": '{"to":"bob","ids":["m1","m2"]}',
    "hb": '{"state":"away"}',
    "req": '{"rid":"r1","op":"ping","args":{}}',
}


# --- publishes by an authenticated device ---------------------------------------------


@FUZZ
@given(kind=kinds, payload=st.binary(max_size=SMALLEST_LIMIT).filter(lambda b: not _is_json_object(b)))
@example(kind="req", payload=b"")
@example(kind="out", payload=b"\x00" * 100)
@example(kind="req", payload=b"\xef\xbb\xbf{}")  # a BOM is not JSON
@example(kind="req", payload=b'{"rid":"r1","op":"ping","args":{"n":' + b"9" * 5000 + b"}}")  # > int digit limit
@example(kind="out", payload=b'{"id":"m1","to":"bob","body":"x","ts":NaN}')
def test_arbitrary_bytes_get_bad_json(fuzz: Fuzz, kind: str, payload: bytes) -> None:
    item = exchange(fuzz.mallory, f"u/mallory/{kind}", payload)
    check_error(item, with_size(fuzz, kind, payload, {"bad_json"}))


@FUZZ
@given(kind=kinds, value=json_values | item_like)
@example(kind="out", value={"id": "\ud800"})  # echoed ids once broke the encoder
@example(kind="req", value={"rid": "r1", "op": "ping", "\ud800": 1})
def test_arbitrary_json_values(fuzz: Fuzz, kind: str, value: Any) -> None:
    if isinstance(value, dict):
        key, bad = POISON[kind]
        value[key] = bad
    payload = json.dumps(value).encode()  # ensure_ascii: lone surrogates become \udxxx escapes
    item = exchange(fuzz.mallory, f"u/mallory/{kind}", payload)
    if not isinstance(value, dict) or not is_text(value):
        check_error(item, with_size(fuzz, kind, payload, {"bad_json"}))
    elif kind == "req":
        check_error(item, with_size(fuzz, kind, payload, {"bad_envelope"}))
    else:
        check_error(item, with_size(fuzz, kind, payload, {"bad_envelope", "unsupported"}))


@FUZZ
@given(kind=kinds, depth=st.integers(33, 8_000), shape=st.sampled_from(["[", '{"":', '[{"a":']),
       in_envelope=st.booleans())
@example(kind="out", depth=10_000, shape="[", in_envelope=False)
@example(kind="out", depth=10_000, shape="[", in_envelope=True)
@example(kind="req", depth=8_000, shape="[", in_envelope=True)
def test_deep_nesting_is_bad_json(fuzz: Fuzz, kind: str, depth: int, shape: str, in_envelope: bool) -> None:
    close = {"[": "]", '{"":': "}", '[{"a":': "}]"}[shape]
    nested = shape * depth + "0" + close * depth
    payload = (f'{{"rid":"r1","op":"ping","id":"m1","to":"bob","args":{{"x":{nested}}}}}'
               if in_envelope else nested).encode()
    check_error(exchange(fuzz.mallory, f"u/mallory/{kind}", payload), with_size(fuzz, kind, payload, {"bad_json"}))


def test_ten_thousand_nested_arrays(fuzz: Fuzz) -> None:
    depth = max(10_000, fuzz.max_request // 2 + 1)  # over the request limit, whatever its default
    payload = b"[" * depth + b"]" * depth
    assert len(payload) > fuzz.max_request
    check_error(exchange(fuzz.mallory, "u/mallory/req", payload), {"too_large"})
    check_error(exchange(fuzz.mallory, "u/mallory/out", payload), {"bad_json"})


@settings(FUZZ, max_examples=40)
@given(kind=kinds, size=st.integers(0, 2**20), filler=st.binary(min_size=1, max_size=16), as_json=st.booleans())
def test_huge_payloads_are_too_large(fuzz: Fuzz, kind: str, size: int, filler: bytes, as_json: bool) -> None:
    # Far over every limit: 16 x the body limit and more (an item is not much larger than its body).
    size += 16 * fuzz.max_body
    if as_json:
        payload = json.dumps({"rid": "r1", "op": "ping", "id": "m1", "to": "bob", "body": "x" * size}).encode()
    else:
        payload = (filler * (size // len(filler) + 1))[:size]
    check_error(exchange(fuzz.mallory, f"u/mallory/{kind}", payload), {"too_large"})


@FUZZ
@given(kind=kinds, bad=INVALID_UTF8, where=st.floats(0, 1))
def test_invalid_utf8_is_bad_json(fuzz: Fuzz, kind: str, bad: bytes, where: float) -> None:
    text = TEMPLATES[kind].encode()
    # Inside the first string, or anywhere at all (the templates are ASCII, so the
    # bytes stay invalid wherever they land).
    at = text.index(b'"') + 1 if where < 0.5 else int(where * len(text))
    payload = text[:at] + bad + text[at:]
    check_error(exchange(fuzz.mallory, f"u/mallory/{kind}", payload), {"bad_json"})


@settings(FUZZ, max_examples=150)
@given(request=requests())
def test_wrong_typed_requests(fuzz: Fuzz, request: tuple[dict[str, Any], bool, bool]) -> None:
    obj, rid_ok, envelope_ok = request
    rid = obj["rid"] if rid_ok else None
    item = exchange(fuzz.mallory, "u/mallory/req", json.dumps(obj).encode(), rid=rid)
    if not is_text(obj):  # lone surrogates are refused before any field is looked at
        check_error(item, {"bad_json"})
        assert item.get("ref") == rid, item
        return
    if rid is None:
        check_error(item, {"bad_envelope"})
        return
    if not envelope_ok:
        # A fault of a request whose rid is readable: an error naming it, or a failed res.
        if item["kind"] == "error":
            check_error(item, {"bad_envelope"}, ref=rid)
        else:
            assert item["kind"] == "res" and item["rid"] == rid and item["ok"] is False, item
            assert item["error"]["code"] == "bad_envelope", item
        return
    assert item["kind"] == "res" and item["rid"] == rid, item
    if obj["op"] != "ping":
        assert item["ok"] is False and item["error"]["code"] == "unknown_op", item
    elif obj.get("args"):
        assert item["ok"] is False and item["error"]["code"] == "bad_envelope", item
    else:
        assert item["ok"] is True and isinstance(item["result"]["pong"], int), item


@FUZZ
@given(topic=forbidden_topics(), payload=st.binary(max_size=256) | st.just(b'{"rid":"r1","op":"ping"}'))
def test_forbidden_topics_are_refused(fuzz: Fuzz, topic: str, payload: bytes) -> None:
    check_error(exchange(fuzz.mallory, topic, payload), {"forbidden"})


# --- broken MQTT on a raw socket ----------------------------------------------------------


def _connect(client_id: str, level: int = 4) -> bytes:
    return connect_packet(client_id, "mallory", "mallory-pw", keepalive=30, protocol=("MQTT", level))


def _publish(topic: bytes, payload: bytes, qos: int = 1) -> bytes:
    return publish_packet(topic, payload, qos, 7 if qos else None)


HUGE_CLAIM = b"\x30\xff\xff\xff\x7f"  # a PUBLISH of 268,435,455 bytes, never sent
BEFORE_CONNECT = {
    "huge claim": b"\x10\xff\xff\xff\x7f" + b"\x00\x04MQTT",
    "bad remaining length": b"\x10\xff\xff\xff\xff\x01",
    "reserved type 0": b"\x00\x00",
    "reserved type 15": b"\xf0\x00",
    "publish first": _publish(b"u/mallory/req", b"{}"),
    "pingreq first": b"\xc0\x00",
    "truncated connect": _connect("mallory.t")[:12],
    "connect, length beyond packet": packet(0x10, utf8(b"MQTT") + b"\x04\xc2\x00\x1e" + b"\xff\xffmallory"),
    "connect, bad protocol name": _connect("mallory.t").replace(b"MQTT", b"MQTX"),
    "connect, invalid utf-8 client id": _connect("mallory.t").replace(b"mallory.t", b"mallory.\xff"),
    "connect, mqtt 5": _connect("mallory.t", level=5),
}
AFTER_CONNECT = {
    "huge claim": HUGE_CLAIM + b"x" * 100,
    "bad remaining length": b"\x30\xff\xff\xff\xff\x01",
    "truncated publish": _publish(b"u/mallory/req", b'{"rid":"r1","op":"ping"}')[:9],
    "topic longer than packet": packet(0x32, struct.pack("!H", 500) + b"u/mallory/req"),
    "invalid utf-8 topic": _publish(b"u/mallory/\xff\xfe", b"{}"),
    "wildcard topic": _publish(b"u/mallory/+", b"{}", qos=0) + b"\xc0\x00",
    "qos 3": packet(0x36, utf8(b"u/mallory/req") + b"\x00\x01{}"),
    "subscribe without topics": packet(0x82, b"\x00\x01"),
    "subscribe, qos 7": packet(0x82, b"\x00\x02" + utf8(b"u/mallory/in") + b"\x07"),
    "subscribe, truncated": packet(0x82, b"\x00\x03" + struct.pack("!H", 40) + b"u/"),
    "unsubscribe garbage": packet(0xA2, b"\x00\x04\xff\xff"),
    "puback for nothing": packet(0x40, b"\x12\x34"),
    "pubrel for nothing": packet(0x62, b"\x12\x35"),
    "ack without id": b"\x40\x00",
}
# Protocol violations after which the broker must close the connection itself.
MUST_CLOSE = {
    "reserved type 0": b"\x00\x00",
    "reserved type 15": b"\xf0\x00",
    "second connect": _connect("mallory.again"),
    "empty topic": _publish(b"", b"{}"),
    "disconnect with a body": packet(0xE0, b"\x00"),
}


def _raw(fuzz: Fuzz, login: bool) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", fuzz.broker.port), timeout=WAIT_S)
    if login:
        sock.sendall(_connect(f"mallory.{fuzz.device('raw')}"))
        assert _recv_exactly(sock, 4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _closed_by_broker(sock: socket.socket) -> bool:
    """Read until the broker closes (True) or WAIT_S passes (False)."""
    deadline = time.monotonic() + WAIT_S
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def _send_and_hang_up(fuzz: Fuzz, data: bytes, login: bool, what: str = "") -> None:
    """Send ``data``, then EOF: whatever it was, the broker must close its side."""
    with _raw(fuzz, login) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (ConnectionResetError, BrokenPipeError):
            return  # the broker already hung up
        assert _closed_by_broker(sock), f"broker kept the connection open after EOF: {what or data[:40]!r}"


@settings(FUZZ, max_examples=100)
@given(data=st.binary(max_size=300) | st.builds(lambda cut: _connect("mallory.cut")[:cut], st.integers(1, 40)))
def test_raw_garbage_before_connect(fuzz: Fuzz, data: bytes) -> None:
    _send_and_hang_up(fuzz, data, login=False)
    ping(fuzz.bob)


@settings(FUZZ, max_examples=40)
@given(data=st.binary(max_size=300) | st.builds(lambda head, tail: head + tail,
                                                 st.sampled_from([HUGE_CLAIM, b"\x32\x05\x00", b"\x82"]),
                                                 st.binary(max_size=40)))
def test_raw_garbage_after_connect(fuzz: Fuzz, data: bytes) -> None:
    _send_and_hang_up(fuzz, data, login=True)
    ping(fuzz.bob)


@pytest.mark.parametrize("login", [False, True], ids=["before-connect", "after-connect"])
def test_raw_broken_packets(fuzz: Fuzz, login: bool) -> None:
    for name, data in (AFTER_CONNECT if login else BEFORE_CONNECT).items():
        # Left open (a huge claim waits for its bytes until EOF or keepalive) ...
        with _raw(fuzz, login) as sock:
            sock.sendall(data)
            ping(fuzz.bob)
        # ... or followed by EOF, after which the broker must let go.
        _send_and_hang_up(fuzz, data, login, what=name)
        ping(fuzz.bob)


@pytest.mark.parametrize("name", sorted(MUST_CLOSE))
def test_raw_protocol_violation_closes_the_connection(fuzz: Fuzz, name: str) -> None:
    with _raw(fuzz, login=True) as sock:
        sock.sendall(MUST_CLOSE[name])
        assert _closed_by_broker(sock), f"{name}: the broker kept the connection open"
    ping(fuzz.bob)
