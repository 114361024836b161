"""Chat downlink without a task per item: PUBLISH bytes written straight to the socket.

amqtt sends every outgoing PUBLISH through ``mqtt_publish``: a Task, a write lock,
a ``drain`` and a 5 s ``wait_for`` on the PUBACK, per item (the profile in
bench/results/analysis.md puts that at a third of the broker's CPU per message).
A chat item needs none of it: the bridge's staging store, not the MQTT session,
redelivers what a device has not acked (PROTOCOL.md rule 5), so the PUBACK only
has to free its packet id. Here ``DownlinkWriter.send`` takes the encoded PUBLISH (broker/mqtt/encoding.py),
appends it to a per-connection buffer and writes the buffer once per event-loop
iteration (one ``send()`` for a burst such as a backlog window), in call order.

Only byte-stream transports (TCP, TLS) take this path; a WebSocket writer needs an
awaited ``drain`` per frame, so those connections keep amqtt's path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from amqtt.adapters import StreamWriterAdapter, WriterAdapter

from broker.counters import BrokerCounters
from broker.mqtt.codec import MAX_PACKET_ID

WRITE_BUFFER_HIGH = 256 * 1024
"""Bytes waiting to go to a client above which its connection is not read until they have gone."""

UNREAD_DOWNLINK_MAX = 1024 * 1024
"""Default of ``limits.max_unread_downlink_bytes``: bytes waiting for a chat device that does not read (its
transport has paused writing) above which further downlinks to it are dropped, on the lean path
(broker/chat_session.py).

A QoS 1 inbox is bounded by ``limits.max_unacked_downlinks``; a QoS 0 one has no PUBACK to count, and
the bridge's window bounds only its staged items, not the ephemeral ones other users cause (``presence``,
``sent``, answers, errors) nor the window sent again every ``delivery.redeliver_after_s``: without a
bound a device that stopped reading let others grow the broker's memory for as long as it stayed
connected. 1 MiB is four times WRITE_BUFFER_HIGH and sixteen windows of 1 KiB messages: a device
that reads, even slowly, never reaches it; one that gets a window of the largest bodies
(``limits.max_body_bytes``) over a slow link may, and then gets the rest on redelivery. Dropping is
safe: a staged item stays staged and comes again (``delivery.redeliver_after_s``, or on the next
connection); an ephemeral one is best effort by the protocol (docs/PROTOCOL.md, section 3).
"""


async def wait_writable(writer: WriterAdapter) -> None:
    """Wait while more than WRITE_BUFFER_HIGH bytes wait to be sent to this client (TCP, TLS)."""
    if isinstance(writer, StreamWriterAdapter):
        stream = writer._writer  # amqtt's adapter over asyncio's StreamWriter: its buffer is the one that grows
        if stream.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
            await stream.drain()


CLOSE_FLUSH_S = 1.0
"""How long closing a connection waits for what is queued to reach the client before dropping it."""


async def close_writer(writer: WriterAdapter, flush_s: float = CLOSE_FLUSH_S) -> None:
    """Close the connection under ``writer``, flushing what is queued for at most ``flush_s``.

    amqtt's ``close`` waits for the client to read everything queued first: a client that
    stopped reading and then closed its side kept its connection (CLOSE-WAIT, megabytes
    queued) until its keepalive ran out. Past ``flush_s`` the rest is dropped (abort).
    And when its drain raised (the peer had gone), amqtt's ``close`` marked the adapter
    closed without closing the socket: the descriptor stayed open for good (on Python
    3.12+ ``Server.wait_closed`` then waited for it at shutdown). Here the transport is
    closed whatever happens, also when a close of amqtt's went that way before.
    """
    if not isinstance(writer, StreamWriterAdapter):
        await writer.close()
        return
    writer.is_closed = True  # no more writes through amqtt's adapter (uvloop raises on a closed transport)
    stream = writer._writer
    transport = stream.transport
    if transport.is_closing():
        return
    try:
        await asyncio.wait_for(stream.drain(), flush_s)
    except (TimeoutError, ConnectionError):
        transport.abort()  # the client stopped reading, or is gone: drop what is queued
        return
    except BaseException:
        transport.abort()
        raise
    if stream.can_write_eof():
        try:
            stream.write_eof()
        except OSError:
            transport.abort()
            return
    transport.close()


def closing(writer: WriterAdapter) -> bool:
    """True once the connection under ``writer`` is closed or closing (by either side)."""
    if isinstance(writer, StreamWriterAdapter):
        return writer.is_closed or writer._writer.transport.is_closing()
    return False


def streams_bytes(writer: WriterAdapter | None) -> bool:
    """True if ``writer`` sends what is written without an awaited drain (TCP and TLS streams)."""
    return isinstance(writer, StreamWriterAdapter)


MAX_CHAT_INFLIGHT = 8192
"""Chat downlinks one connection may leave without PUBACK (``limits.max_unacked_downlinks``);
beyond, further ones are dropped.

