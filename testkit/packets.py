"""MQTT 3.1.1 packets by hand, and a client that speaks them over a bare TCP socket.

What a conformance suite does: write the bytes the spec describes (or breaks on
purpose), read the broker's answer packet by packet. Section numbers are those of
the OASIS MQTT 3.1.1 standard (2014). Shared by tests/mqtt/, tests/stock_amqtt.py
and the tests that import it.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from testkit.ws_socket import WsSocket

WAIT_S = 10.0

# Section 2.2.1 packet types, as the first byte with the flags section 2.2.2 requires.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ_TYPE, PINGRESP_TYPE, DISCONNECT_TYPE = 8, 9, 10, 11, 12, 13, 14

PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"
DISCONNECT = b"\xe0\x00"


def remaining_length(n: int) -> bytes:
    """Section 2.2.3: variable-length encoding, 7 bits per byte."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(value: str | bytes) -> bytes:
    """Section 1.5.3: a two-byte length, then the bytes (``bytes`` are sent as they are)."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


def packet(first_byte: int, body: bytes) -> bytes:
    """Section 2.2: fixed header (type and flags, remaining length), then the body."""
    return bytes([first_byte]) + remaining_length(len(body)) + body


def connect_packet(
    client_id: str | bytes, username: str | None = None, password: str | None = None, keepalive: int = 60,
    clean_session: bool = True, will: tuple[str | bytes, bytes, int, bool] | None = None,
    protocol: tuple[str, int] = ("MQTT", 4),
) -> bytes:
    """Section 3.1 CONNECT; ``will`` is (topic, message, qos, retain)."""
    flags = 0x02 if clean_session else 0x00
    payload = utf8(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += utf8(topic) + utf8(message)
    if username is not None:
        flags |= 0x80
        payload += utf8(username)
    if password is not None:
        flags |= 0x40
        payload += utf8(password)
    variable = utf8(protocol[0]) + bytes([protocol[1], flags]) + keepalive.to_bytes(2, "big")
    return packet(0x10, variable + payload)


def subscribe_packet(packet_id: int, topic: str | bytes, qos: int = 1, *more: tuple[str, int]) -> bytes:
    """Section 3.8 SUBSCRIBE (flags 0010, MQTT-3.8.1-1) with one or more topic filters."""
    body = packet_id.to_bytes(2, "big") + utf8(topic) + bytes([qos])
    for extra_topic, extra_qos in more:
        body += utf8(extra_topic) + bytes([extra_qos])
    return packet(0x82, body)


def unsubscribe_packet(packet_id: int, *topics: str) -> bytes:
    """Section 3.10 UNSUBSCRIBE (flags 0010, MQTT-3.10.1-1)."""
    return packet(0xA2, packet_id.to_bytes(2, "big") + b"".join(utf8(t) for t in topics))


def publish_packet(
    topic: str | bytes, payload: bytes = b"", qos: int = 0, packet_id: int | None = None, retain: bool = False,
    dup: bool = False,
) -> bytes:
    """Section 3.3 PUBLISH; ``packet_id`` defaults to 1 for QoS 1 and 2."""
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = utf8(topic)
    if qos:
        body += (packet_id or 1).to_bytes(2, "big")
    return packet(first, body + payload)


def ack_packet(kind: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBCOMP (flags 0) or PUBREL (flags 0010, MQTT-3.6.1-1)."""
    return packet((kind << 4) | (0x02 if kind == PUBREL else 0), packet_id.to_bytes(2, "big"))


@dataclass(frozen=True)
class Packet:
    kind: int
    flags: int
    body: bytes

    @property
    def packet_id(self) -> int:
        return int.from_bytes(self.body[:2], "big")


