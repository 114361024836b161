"""The wire gate: every packet a client sends is checked here before amqtt parses it.

amqtt 0.12.1 reads packets field by field and trusts what it reads: it decodes
invalid UTF-8 into the text ``"b'...'"``, ignores a packet's remaining length
(a CONNECT with a will flag but no will topic reads the *next* packet's bytes
as the will), parses any first packet as a CONNECT, reads a body of any size
into memory, and answers malformed SUBSCRIBEs. ``PacketGate`` wraps the
connection's reader: it reads one whole packet (fixed header first, so a
packet over ``mqtt.max_packet_bytes`` or a first packet that is not CONNECT is
refused before its body is read), checks it against MQTT 3.1.1, and only then
hands its bytes to amqtt. A violation raises ``ProtocolViolation``; the broker
then closes the connection without answering [MQTT-4.8.0-1] ("unless stated
otherwise, ... MUST close the Network Connection"), and, for a connection
past CONNECT, publishes the will (section 3.1.2.5: protocol error). A CONNECT
the server refuses in a way the spec names a return code for raises
``ConnectRefused``: the broker answers CONNACK with that code, then closes.

Each check cites its rule; the conformance tests in tests/mqtt/ cite the same.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, WriterAdapter

from broker.acl import is_valid_topic_name
from broker.downlink import wait_writable

log = logging.getLogger(__name__)

# Packet types (section 2.2.1: the high nibble of the first byte); a whole first byte is named *_BYTE.
CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 3, 4, 5, 6, 7
SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT = 8, 10, 12, 14
CONNECT_BYTE = 0x10  # type 1, flags 0 [MQTT-2.2.2-2]
OVER_UNACKED_READ_S = 0.05
"""Pause before each packet read from a connection over ``limits.max_unacked_downlinks``."""

UNACCEPTABLE_PROTOCOL_VERSION = 0x01
IDENTIFIER_REJECTED = 0x02
NO_KEEPALIVE_LIMIT = 65535


class ProtocolViolation(Exception):
    """The client broke MQTT 3.1.1: close the connection without an answer.

    Not an amqtt ``MQTTError`` on purpose: amqtt's reader loop logs those and
    reads on, while any other exception ends the connection.
    """

    def __init__(self, reason: str, rule: str) -> None:
        super().__init__(f"{reason} [{rule}]")
        self.reason = reason
        self.rule = rule


class ConnectRefused(ProtocolViolation):
    """A CONNECT refused with a CONNACK return code (section 3.2.2.3), then closed."""

    def __init__(self, code: int, reason: str, rule: str) -> None:
        super().__init__(reason, rule)
        self.code = code


@dataclass(frozen=True, slots=True)
class WireLimits:
    max_packet_bytes: int
    keepalive_min_s: int = 0
    keepalive_max_s: int = NO_KEEPALIVE_LIMIT
    publishes_per_s: float = 0.0  # per connection; 0: unpaced
    publish_burst: int = 1
    max_connect_bytes: int = 65536
    """Largest CONNECT: refused on its fixed header, so an unauthenticated client holds little memory."""
    packet_deadline_s: float = 30.0
    """Time to complete a packet once its first byte arrived (an incomplete one is buffered meanwhile)."""


class Pacer:
    """A token bucket that says how long to wait instead of refusing (pure: the caller passes the time)."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def wait_s(self, now: float) -> float:
        """Take one token; the seconds to wait before using it (0: at once)."""
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate) - 1.0
        self._stamp = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate


@dataclass(frozen=True, slots=True)
class ConnectFacts:
    """What the gate read in the CONNECT (amqtt parses the same bytes again)."""

    client_id: str
    clean_session: bool
    keepalive: int
    username: str | None
    will_topic: str | None


