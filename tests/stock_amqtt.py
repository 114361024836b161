"""The reference targets of the attack tests: a STOCK amqtt broker, and hand-built MQTT 3.1.1 packets.

``StockBroker`` runs an unmodified ``amqtt.broker.Broker`` on 127.0.0.1:<free port> in a
background thread, like ``tests.helpers.BrokerThread`` does for the ChatBroker. With no
``plugins`` it uses amqtt's default plugin set (anonymous access allowed); the fault tests
run each attack against it to prove the attack really works on amqtt 0.12.1, so the same
test against the ChatBroker would catch a regression of the fix.

``RawClient`` speaks MQTT over a bare TCP socket, for what paho will not do: stay silent
after CONNECT, send half a CONNECT, or drop the connection without DISCONNECT.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from amqtt.broker import Broker
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

T = TypeVar("T")
WAIT_S = 10.0

# --- a stock amqtt broker ------------------------------------------------------------


class StockBroker:
    """``amqtt.broker.Broker`` exactly as shipped; ``plugins`` replaces its default plugin set."""

    def __init__(self, plugins: dict[str, Any] | None = None) -> None:
        self._plugins = plugins
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="stock-amqtt", daemon=True)
        self._broker: Broker | None = None

    def start(self) -> StockBroker:
        self._thread.start()
        self._broker = self.call(self._start())
        return self

    async def _start(self) -> Broker:
        config: dict[str, Any] = {"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}}
        if self._plugins is not None:
            config["plugins"] = self._plugins
        broker = Broker(config)  # binds to the running loop: build it on the broker thread
        await broker.start()
        return broker

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise RuntimeError("the stock broker is not started")
        return self._broker

    @property
    def port(self) -> int:
        return int(self.broker._servers["default"].instance.sockets[0].getsockname()[1])

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = WAIT_S) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        try:
            if self._broker is not None:
                self.call(self._broker.shutdown(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def password_file(path: Path, users: dict[str, str]) -> Path:
    """A FileAuthPlugin password file; cheap argon2 parameters keep the tests fast."""
    hasher = PasswordHash((Argon2Hasher(time_cost=1, memory_cost=1024, parallelism=1),))
    path.write_text("".join(f"{user}:{hasher.hash(pw)}\n" for user, pw in users.items()), encoding="utf-8")
    return path


def file_auth_plugins(passwords: Path, subscribe_acl: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Stock amqtt with real passwords (FileAuthPlugin) and, optionally, its subscribe ACL."""
    plugins: dict[str, Any] = {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(passwords)}}
    if subscribe_acl is not None:
        # 0.12.1's Config dataclass names the subscribe ACL "acl" (deprecated alias of subscribe-acl).
        plugins["amqtt.plugins.topic_checking.TopicAccessControlListPlugin"] = {"acl": subscribe_acl}
    return plugins


# --- MQTT 3.1.1 packets by hand (section 2: fixed header, section 3: packets) ---------

PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"
DISCONNECT = b"\xe0\x00"


def _remaining_length(n: int) -> bytes:
    """Section 2.2.3: variable-length encoding, 7 bits per byte."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(value: str | bytes) -> bytes:
    """Section 1.5.3: a two-byte length, then the bytes."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


def connect_packet(
    client_id: str, username: str | None = None, password: str | None = None, keepalive: int = 60,
    clean_session: bool = True, will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:
    """Section 3.1 CONNECT; ``will`` is (topic, message, qos, retain)."""
    flags = 0x02 if clean_session else 0x00
    payload = _utf8(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _utf8(topic) + _utf8(message)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
    if password is not None:
        flags |= 0x40
        payload += _utf8(password)
    variable = _utf8("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big")
    body = variable + payload
    return b"\x10" + _remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, topic: str, qos: int = 1) -> bytes:
    """Section 3.8 SUBSCRIBE with one topic filter."""
    body = packet_id.to_bytes(2, "big") + _utf8(topic) + bytes([qos])
    return b"\x82" + _remaining_length(len(body)) + body


class RawClient:
    """One TCP connection to a broker, driven byte by byte."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=WAIT_S)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_exact(self, n: int, timeout: float = WAIT_S) -> bytes:
        """``n`` bytes; raises ConnectionError if the broker closes first."""
        deadline = time.monotonic() + timeout
        data = b""
        while len(data) < n:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed by the broker after {len(data)} of {n} bytes")
            data += chunk
        return data

    def connack(self, timeout: float = WAIT_S) -> int:
        """Section 3.2: read a CONNACK and return its return code."""
        packet = self.read_exact(4, timeout)
        assert packet[:2] == b"\x20\x02", f"expected CONNACK, got {packet!r}"
        return packet[3]

    def closed_within(self, timeout: float) -> bool:
        """True once the broker closes the connection (EOF or reset); False if still open after ``timeout``.

        Anything the broker sends meanwhile is read and ignored.
        """
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                if not self.sock.recv(4096):
                    return True
            except TimeoutError:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
        return False

    def abort(self) -> None:
        """Drop the connection without DISCONNECT (an abnormal disconnect, section 3.1.2.5)."""
        self.sock.close()

    def close(self) -> None:
        self.sock.close()
