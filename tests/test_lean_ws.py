"""WebSocket on the lean path (broker/lean_ws.py), through a real lean broker: the upgrade, the frames, abuse.

Proves: chat devices over ws and wss are served by the sans-IO core; MQTT packets split anyhow
across fragments and messages, with pings between the fragments, parse the same; pings get pongs;
bad upgrades are answered with an HTTP error or closed, and a slow one is dropped at the deadline;
an oversized message is closed with 1009, a text frame with 1003, a close frame in the middle of a
packet ends the session; random frames never crash the broker: after every case a chat device
logged in all along, and a new one, are still served.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testkit.packets import PINGREQ, PUBACK, RawClient, connect_packet, publish_packet, subscribe_packet
from testkit.ws_socket import WsSocket, frame
from tests.helpers import WAIT_S, BrokerThread, Peer, eventually
from tests.test_listeners import make_cert

DEADLINE_S = 1.0  # limits.connect_timeout_s: the upgrade's deadline too
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING = 0x0, 0x1, 0x2, 0x8, 0x9
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class Lean:
    def __init__(self, broker: BrokerThread, cert: Path) -> None:
        self.broker = broker
        self.cert = cert
        self.ws = broker.address("ws")[1]
        self.wss = broker.address("wss")[1]

    def on_lean_path(self, client_id: str) -> bool:
        async def live() -> bool:
            hub = self.broker.app.broker.lean
            return hub is not None and client_id in hub._live

        return bool(self.broker.call(live()))

    def raw(self) -> RawClient:
        return RawClient(self.ws, websocket=True)


@pytest.fixture(scope="module")
def lean(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lean]:
    home = tmp_path_factory.mktemp("lean-ws")
    cert, key = make_cert(home)
    broker = BrokerThread(home / "data", {
        "mqtt.lean_sessions": True,
        "limits.connect_timeout_s": DEADLINE_S,
        "listeners.ws.bind": "127.0.0.1:0",
        "listeners.wss": {"bind": "127.0.0.1:0", "certfile": str(cert), "keyfile": str(key)},
    }).start()
    try:
        broker.add_users({"alice": "alice-pw", "bob": "bob-pw"})
        yield Lean(broker, cert)
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def bob(lean: Lean) -> Iterator[Peer]:
    """A chat device over ws, logged in for the whole module: every test ends by checking it is still served."""
    peer = Peer(lean.ws, "bob", "bob-pw", transport="websockets")
    assert peer.connect() == 0 and peer.subscribe() == [1]
    yield peer
    peer.close()


@pytest.fixture(autouse=True)
def others_carry_on(lean: Lean, bob: Peer) -> Iterator[None]:
    yield
    assert bob.request("ping")["ok"] is True, "the device logged in all along is no longer served"
    raw = lean.raw()
    try:
        raw.send(connect_packet("alice.check", "alice", "alice-pw"))
        assert raw.connack() == 0, "a new device is no longer served"
    finally:
        raw.close()


def login(raw: RawClient, client_id: str = "alice.phone") -> None:
    raw.send(connect_packet(client_id, "alice", "alice-pw"))
    assert raw.connack() == 0


def ping_request(rid: str) -> bytes:
    return json.dumps({"rid": rid, "op": "ping"}).encode()


def closed_with(ws: WsSocket, code: int) -> bool:
    """True once the broker closes ``ws`` with a close frame of ``code`` (anything before it is read past)."""
    while ws.recv(65536):
        pass
    return ws.close_code == code


# --- served on the core --------------------------------------------------------------------------


def test_a_chat_device_over_ws_is_on_the_lean_path(lean: Lean) -> None:
    raw = lean.raw()
    try:
        login(raw)
        assert lean.on_lean_path("alice.phone")
        raw.send(PINGREQ)
        assert raw.read_exact(2) == b"\xd0\x00"
    finally:
        raw.close()


def test_a_chat_device_over_wss_is_on_the_lean_path(lean: Lean) -> None:
    alice = Peer(lean.wss, "alice", "alice-pw", device="laptop", transport="websockets")
    alice.client.tls_set(ca_certs=str(lean.cert))
    try:
        assert alice.connect() == 0 and alice.subscribe() == [1]
        assert lean.on_lean_path("alice.laptop")
        assert alice.request("ping")["ok"] is True
    finally:
        alice.close()


# --- frames -------------------------------------------------------------------------------------


def session_bytes() -> bytes:
    """CONNECT, SUBSCRIBE to the inbox, and a ping request: the stream a device sends first."""
    return (connect_packet("alice.split", "alice", "alice-pw") + subscribe_packet(1, "u/alice/in", 1)
            + publish_packet("u/alice/req", ping_request("split"), 1, 2))


def expect_session_answers(raw: RawClient) -> None:
    assert raw.connack() == 0
    assert raw.suback(1) == [1]
    assert raw.expect(PUBACK).packet_id == 2
    assert json.loads(raw.receive(1)[0].payload)["rid"] == "split"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=12, unique=True),
       fragments=st.lists(st.booleans(), min_size=13, max_size=13),
       pings=st.lists(st.booleans(), min_size=13, max_size=13))
def test_packets_split_across_fragments_and_messages_parse_the_same(
        lean: Lean, cuts: list[int], fragments: list[bool], pings: list[bool]) -> None:
    data = session_bytes()
    bounds = [0, *sorted(cut for cut in cuts if cut < len(data)), len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    raw = lean.raw()
    ws = raw.sock
    assert isinstance(ws, WsSocket)
    try:
        wire = b""
        in_message = False
        for n, piece in enumerate(pieces):
            last = n == len(pieces) - 1
            fin = last or not fragments[n]  # a message ends here, or goes on in a continuation frame
            wire += frame(OP_CONT if in_message else OP_BINARY, piece, fin=fin)
            in_message = not fin
            if pings[n]:
                wire += frame(OP_PING, b"p%d" % n)  # control frames may come between fragments
        ws.sock.sendall(wire)
        expect_session_answers(raw)
        assert ws.pongs == [b"p%d" % n for n in range(len(pieces)) if pings[n]]
    finally:
        raw.close()


def test_a_ping_gets_its_pong(lean: Lean) -> None:
    raw = lean.raw()
    ws = raw.sock
    assert isinstance(ws, WsSocket)
    try:
        ws.sock.sendall(frame(OP_PING, b"are you there"))
        login(raw)
        assert ws.pongs == [b"are you there"]  # written before the CONNACK: it came first
    finally:
        raw.close()


@pytest.fixture
def alice(lean: Lean) -> Iterator[WsSocket]:
    """alice.phone logged in over ws on the lean path: its WebSocket, to write frames to by hand."""
    raw = lean.raw()
    ws = raw.sock
    assert isinstance(ws, WsSocket)
    try:
        login(raw)
        assert lean.on_lean_path("alice.phone")
        yield ws
    finally:
        raw.close()


HALF_A_PUBLISH = publish_packet("u/alice/req", ping_request("cut"), 1, 3)[:20]
CLOSED_WITH = {
    # Fragments count together: 1 MiB - 4 bytes more after 10 are too many (that payload is never sent).
    "oversized message": (frame(OP_BINARY, PINGREQ * 5, fin=False) + b"\x80\xff" + (2**20 - 4).to_bytes(8, "big"),
                          1009),
    "1 TiB frame header": (b"\x82\xff" + (1 << 40).to_bytes(8, "big") + b"mask", 1009),
    "text frame": (frame(OP_TEXT, PINGREQ), 1003),  # [MQTT-6.0.0-1]
    "close frame mid-packet": (frame(OP_BINARY, HALF_A_PUBLISH) + frame(OP_CLOSE, (1000).to_bytes(2, "big")), 1000),
}


@pytest.mark.parametrize(("data", "code"), list(CLOSED_WITH.values()), ids=list(CLOSED_WITH))
def test_the_session_ends_with_a_close_code(lean: Lean, alice: WsSocket, data: bytes, code: int) -> None:
    alice.sock.sendall(data)
    assert closed_with(alice, code)
    eventually(lambda: not lean.on_lean_path("alice.phone"), what="the session ended")


def test_eof_in_the_middle_of_a_frame_ends_the_session(lean: Lean, alice: WsSocket) -> None:
    alice.sock.sendall(frame(OP_BINARY, PINGREQ * 50)[:40])
    alice.sock.shutdown(socket.SHUT_WR)
    while alice.recv(65536):
        pass
    eventually(lambda: not lean.on_lean_path("alice.phone"), what="the session ended")


# --- the upgrade --------------------------------------------------------------------------------


def upgrade(path: str = "/mqtt", **headers: str) -> bytes:
    fields = {"Host": "127.0.0.1", "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": KEY,
              "Sec-WebSocket-Version": "13", "Sec-WebSocket-Protocol": "mqtt"}
    for key, value in headers.items():
        name = key.replace("_", "-")
        if value:
            fields[name] = value
        else:
            fields.pop(name, None)
    return (f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n").encode()


def answer_of(port: int, request: bytes) -> bytes:
    """What the broker answers ``request`` with, up to its close (b"" if it closes unanswered)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(request)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


