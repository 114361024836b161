"""Client addresses behind a load balancer: a real broker behind a real HAProxy (``send-proxy-v2``).

One broker with ``listeners.tcp/tls.proxy_protocol`` and ``listeners.ws.forwarded_for``, trusting
127.0.0.1 (where HAProxy connects from); clients connect through HAProxy from 127.0.0.2, .3, ...
(loopback too: the client socket is bound to that source address). Proves:
- per-address limits are per client: one address holding ``limits.max_unauthenticated_per_address``
  connections does not keep another address out (without the PROXY header both were HAProxy's);
- a failed-login flood from one address throttles that address, not another client's logins;
- the client's address is the session's, over TCP (PROXY v2 from HAProxy, v1 by hand), TLS (header
  and ClientHello in one segment) and WebSocket (X-Forwarded-For);
- refused, at once and without a CONNACK: a connection from a trusted address without a header, a
  header from an untrusted address, garbage; a truncated header at its EOF or at the deadline; and
  the broker goes on serving after a little fuzzing.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from broker.proxy_protocol import V2_SIGNATURE
from testkit.haproxy import HAProxy
from testkit.packets import connect_packet
from tests.helpers import WAIT_S, BrokerThread, connack_code, eventually
from tests.test_listeners import make_cert

DEADLINE_S = 2.0  # limits.connect_timeout_s: the header (and the TLS handshake) must come within it
AT_ONCE_S = 1.0  # a refusal that does not wait for any deadline
CAP = 2  # limits.max_unauthenticated_per_address
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
PAHO_NOT_AUTHORIZED = 135  # paho's reason code value for MQTT 3.1.1's 0x05


class Setup:
    def __init__(self, broker: BrokerThread, gateway: HAProxy, cert: Path) -> None:
        self.broker, self.gateway, self.cert = broker, gateway, cert

    def port(self, listener: str) -> int:
        return self.broker.address(listener)[1]

    def read(self, what: Any) -> Any:
        async def get() -> Any:
            return what(self.broker.app.broker)

        return self.broker.call(get())


@pytest.fixture(scope="module", params=["single", "amqtt-path"])
def setup(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Setup]:
    """``single``: chat sessions on tcp/tls on the sans-IO core (broker/lean.py), behind the header
    too; ``amqtt-path``: every client on amqtt (``mqtt.lean_sessions`` off)."""
    home = tmp_path_factory.mktemp("proxied")
    cert, key = make_cert(home)
    broker = BrokerThread(home / "data", {
        "mqtt.lean_sessions": request.param != "amqtt-path",
        "listeners.trusted_proxies": ["127.0.0.1/32"],
        "listeners.tcp.proxy_protocol": True,
        "listeners.tls": {"bind": "127.0.0.1:0", "certfile": str(cert), "keyfile": str(key), "proxy_protocol": True},
        "listeners.ws": {"bind": "127.0.0.1:0", "forwarded_for": True},
        "metrics.bind": "127.0.0.1:0",
        "limits.max_unauthenticated_per_address": CAP,
        "limits.connect_timeout_s": DEADLINE_S,
        "auth.free_failures": 2,
        "auth.base_delay_s": 60.0,  # an address throttled here stays so for the whole module
    }).start()
    gateway: HAProxy | None = None
    try:
        broker.add_users(PASSWORDS)
        gateway = HAProxy(home / "haproxy", [(broker.port, broker.address("metrics")[1], broker.address("ws")[1])],
                          proxy_protocol=True).start()
        gateway.wait_state("node0", "UP")  # the health checks (another port) carry no header
        yield Setup(broker, gateway, cert)
    finally:
        if gateway is not None:
            gateway.stop()
        broker.stop()


def v2_header(source: str, port: int) -> bytes:
    addresses = ipaddress.IPv4Address(source).packed + bytes([127, 0, 0, 1]) + struct.pack("!HH", port, 1883)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


def connect_from(source: str, port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT_S, source_address=(source, 0))


def closed_without_answer(sock: socket.socket, within: float) -> bool:
    """True if the other side closes within ``within`` seconds having sent nothing."""
    sock.settimeout(within)
    try:
        return sock.recv(64) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def connack(sock: socket.socket) -> int:
    sock.settimeout(WAIT_S)
    answer = b""
    while len(answer) < 4:
        chunk = sock.recv(4 - len(answer))
        assert chunk, f"closed after {answer!r}"
        answer += chunk
    assert answer[:2] == b"\x20\x02", answer
    return answer[3]


def login_from(source: str, port: int, user: str, password: str) -> int:
    """paho's CONNACK reason code for one login from ``source`` (its socket bound there), then disconnect."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}.phone")
    client.username_pw_set(user, password)
    return connack_code(client, port, bind_address=source)