An honest client acknowledges within a round trip (the SDK's paho does it in its
network thread). Such a connection is also read slowly (broker/wire.py) until it
acknowledges. One that publishes faster than the broker reads it has its PUBACKs
queued behind its own publishes, and one that never acknowledges keeps every id:
without a cap the id search below grew to 65,535 probes per item, the broker's CPU
went to that client and honest devices could not log in (tests/chaos, slow
consumers). What is dropped is never lost: a staged item stays unacked and is
redelivered (``delivery.redeliver_after_s``); an ephemeral item (``sent``, an
``error``) is best effort by the protocol and the SDK re-sends what was not confirmed.
"""


@dataclass(frozen=True, slots=True)
class DownlinkPolicy:
    """One per broker, shared by its chat connections: the cap, and where drops are counted."""

    max_unacked: int = MAX_CHAT_INFLIGHT
    counters: BrokerCounters | None = None


class PacketIds:
    """Chat downlink packet ids, drawn from the session's own counter [MQTT-2.3.1-2].

    ``next_id`` is amqtt's ``Session.next_packet_id``, which skips ids amqtt has in
    flight; this skips the chat ids still unacknowledged, of which there are at most
    ``limit`` (``take`` gives None beyond), so the search stays short.
    """

    def __init__(self, next_id: Callable[[], int], limit: int = MAX_CHAT_INFLIGHT) -> None:
        self._next_id = next_id
        self._limit = limit
        self.inflight: set[int] = set()

    @property
    def full(self) -> bool:
        return len(self.inflight) >= self._limit

    def take(self) -> int | None:
        """A free id, or None while ``limit`` chat downlinks are unacknowledged (or no id is free)."""
        if self.full:
            return None
        for _ in range(MAX_PACKET_ID):
            packet_id = self._next_id()
            if packet_id not in self.inflight:
                self.inflight.add(packet_id)
                return packet_id
        return None

    def release(self, packet_id: int) -> bool:
        """The client acknowledged ``packet_id``; False if it was not a chat downlink id."""
        if packet_id in self.inflight:
            self.inflight.discard(packet_id)
            return True
        return False


class DownlinkWriter:
    """Buffers encoded packets for one connection and writes them once per loop iteration."""

    def __init__(self, writer: WriterAdapter, loop: asyncio.AbstractEventLoop) -> None:
        self._writer = writer
        self._loop = loop
        self._buffer: list[bytes] = []

    def writes_to(self, writer: WriterAdapter | None) -> bool:
        return writer is self._writer

    def write(self, packet: bytes) -> None:
        if not self._buffer:
            self._loop.call_soon(self._flush)
        self._buffer.append(packet)

    def _flush(self) -> None:
        data, self._buffer = b"".join(self._buffer), []
        # A connection closed since the write drops the bytes (uvloop raises on a write to a closed
        # transport): the items stay staged and are redelivered on reconnect.
        if not closing(self._writer):
            self._writer.write(data)