class _Fields:
    """A cursor over one packet's body; running past its end is a malformed packet."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ProtocolViolation("a field runs past the packet's remaining length", "section 2.2.3, 4.8")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self._take(2), "big")

    def binary(self) -> bytes:
        return self._take(self.u16())

    def text(self, what: str) -> str:
        raw = self.binary()
        try:
            value = raw.decode("utf-8")  # strict: refuses overlong forms and surrogates too
        except UnicodeDecodeError:
            raise ProtocolViolation(f"{what} is not well-formed UTF-8", "MQTT-1.5.3-1") from None
        if "\x00" in value:
            raise ProtocolViolation(f"{what} contains U+0000", "MQTT-1.5.3-2")
        return value

    @property
    def done(self) -> bool:
        return self.pos == len(self.data)


def check_connect(body: bytes, limits: WireLimits) -> ConnectFacts:
    """Section 3.1: a whole CONNECT body; raises ProtocolViolation / ConnectRefused."""
    fields = _Fields(body)
    name = fields.text("protocol name")
    level = fields.u8()
    if name == "MQIsdp":
        raise ConnectRefused(UNACCEPTABLE_PROTOCOL_VERSION, "MQTT 3.1 (MQIsdp) is not supported", "MQTT-3.1.2-2")
    if name != "MQTT":
        raise ProtocolViolation(f"protocol name {name!r}", "MQTT-3.1.2-1")
    if level != 4:
        raise ConnectRefused(UNACCEPTABLE_PROTOCOL_VERSION, f"protocol level {level} (only 4)", "MQTT-3.1.2-2")
    flags = fields.u8()
    keepalive = fields.u16()
    _check_connect_flags(flags)
    will, has_username, has_password = bool(flags & 0x04), bool(flags & 0x80), bool(flags & 0x40)
    client_id = fields.text("client id")  # [MQTT-3.1.3-4]
    will_topic = None
    if will:
        # [MQTT-3.1.2-9]: the will topic and message MUST be present; the will topic
        # is published like a PUBLISH topic name, so it must be one (section 4.7.3).
        will_topic = fields.text("will topic")
        if not is_valid_topic_name(will_topic):
            raise ProtocolViolation(f"will topic {will_topic!r} is empty or has a wildcard", "MQTT-3.1.2-9, 4.7.3-1")
        fields.binary()  # will message
    username = fields.text("user name") if has_username else None  # [MQTT-3.1.3-11]
    if has_password:
        fields.binary()
    if not fields.done:
        raise ProtocolViolation("bytes after the last field the CONNECT flags announce", "section 3.1.3, 4.8")
    if not client_id and not (flags & 0x02):
        raise ConnectRefused(IDENTIFIER_REJECTED, "empty client id with clean_session=0", "MQTT-3.1.3-8")
    _check_keepalive(keepalive, limits)
    return ConnectFacts(client_id, bool(flags & 0x02), keepalive, username, will_topic)


def _check_connect_flags(flags: int) -> None:
    """Section 3.1.2.3: the connect flags byte."""
    if flags & 0x01:
        raise ProtocolViolation("CONNECT reserved flag is set", "MQTT-3.1.2-3")
    will, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    if not will and will_qos:
        raise ProtocolViolation("will QoS without will flag", "MQTT-3.1.2-13")
    if not will and will_retain:
        raise ProtocolViolation("will retain without will flag", "MQTT-3.1.2-15")
    if will_qos == 3:
        raise ProtocolViolation("will QoS 3", "MQTT-3.1.2-14")
    if flags & 0x40 and not flags & 0x80:
        raise ProtocolViolation("password flag without user name flag", "MQTT-3.1.2-22")


def _check_keepalive(keepalive: int, limits: WireLimits) -> None:
    # MQTT 3.1.1 has no way for a server to impose another keepalive (MQTT 5 has
    # "server keep alive"), and enforcing a shorter one than the client's would drop
    # well-behaved clients, a longer one breaks [MQTT-3.1.2-24]. So a value outside
    # the configured bounds is refused, with 0x02 like mosquitto's max_keepalive.
    if keepalive == 0:
        if limits.keepalive_max_s < NO_KEEPALIVE_LIMIT:
            raise ConnectRefused(IDENTIFIER_REJECTED, "keepalive 0 (never time out) exceeds mqtt.keepalive_max_s",
                                 "section 3.1.2.10")
        return
    if keepalive > limits.keepalive_max_s or keepalive < limits.keepalive_min_s:
        raise ConnectRefused(
            IDENTIFIER_REJECTED,
            f"keepalive {keepalive}s outside mqtt.keepalive_min_s..keepalive_max_s "
            f"({limits.keepalive_min_s}..{limits.keepalive_max_s})",
            "section 3.1.2.10",
        )


def check_packet(first: int, body: bytes) -> None:
    """Any packet after CONNECT (section 2.2 fixed header, section 3 per type)."""
    kind, flags = first >> 4, first & 0x0F
    if kind == PUBLISH:
        _check_publish(flags, body)
    elif kind in (PUBACK, PUBREC, PUBCOMP, PUBREL):
        expected = 0x02 if kind == PUBREL else 0x00
        if flags != expected:
            raise ProtocolViolation(f"packet type {kind} with flags {flags:#x}",
                                    "MQTT-3.6.1-1" if kind == PUBREL else "MQTT-2.2.2-2")
        if len(body) != 2:
            raise ProtocolViolation(f"packet type {kind} with remaining length {len(body)}, not 2", "section 3.4-3.7")
    elif kind == SUBSCRIBE:
        _check_subscribe(flags, body)
    elif kind == UNSUBSCRIBE:
        _check_unsubscribe(flags, body)
    elif kind in (PINGREQ, DISCONNECT):
        if flags or body:
            raise ProtocolViolation(f"packet type {kind} with flags or a body", "MQTT-2.2.2-2, section 3.12, 3.14")
    elif kind == CONNECT:
        raise ProtocolViolation("a second CONNECT", "MQTT-3.1.0-2")
    else:
        # CONNACK, SUBACK, UNSUBACK, PINGRESP go to clients only; 0 and 15 are reserved.
        raise ProtocolViolation(f"packet type {kind} is not one a client may send", "section 2.2.1, 4.8")


def _check_publish(flags: int, body: bytes) -> None:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolViolation("PUBLISH with QoS 3", "MQTT-3.3.1-4")
    if qos == 0 and flags & 0x08:
        raise ProtocolViolation("PUBLISH QoS 0 with DUP set", "MQTT-3.3.1-2")
    fields = _Fields(body)
    topic = fields.text("topic name")  # [MQTT-3.3.2-1]
    if not topic:
        raise ProtocolViolation("empty topic name", "MQTT-4.7.3-1")
    if "+" in topic or "#" in topic:
        raise ProtocolViolation(f"wildcard in topic name {topic!r}", "MQTT-3.3.2-2")
    if qos and fields.u16() == 0:
        raise ProtocolViolation("packet identifier 0", "MQTT-2.3.1-1")


def _check_subscribe(flags: int, body: bytes) -> None:
    if flags != 0x02:
        raise ProtocolViolation(f"SUBSCRIBE with flags {flags:#x}", "MQTT-3.8.1-1")
    fields = _Fields(body)
    if fields.u16() == 0:
        raise ProtocolViolation("packet identifier 0", "MQTT-2.3.1-1")
    count = 0
    while not fields.done:
        topic_filter = fields.text("topic filter")  # [MQTT-3.8.3-1]
        if not topic_filter:
            raise ProtocolViolation("empty topic filter", "MQTT-4.7.3-1")
        options = fields.u8()
        if options & 0xFC or options & 0x03 == 3:
            raise ProtocolViolation(f"requested QoS byte {options:#x}", "MQTT-3-8.3-4")
        count += 1
    if not count:
        raise ProtocolViolation("SUBSCRIBE without a topic filter", "MQTT-3.8.3-3")


def _check_unsubscribe(flags: int, body: bytes) -> None:
    if flags != 0x02:
        raise ProtocolViolation(f"UNSUBSCRIBE with flags {flags:#x}", "MQTT-3.10.1-1")
    fields = _Fields(body)
    if fields.u16() == 0:
        raise ProtocolViolation("packet identifier 0", "MQTT-2.3.1-1")
    count = 0
    while not fields.done:
        if not fields.text("topic filter"):
            raise ProtocolViolation("empty topic filter", "MQTT-4.7.3-1")
        count += 1
    if not count:
        raise ProtocolViolation("UNSUBSCRIBE without a topic filter", "MQTT-3.10.3-2")


class PacketGate(ReaderAdapter):
    """A reader that hands amqtt only whole, checked packets.

    Use: ``gate = PacketGate(reader, limits, "host:port", writer)`` in place of the
    connection's reader. ``gate.connect`` holds the checked CONNECT once read.
    The end of the stream surfaces as amqtt expects it (``IncompleteReadError``,
    turned into ``NoDataError`` by amqtt's ``read_or_raise``).
    """

    def __init__(
        self, inner: ReaderAdapter, limits: WireLimits, peer: str, writer: WriterAdapter | None = None
    ) -> None:
        self._inner = inner
        # TCP/TLS: the asyncio StreamReader itself, so that an idle connection waits in one frame less.
        self._stream: asyncio.StreamReader | None = inner._reader if isinstance(inner, StreamReaderAdapter) else None
        self._limits = limits
        self.peer = peer
        self._writer = writer
        self._buffer = b""
        self._pos = 0
        self.connect: ConnectFacts | None = None
        self._pacer: Pacer | None = None
        self.last_read = asyncio.get_running_loop().time()
        """Loop time at which the last whole packet was read (the keepalive watch, broker/handler.py)."""

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            if self._pos >= len(self._buffer):
                await self.next_packet()
            n = len(self._buffer) - self._pos
        while len(self._buffer) - self._pos < n:
            await self.next_packet()
        data = self._buffer[self._pos:self._pos + n]
        self._pos += n
        return data

    def buffered(self) -> int:
        """Bytes of read packets not handed out yet."""
        return len(self._buffer) - self._pos

    async def next_packet(self) -> None:
        """Read the next whole packet into the buffer (``read`` then takes it without waiting).

        Raises ``asyncio.IncompleteReadError`` at the end of the stream, ``ProtocolViolation``
        for a bad packet. The lean reader loop (broker/handler.py) waits here while a
        connection is idle: a chain of four coroutine frames, not amqtt's eleven.
        """
        first = await (self._stream.readexactly(1) if self._stream is not None else self._exactly(1))
        await self._backpressure()
        loop = asyncio.get_running_loop()
        # A started packet is buffered until it is whole: it may not sit there for good. The
        # deadline is watched by the connection's SilenceWatch (broker/silence.py), not by a
        # timer per packet (~10 us each); before CONNECT, the connect timeout bounds it.
        self._packet_started = loop.time()
        try:
            packet = await self._read_packet(first)
        except ProtocolViolation as exc:
            log.info("%s: closing the connection: %s", self.peer, exc)
            raise
        finally:
            self._packet_started = math.inf
        self.last_read = loop.time()
        if packet[0] >> 4 == PUBLISH and self._limits.publishes_per_s > 0:
            await self._pace()
        rest = self._buffer[self._pos:]
        self._buffer = rest + packet if rest else packet
        self._pos = 0

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    _packet_started = math.inf  # loop time of the first byte of a packet being read (inf: none)

    def packet_overdue_at(self) -> float:
        """Loop time from which the packet being read is overdue (``math.inf``: none is being read)."""
        return self._packet_started + self._limits.packet_deadline_s

    unacked_over: Callable[[], bool] | None = None
    """Set by the broker: True while the connection leaves too many deliveries without PUBACK."""

    async def _backpressure(self) -> None:
        """A client that does not read what it is sent is not read either.

        The chat paths write without awaiting a drain (broker/downlink.py); without
        this a client publishing without reading would grow the broker's write
        buffer for it without bound.
        """
        if self._writer is not None:
            try:
                await wait_writable(self._writer)
            except ConnectionError:
                raise asyncio.IncompleteReadError(b"", 1) from None  # the end of the connection, as amqtt expects
        if self.unacked_over is not None and self.unacked_over():
            # Its answers are no longer written (broker/downlink.py MAX_CHAT_INFLIGHT): read it slowly, but
            # at all: its PUBACKs may be queued behind its own publishes, and they end the state.
            await asyncio.sleep(OVER_UNACKED_READ_S)

    async def _pace(self) -> None:
        """Stop reading a connection that publishes faster than ``publishes_per_s`` for a moment: TCP pushes
        back on the client, and the broker's CPU stays with everyone else (tests/chaos, slow consumers)."""
        now = asyncio.get_running_loop().time()
        if self._pacer is None:
            self._pacer = Pacer(self._limits.publishes_per_s, self._limits.publish_burst, now)
        delay = self._pacer.wait_s(now)
        if delay > 0:
            await asyncio.sleep(delay)

    async def _exactly(self, n: int) -> bytes:
        data = await self._inner.read(n)
        if len(data) < n:  # the WebSocket reader returns short at the end instead of raising
            raise asyncio.IncompleteReadError(data, n)
        return data

    async def _read_packet(self, head: bytes) -> bytes:
        """The rest of the packet whose first byte is ``head``, checked."""
        first = head[0]
        if self.connect is None and first != CONNECT_BYTE:
            # Refused on its first byte: nothing more is read from a client that did
            # not start with CONNECT [MQTT-3.1.0-1] (a CONNECT has flags 0, MQTT-2.2.2-2).
            raise ProtocolViolation(f"first packet is type {first >> 4}, not CONNECT", "MQTT-3.1.0-1")
        length, multiplier = 0, 1
        for _ in range(4):  # section 2.2.3: at most four bytes
            digit = (await self._exactly(1))[0]
            head += bytes((digit,))
            length += (digit & 0x7F) * multiplier
            if not digit & 0x80:
                break
            multiplier *= 128
        else:
            raise ProtocolViolation("remaining length longer than four bytes", "section 2.2.3")
        if self.connect is None and len(head) + length > self._limits.max_connect_bytes:
            # Before authentication, a client may make the broker buffer only this much.
            raise ProtocolViolation(
                f"CONNECT of {len(head) + length} bytes exceeds mqtt.max_connect_bytes "
                f"({self._limits.max_connect_bytes})",
                "section 2.2.3, mqtt.max_connect_bytes",
            )
        if len(head) + length > self._limits.max_packet_bytes:
            raise ProtocolViolation(
                f"packet of {len(head) + length} bytes exceeds mqtt.max_packet_bytes ({self._limits.max_packet_bytes})",
                "section 2.2.3, mqtt.max_packet_bytes",
            )
        body = await self._exactly(length) if length else b""
        if self.connect is None:
            self.connect = check_connect(body, self._limits)
        else:
            check_packet(first, body)
        return head + body