def unauthenticated(setup: Setup, address: str) -> int:
    """Connections from ``address`` not logged in yet, as the broker counts them (its per-address cap)."""
    return int(setup.read(lambda broker: broker._unauthenticated.held(address)))


# --- through HAProxy -------------------------------------------------------------------


def test_per_address_limit_is_per_client(setup: Setup) -> None:
    held = [connect_from("127.0.0.4", setup.gateway.port) for _ in range(CAP)]  # no CONNECT: slots held
    try:
        eventually(lambda: unauthenticated(setup, "127.0.0.4") == CAP, what="127.0.0.4 holding its slots")
        with connect_from("127.0.0.4", setup.gateway.port) as one_more:
            assert closed_without_answer(one_more, AT_ONCE_S), "127.0.0.4 got a slot over the cap"
        # Without the header both addresses were HAProxy's, and this one was refused too.
        assert login_from("127.0.0.5", setup.gateway.port, "carol", "carol-pw") == 0
    finally:
        for sock in held:
            sock.close()


def test_a_failed_login_flood_does_not_slow_another_address(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    for n in range(4):  # other user names each time: only the address collects the failures
        assert login_from("127.0.0.2", setup.gateway.port, f"guess{n}", "wrong") == PAHO_NOT_AUTHORIZED
    assert login_from("127.0.0.2", setup.gateway.port, "alice", "alice-pw") == PAHO_NOT_AUTHORIZED, \
        "the flooding address was not throttled"
    started = time.monotonic()
    assert login_from("127.0.0.3", setup.gateway.port, "bob", "bob-pw") == 0
    assert time.monotonic() - started < AT_ONCE_S
    failures = [r.getMessage() for r in caplog.records if r.name == "broker.auth" and "guess" in r.getMessage()]
    assert failures and all("127.0.0.2" in line and "127.0.0.1" not in line for line in failures)


def session_address(setup: Setup, client_id: str) -> str | None:
    def address(broker: Any) -> str | None:
        lean = broker.lean._live.get(client_id) if broker.lean is not None else None
        if lean is not None:  # broker/chat_session.py
            return str(lean.peer[0])
        entry = broker._sessions.get(client_id)
        return entry[0].remote_address if entry is not None and client_id in broker._live else None

    return setup.read(address)


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
def test_sessions_carry_the_client_address(setup: Setup, transport: str) -> None:
    source, client_id = ("127.0.0.6", "carol.tcp") if transport == "tcp" else ("127.0.0.7", "carol.ws")
    peer = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, transport=transport)  # type: ignore[arg-type]
    if transport == "websockets":
        peer.ws_set_options(path="/mqtt")
    peer.username_pw_set("carol", "carol-pw")
    port = setup.gateway.port if transport == "tcp" else setup.gateway.ws_port
    peer.connect("127.0.0.1", port, 60, bind_address=source)
    peer.loop_start()
    try:
        eventually(lambda: session_address(setup, client_id) == source, what=f"{client_id} from {source}")
    finally:
        peer.disconnect()
        peer.loop_stop()


# --- straight to the broker ---------------------------------------------------------------


def test_v1_header_by_hand(setup: Setup) -> None:
    with connect_from("127.0.0.1", setup.port("tcp")) as sock:
        sock.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 1883\r\n" + connect_packet("anon-1"))
        assert connack(sock) == 5  # the header was taken: CONNECT got its (refusing) answer
    with connect_from("127.0.0.1", setup.port("tcp")) as sock:
        sock.sendall(b"PROXY UNKNOWN\r\n" + connect_packet("alice.v1", "alice", "alice-pw"))
        assert connack(sock) == 0


def test_tls_after_the_header_in_one_segment(setup: Setup) -> None:
    context = ssl.create_default_context(cafile=str(setup.cert))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with connect_from("127.0.0.1", setup.port("tls")) as sock:
        sock.settimeout(WAIT_S)
        pending = v2_header("198.51.100.8", 40001)  # the ClientHello right behind it, as HAProxy sends them
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(pending + outgoing.read())
                pending = b""
                incoming.write(sock.recv(65536))
        tls.write(connect_packet("alice.tls", "alice", "alice-pw"))
        sock.sendall(outgoing.read())  # with the client's Finished
        answer = b""
        while len(answer) < 4:
            try:
                answer += tls.read(4 - len(answer))
            except ssl.SSLWantReadError:
                incoming.write(sock.recv(65536))
        assert answer == b"\x20\x02\x00\x00"