BAD_UPGRADES = {
    "other path": (upgrade("/other"), b"HTTP/1.1 404"),
    "no subprotocol": (upgrade(Sec_WebSocket_Protocol=""), b"HTTP/1.1 400"),
    "other subprotocol": (upgrade(Sec_WebSocket_Protocol="chat"), b"HTTP/1.1 400"),
    "no upgrade header": (upgrade(Upgrade=""), b"HTTP/1.1 426"),
    "no key": (upgrade(Sec_WebSocket_Key=""), b"HTTP/1.1 400"),
    "bad key": (upgrade(Sec_WebSocket_Key="short"), b"HTTP/1.1 400"),
    "version 8": (upgrade(Sec_WebSocket_Version="8"), b"HTTP/1.1 400"),
    "POST": (upgrade().replace(b"GET", b"POST", 1), b""),
    "HTTP/1.0": (upgrade().replace(b"HTTP/1.1", b"HTTP/1.0", 1), b""),
    "a 9 KiB header line": (upgrade(X_Junk="x" * 9000), b""),
    "200 headers": (upgrade().replace(b"\r\n\r\n", b"".join(b"\r\nX-%d: y" % n for n in range(200)) + b"\r\n\r\n"),
                    b""),
    "40 KiB of headers": (upgrade().replace(b"\r\n\r\n", b"".join(b"\r\nX-%d: %s" % (n, b"y" * 400)
                                                                 for n in range(100)) + b"\r\n\r\n"), b""),
    "garbage": (bytes(range(256)) * 4, b""),
    "MQTT on the ws port": (connect_packet("alice.raw", "alice", "alice-pw"), b""),
}


