"""The TLS, WebSocket and WebSocket-over-TLS listeners of a real ChatBroker.

Proves: with a self-signed certificate (made here with ``cryptography``), a paho client
that trusts it logs in over TLS and pings, one that does not trust it is refused in the
handshake, and plain MQTT on the TLS port gets no CONNACK; MQTT over WebSocket on path
``/mqtt`` (plain and TLS) logs in and pings; a WebSocket handshake on any other path
is refused with HTTP 404; all listeners serve at once next to plain TCP.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from testkit.packets import connect_packet
from tests.deployment import settings_of
from tests.helpers import BrokerThread, Peer

IO_S = 10.0


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost and its key: (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat-broker test")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class Listeners:
    def __init__(self, broker: BrokerThread, cert: Path) -> None:
        self.broker = broker
        self.cert = cert

    def port(self, listener: str) -> int:
        return self.broker.address(listener)[1]


@pytest.fixture(scope="module", params=["single", "amqtt-path"])
def listeners(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Listeners]:
    """One ChatBroker with tcp, tls, ws and wss listeners on free ports; users alice and bob. ``single``: chat
    sessions on every listener run on the sans-IO core (broker/lean.py); ``amqtt-path``: on amqtt
    (``mqtt.lean_sessions`` off)."""
    home = tmp_path_factory.mktemp("listeners")
    cert, key = make_cert(home)
    overrides = {"listeners.ws.bind": "127.0.0.1:0"}
    for name in ("tls", "wss"):
        overrides |= {f"listeners.{name}.bind": "127.0.0.1:0", f"listeners.{name}.certfile": str(cert),
                      f"listeners.{name}.keyfile": str(key)}
    broker = BrokerThread(home / "data", settings_of(request.param, overrides)).start()
    try:
        for name in ("alice", "bob"):
            broker.add_user(name, f"{name}-pw")
        yield Listeners(broker, cert)
    finally:
        broker.stop()


def ping(peer: Peer) -> None:
    try:
        assert peer.connect() == 0
        assert peer.subscribe() == [1]
        res = peer.request("ping")
        assert res["ok"] is True and isinstance(res["result"]["pong"], int)
    finally:
        peer.close()


def test_all_listeners_are_bound(listeners: Listeners) -> None:
    ports = {name: listeners.port(name) for name in ("tcp", "tls", "ws", "wss")}
    assert all(port > 0 for port in ports.values())
    assert len(set(ports.values())) == 4


def test_tls_login_and_ping(listeners: Listeners) -> None:
    alice = Peer(listeners.port("tls"), "alice", "alice-pw")
    alice.client.tls_set(ca_certs=str(listeners.cert))
    ping(alice)


def test_tls_client_that_does_not_trust_the_cert_is_refused(listeners: Listeners) -> None:
    alice = Peer(listeners.port("tls"), "alice", "alice-pw")
    alice.client.tls_set()  # the system's CAs only
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            alice.connect()
    finally:
        alice.close()


def _mqtt_connect_packet(client_id: str, user: str, password: str) -> bytes:
    def field(text: str) -> bytes:
        data = text.encode()
        return len(data).to_bytes(2, "big") + data

    body = field("MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big") + field(client_id) + field(user) + field(password)
    return bytes([0x10, len(body)]) + body


def test_tls_client_that_is_no_chat_device_is_answered(listeners: Listeners) -> None:
    """A CONNECT without user name over TLS: amqtt's path (handed over from the lean one) refuses it with 0x05."""
    context = ssl.create_default_context(cafile=str(listeners.cert))
    with socket.create_connection(("127.0.0.1", listeners.port("tls")), timeout=IO_S) as plain, \
            context.wrap_socket(plain, server_hostname="localhost") as sock:
        sock.sendall(connect_packet("no-user"))
        assert sock.recv(4) == b"\x20\x02\x00\x05"


def test_plain_mqtt_on_the_tls_port_gets_no_connack(listeners: Listeners) -> None:
    with socket.create_connection(("127.0.0.1", listeners.port("tls")), timeout=IO_S) as sock:
        sock.sendall(_mqtt_connect_packet("alice.phone", "alice", "alice-pw"))
        received = b""
        while chunk := sock.recv(4096):  # the server ends the failed handshake
            received += chunk
    assert not received.startswith(b"\x20\x02"), received


