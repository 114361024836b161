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

The checks are the sans-IO core's (broker/mqtt/codec.py, broker/mqtt/connection.py), read
here from amqtt's stream; each cites its rule, and the conformance tests in tests/mqtt/ cite
the same.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, WriterAdapter

from broker.downlink import wait_writable
from broker.mqtt.codec import CONNECT_BYTE, FROM_CLIENT, PUBLISH, check_first_byte, check_size, decode
from broker.mqtt.connection import check_keepalive
from broker.mqtt.errors import ProtocolViolation
from broker.mqtt.events import Connect
from broker.mqtt.limits import WireLimits
from broker.pacing import Pacer

log = logging.getLogger(__name__)

OVER_UNACKED_READ_S = 0.05
"""Pause before each packet read from a connection over ``limits.max_unacked_downlinks``."""


def check_connect(body: bytes, limits: WireLimits) -> Connect:
    """Section 3.1: a whole CONNECT body; raises ProtocolViolation / ConnectRefused."""
    connect = decode(CONNECT_BYTE, body, 0, len(body))
    assert isinstance(connect, Connect)  # decode gives the packet of the type it was given
    check_keepalive(connect.keepalive, limits)
    return connect


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
        self.connect: Connect | None = None
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
        """The rest of the packet whose first byte is ``head``, checked (broker/mqtt/codec.py: the same rules
        as the sans-IO core's)."""
        first = head[0]
        # A first packet that is not CONNECT is refused on its first byte [MQTT-3.1.0-1], a type or flags a
        # client may not send too: nothing more is read.
        check_first_byte(first, FROM_CLIENT if self.connect is not None else None)
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
        if self.connect is None:  # before authentication, a client may make the broker buffer only this much
            check_size(len(head) + length, self._limits.max_connect_bytes, "mqtt.max_connect_bytes")
        check_size(len(head) + length, self._limits.max_packet_bytes, "mqtt.max_packet_bytes")
        body = await self._exactly(length) if length else b""
        if self.connect is None:
            self.connect = check_connect(body, self._limits)
        else:
            decode(first, body, 0, len(body))
        return head + body