@pytest.mark.parametrize("request_bytes, answer", list(BAD_UPGRADES.values()), ids=list(BAD_UPGRADES))
def test_a_bad_upgrade_is_refused(lean: Lean, request_bytes: bytes, answer: bytes) -> None:
    got = answer_of(lean.ws, request_bytes)
    assert got.startswith(answer), got[:200]
    assert b"101 Switching" not in got


def test_a_slow_upgrade_is_dropped_at_the_deadline(lean: Lean) -> None:
    with socket.create_connection(("127.0.0.1", lean.ws), timeout=WAIT_S) as sock:
        sock.sendall(upgrade()[:30])  # and nothing more
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
        assert DEADLINE_S * 0.5 < time.monotonic() - started < DEADLINE_S + 3


def test_an_upgrade_over_tls_without_tls_is_refused(lean: Lean) -> None:
    got = answer_of(lean.wss, upgrade())
    assert b"101" not in got


def test_a_wss_upgrade_without_the_subprotocol_is_400(lean: Lean) -> None:
    context = ssl.create_default_context(cafile=str(lean.cert))
    with socket.create_connection(("127.0.0.1", lean.wss), timeout=WAIT_S) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(upgrade(Sec_WebSocket_Protocol=""))
        assert sock.recv(12) == b"HTTP/1.1 400"


# --- random input -------------------------------------------------------------------------------

FRAME_PARTS = st.one_of(
    st.binary(max_size=64),  # raw garbage
    st.builds(frame, st.sampled_from([OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, 0x3, 0xA, 0xB]),
              st.binary(max_size=300), st.booleans()),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(after_login=st.booleans(), parts=st.lists(FRAME_PARTS, max_size=8))
def test_random_frames_never_break_the_broker(lean: Lean, after_login: bool, parts: list[bytes]) -> None:
    raw = lean.raw()
    ws = raw.sock
    assert isinstance(ws, WsSocket)
    try:
        if after_login:
            login(raw, "alice.fuzz")
        ws.sock.sendall(b"".join(parts))
        ws.sock.settimeout(0.2)
        try:
            while ws.sock.recv(65536):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
    finally:
        raw.close()
    after = lean.raw()  # served at once, whatever came before
    try:
        login(after, "alice.after")
    finally:
        after.close()


def test_a_wss_client_closing_tls_ends_the_session_quietly(lean: Lean, caplog: pytest.LogCaptureFixture) -> None:
    ws = WsSocket(lean.wss, tls=ssl.create_default_context(cafile=str(lean.cert)))
    try:
        ws.sendall(connect_packet("alice.tls", "alice", "alice-pw"))
        assert ws.recv(4) == b"\x20\x02\x00\x00"
        assert lean.on_lean_path("alice.tls")
        assert isinstance(ws.sock, ssl.SSLSocket)
        ws.sock.unwrap()  # close_notify: the end of the stream under TLS
        eventually(lambda: not lean.on_lean_path("alice.tls"), what="the session ended")
    finally:
        ws.close()
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()]  # asyncio's warning for TLS