def test_websocket_login_and_ping(listeners: Listeners) -> None:
    ping(Peer(listeners.port("ws"), "bob", "bob-pw", transport="websockets"))


def test_websocket_over_tls_login_and_ping(listeners: Listeners) -> None:
    bob = Peer(listeners.port("wss"), "bob", "bob-pw", device="laptop", transport="websockets")
    bob.client.tls_set(ca_certs=str(listeners.cert))
    ping(bob)


def _ws_handshake_status(port: int, path: str) -> str:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=IO_S) as sock:
        sock.sendall(request.encode())
        received = b""
        while b"\r\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    return received.split(b"\r\n", 1)[0].decode()


@pytest.mark.parametrize("path", ["/other", "/", "/mqtt/x", "/MQTT"])
def test_websocket_handshake_on_another_path_is_404(listeners: Listeners, path: str) -> None:
    assert _ws_handshake_status(listeners.port("ws"), path) == "HTTP/1.1 404 Not Found"


def test_websocket_handshake_on_mqtt_path_is_accepted(listeners: Listeners) -> None:
    # The same raw request on /mqtt switches protocols: the 404s above are about the path.
    assert _ws_handshake_status(listeners.port("ws"), "/mqtt") == "HTTP/1.1 101 Switching Protocols"



def _handshakes_completed(port: int, count: int, wait_s: float) -> int:
    """Open ``count`` connections at once; how many handshakes the kernel completed within ``wait_s``
    (a SYN that meets a full accept queue is dropped, and its client sends it again only after a second)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        poller = select.poll()
        for s in sockets:
            s.setblocking(False)
            assert s.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
            poller.register(s, select.POLLOUT)
        done: set[int] = set()
        deadline = time.monotonic() + wait_s
        while len(done) < count and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                done.add(fd)
        return sum(1 for s in sockets if s.fileno() in done and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)
    finally:
        for s in sockets:
            s.close()


def _logs_in_soon(port: int) -> None:
    """alice logs in within ``IO_S``: the storm's connections (all from 127.0.0.1, closed by now) hold the
    address's unauthenticated slots until the broker has read their EOF (amqtt's path: about a second)."""
    deadline = time.monotonic() + IO_S
    while True:
        peer = Peer(port, "alice", "alice-pw")
        peer.client.connect(peer.host, port)
        peer.client.loop_start()
        try:
            if peer.connack.get(timeout=1.0) == 0:
                break
        except queue.Empty:
            assert time.monotonic() < deadline, "no login within the deadline after the storm"
        finally:
            peer.close()
    ping(Peer(port, "alice", "alice-pw"))


@pytest.mark.parametrize("deployment", ["single", "amqtt-path"])
def test_a_reconnect_storm_waits_in_the_listen_backlog_while_the_broker_is_busy(
        tmp_path: Path, deployment: str) -> None:
    """300 phones reconnect while the broker's loop is busy: with the default ``listeners.backlog`` (1024) the
    kernel completes every handshake on tcp and ws, and each logs in once the loop is free; a backlog of 20
    (asyncio's default of 100 did the same to a few hundred) leaves the rest to retry a second later."""
    storm = 300
    for backlog in (None, 20):
        overrides = {"listeners.ws.bind": "127.0.0.1:0"} | ({"listeners.backlog": backlog} if backlog else {})
        broker = BrokerThread(tmp_path / f"data-{backlog}", settings_of(deployment, overrides)).start()
        blocked, release = threading.Event(), threading.Event()

        def busy(blocked: threading.Event = blocked, release: threading.Event = release) -> None:
            blocked.set()
            release.wait(IO_S)
        try:
            broker.add_user("alice", "alice-pw")
            ports = {name: broker.address(name)[1] for name in ("tcp", "ws")}
            broker.loop.call_soon_threadsafe(busy)
            assert blocked.wait(IO_S)
            completed = {name: _handshakes_completed(port, storm, 0.8) for name, port in ports.items()}
            release.set()
            if backlog is None:
                assert completed == {"tcp": storm, "ws": storm}, "every handshake done while the loop was busy"
                _logs_in_soon(broker.port)
            else:
                assert all(n <= 2 * backlog + 2 for n in completed.values()), completed
        finally:
            release.set()
            broker.stop()