@dataclass(frozen=True)
class Publish:
    """A PUBLISH the broker sent (section 3.3)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


def parse_publish(got: Packet) -> Publish:
    qos = (got.flags >> 1) & 0x03
    size = int.from_bytes(got.body[:2], "big")
    topic = got.body[2:2 + size].decode("utf-8")
    rest = got.body[2 + size:]
    packet_id = int.from_bytes(rest[:2], "big") if qos else None
    return Publish(topic, rest[2:] if qos else rest, qos, bool(got.flags & 0x01), bool(got.flags & 0x08), packet_id)


class RawClient:
    """One TCP (or WebSocket) connection to a broker, driven byte by byte."""

    def __init__(self, port: int, host: str = "127.0.0.1", websocket: bool = False) -> None:
        """``websocket``: MQTT over WebSocket on ``/mqtt`` (testkit/ws_socket.py), the same packets."""
        self.sock: socket.socket | WsSocket = (
            WsSocket(port, host) if websocket else socket.create_connection((host, port), timeout=WAIT_S))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.close_s = WAIT_S
        """How long ``closed()`` and ``answer_before_close()`` wait for the broker to close."""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_exact(self, n: int, timeout: float = WAIT_S) -> bytes:
        """``n`` bytes; raises ConnectionError if the broker closes first, TimeoutError if it is silent."""
        deadline = time.monotonic() + timeout
        data = b""
        while len(data) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(data)} of {n} bytes within {timeout}s")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed by the broker after {len(data)} of {n} bytes")
            data += chunk
        return data

    def read_packet(self, timeout: float = WAIT_S) -> Packet:
        """The next whole packet (section 2.2)."""
        deadline = time.monotonic() + timeout
        first = self.read_exact(1, timeout)[0]
        length, multiplier = 0, 1
        while True:
            digit = self.read_exact(1, max(deadline - time.monotonic(), 0.001))[0]
            length += (digit & 0x7F) * multiplier
            if not digit & 0x80:
                break
            multiplier *= 128
        body = self.read_exact(length, max(deadline - time.monotonic(), 0.001)) if length else b""
        return Packet(first >> 4, first & 0x0F, body)

    def expect(self, kind: int, timeout: float = WAIT_S) -> Packet:
        got = self.read_packet(timeout)
        assert got.kind == kind, f"expected packet type {kind}, got {got}"
        return got

    def connack(self, timeout: float = WAIT_S) -> int:
        """Section 3.2: read a CONNACK and return its return code."""
        return self.connack_full(timeout)[1]

    def connack_full(self, timeout: float = WAIT_S) -> tuple[bool, int]:
        """Section 3.2: (session present, return code)."""
        got = self.read_packet(timeout)
        assert (got.kind, got.flags, len(got.body)) == (CONNACK, 0, 2), f"expected CONNACK, got {got}"
        return bool(got.body[0] & 0x01), got.body[1]

    def suback(self, packet_id: int, timeout: float = WAIT_S) -> list[int]:
        """Section 3.9: the return codes of the SUBACK for ``packet_id``."""
        got = self.expect(SUBACK, timeout)
        assert got.packet_id == packet_id, got
        return list(got.body[2:])

    def publish(self, timeout: float = WAIT_S) -> Publish:
        """The next packet, which must be a PUBLISH (section 3.3)."""
        return parse_publish(self.expect(PUBLISH, timeout))

    def receive(self, count: int, ack: bool = True, timeout: float = WAIT_S) -> list[Publish]:
        """The next ``count`` PUBLISHes, acknowledged as a client must (section 4.3) unless ``ack`` is False.

        A PUBREL the broker sends meanwhile is answered with PUBCOMP; any other packet fails.
        """
        deadline = time.monotonic() + timeout
        got: list[Publish] = []
        while len(got) < count:
            remaining = max(deadline - time.monotonic(), 0.001)
            peek = self.read_packet(remaining)
            if peek.kind == PUBREL:
                if ack:
                    self.send(ack_packet(PUBCOMP, peek.packet_id))
                continue
            assert peek.kind == PUBLISH, f"expected PUBLISH, got {peek}"
            message = parse_publish(peek)
            got.append(message)
            if ack and message.qos == 1:
                self.send(ack_packet(PUBACK, message.packet_id or 0))
            elif ack and message.qos == 2:
                self.send(ack_packet(PUBREC, message.packet_id or 0))
        return got

    def send_publish(self, topic: str, payload: bytes, qos: int, packet_id: int = 1, retain: bool = False) -> None:
        """PUBLISH and complete its flow (section 4.3): PUBACK, or PUBREC / PUBREL / PUBCOMP."""
        self.send(publish_packet(topic, payload, qos, packet_id, retain))
        if qos == 1:
            assert self.expect(PUBACK).packet_id == packet_id
        elif qos == 2:
            assert self.expect(PUBREC).packet_id == packet_id
            self.send(ack_packet(PUBREL, packet_id))
            assert self.expect(PUBCOMP).packet_id == packet_id

    def ping(self, timeout: float = WAIT_S) -> None:
        """PINGREQ, and everything up to its PINGRESP must be nothing (section 3.12)."""
        self.send(PINGREQ)
        got = self.read_packet(timeout)
        assert got.kind == PINGRESP_TYPE, f"expected PINGRESP, got {got}"

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

    def closed(self) -> bool:
        """``closed_within(self.close_s)``."""
        return self.closed_within(self.close_s)

    def answer_before_close(self) -> bytes:
        """Every byte the broker sends until it closes the connection; fails if it stays open ``close_s``."""
        received = b""
        try:
            while True:
                received += self.read_exact(1, self.close_s)
        except ConnectionError:
            return received
        except TimeoutError:
            raise AssertionError(f"still open {self.close_s}s after the malformed packet; sent {received!r}") from None

    def abort(self) -> None:
        """Drop the connection without DISCONNECT (an abnormal disconnect, section 3.1.2.5)."""
        self.sock.close()

    def close(self) -> None:
        self.sock.close()
