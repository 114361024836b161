"""Chat downlink without a task per item: PUBLISH bytes written straight to the socket.

amqtt sends every outgoing PUBLISH through ``mqtt_publish``: a Task, a write lock,
a ``drain`` and a 5 s ``wait_for`` on the PUBACK, per item (the profile in
bench/results/analysis.md puts that at a third of the broker's CPU per message).
A chat item needs none of it: the bridge's staging store, not the MQTT session,
redelivers what a device has not acked (PROTOCOL.md rule 5), so the PUBACK only
has to free its packet id. Here ``DownlinkWriter.send`` encodes the PUBLISH,
appends it to a per-connection buffer and writes the buffer once per event-loop
iteration (one ``send()`` for a burst such as a backlog window), in call order.

Only byte-stream transports (TCP, TLS) take this path; a WebSocket writer needs an
awaited ``drain`` per frame, so those connections keep amqtt's path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from amqtt.adapters import StreamWriterAdapter, WriterAdapter

PUBLISH = 0x30
PUBACK = 0x40
MAX_PACKET_ID = 65535


def remaining_length(size: int) -> bytes:
    """MQTT 3.1.1 section 2.2.3: the variable-length size of what follows the fixed header."""
    out = bytearray()
    while True:
        size, digit = divmod(size, 128)
        out.append(digit | 0x80 if size else digit)
        if not size:
            return bytes(out)


def encode_publish(topic: bytes, payload: bytes, qos: int, packet_id: int | None) -> bytes:
    """A PUBLISH packet (DUP 0, RETAIN 0) with a UTF-8 ``topic`` and ``packet_id`` when ``qos`` > 0."""
    variable = len(topic).to_bytes(2, "big") + topic
    if qos:
        if packet_id is None:
            raise ValueError("a QoS 1/2 PUBLISH needs a packet id")
        variable += packet_id.to_bytes(2, "big")
    return bytes((PUBLISH | qos << 1,)) + remaining_length(len(variable) + len(payload)) + variable + payload


def encode_puback(packet_id: int) -> bytes:
    return bytes((PUBACK, 2)) + packet_id.to_bytes(2, "big")


WRITE_BUFFER_HIGH = 256 * 1024
"""Bytes waiting to go to a client above which its connection is not read until they have gone."""


async def wait_writable(writer: WriterAdapter) -> None:
    """Wait while more than WRITE_BUFFER_HIGH bytes wait to be sent to this client (TCP, TLS)."""
    if isinstance(writer, StreamWriterAdapter):
        stream = writer._writer  # amqtt's adapter over asyncio's StreamWriter: its buffer is the one that grows
        if stream.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
            await stream.drain()


def streams_bytes(writer: WriterAdapter | None) -> bool:
    """True if ``writer`` sends what is written without an awaited drain (TCP and TLS streams)."""
    return isinstance(writer, StreamWriterAdapter)


class PacketIds:
    """Chat downlink packet ids, drawn from the session's own counter [MQTT-2.3.1-2].

    ``next_id`` is amqtt's ``Session.next_packet_id``, which skips ids amqtt has in
    flight; this skips the chat ids still unacknowledged. amqtt's counter does not
    know the chat ids, so it could hand one out only after 65,535 further ids while
    that chat item is still unacked (a client that never sends PUBACK): the cost is
    that client's own confusion, nobody else's.
    """

    def __init__(self, next_id: Callable[[], int]) -> None:
        self._next_id = next_id
        self.inflight: set[int] = set()

    def take(self) -> int:
        for _ in range(MAX_PACKET_ID):
            packet_id = self._next_id()
            if packet_id not in self.inflight:
                self.inflight.add(packet_id)
                return packet_id
        raise RuntimeError("no free packet id: 65535 messages in flight")

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
        # A closed writer drops the bytes: the items stay staged and are redelivered on reconnect.
        self._writer.write(data)