def refused(setup: Setup) -> int:
    return int(setup.read(lambda broker: broker.counters.refused_proxy))


def ws_refused(setup: Setup, source: str, headers: dict[str, str]) -> bool:
    """True if a WebSocket from ``source`` is closed by the broker with 1008 (policy) before any MQTT."""
    uri = f"ws://127.0.0.1:{setup.port('ws')}/mqtt"
    with ws_connect(uri, sock=connect_from(source, setup.port("ws")), additional_headers=headers,
                    subprotocols=["mqtt"], open_timeout=WAIT_S) as ws:
        try:
            ws.recv(timeout=AT_ONCE_S)
        except ConnectionClosed as closed:
            return closed.rcvd is not None and closed.rcvd.code == 1008
    return False


def test_no_header_from_a_trusted_address_is_refused(setup: Setup) -> None:
    before = refused(setup)
    with connect_from("127.0.0.1", setup.port("tcp")) as sock:
        sock.sendall(connect_packet("alice.direct", "alice", "alice-pw"))
        assert closed_without_answer(sock, AT_ONCE_S)
    assert ws_refused(setup, "127.0.0.1", {})
    eventually(lambda: refused(setup) == before + 2, what="the refusals counted")


def test_a_header_from_an_untrusted_address_is_refused(setup: Setup) -> None:
    with connect_from("127.0.0.2", setup.port("tcp")) as sock:
        sock.sendall(v2_header("203.0.113.9", 1) + connect_packet("alice.spoof", "alice", "alice-pw"))
        assert closed_without_answer(sock, AT_ONCE_S)
    assert ws_refused(setup, "127.0.0.2", {"X-Forwarded-For": "203.0.113.9"})
    with ws_connect(f"ws://127.0.0.1:{setup.port('ws')}/mqtt", additional_headers={"X-Forwarded-For": "203.0.113.9"},
                    subprotocols=["mqtt"], open_timeout=WAIT_S) as ws:
        ws.send(connect_packet("alice.xff", "alice", "alice-pw"))  # from the trusted proxy: served
        assert ws.recv(timeout=WAIT_S) == b"\x20\x02\x00\x00"


def test_truncated_headers_and_garbage_are_refused_quickly(setup: Setup) -> None:
    rng = random.Random(16)
    valid = [v2_header("198.51.100.9", 9), b"PROXY TCP4 198.51.100.9 127.0.0.1 9 1883\r\n"]
    before = refused(setup)
    cases = 0
    for _ in range(30):  # garbage: refused at its first wrong byte, with no EOF needed
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
        if garbage[:1] in (b"P", b"\r"):
            continue
        with connect_from("127.0.0.1", setup.port("tcp")) as sock:
            sock.sendall(garbage)
            assert closed_without_answer(sock, AT_ONCE_S), garbage
        cases += 1
    eventually(lambda: refused(setup) == before + cases, what="every garbage connection refused and counted")
    for _ in range(30):  # a header cut short, or with one byte changed, then EOF
        header = bytearray(rng.choice(valid))
        if rng.random() < 0.5:
            header = header[:rng.randrange(len(header))]
        else:
            header[rng.randrange(12, len(header))] ^= 1 << rng.randrange(8)
        with connect_from("127.0.0.1", setup.port("tcp")) as sock:
            sock.sendall(bytes(header))
            try:
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(AT_ONCE_S)
                answer = sock.recv(64)
            except OSError:  # reset, or already closed at a changed byte (ENOTCONN): refused either way
                answer = b""
            assert answer == b"", header  # a still valid header (a changed port byte) reaches the EOF
    with connect_from("127.0.0.1", setup.port("tcp")) as sock:  # a part of a header, then silence
        started = time.monotonic()
        sock.sendall(valid[0][:20])
        assert closed_without_answer(sock, DEADLINE_S + AT_ONCE_S)
        assert time.monotonic() - started >= DEADLINE_S * 0.9
    assert login_from("127.0.0.8", setup.gateway.port, "carol", "carol-pw") == 0
    assert setup.read(lambda broker: broker.listeners_serving()) == {"tcp": True, "tls": True, "ws": True}
