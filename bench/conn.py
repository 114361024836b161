"""One load-generator MQTT client connection (``Conn``: an ``asyncio.Protocol`` that parses MQTT 3.1.1 itself
and gathers its writes per loop iteration), and each dialect's credentials and topics. The worker
processes that hold many of them are in bench/loadgen.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from bench.common import (
    DISCONNECT_BYTES,
    BenchError,
    ack_publish,
    publish_packet,
    publish_parts,
    split_packets,
    subscribe_packet,
)
from bench.users import DEVICE, token_for

if TYPE_CHECKING:
    from bench.loadgen import Worker

perf = time.perf_counter


# --- one connection ----------------------------------------------------------------------------------


class Conn(asyncio.Protocol):
    """One MQTT client connection with one subscription (its QoS: ``chat`` below)."""

    def __init__(self, worker: Worker, user: str, connect: bytes, topic_in: str, chat: bool,
                 pipelined: bool = False) -> None:
        """``connect``: the CONNECT packet (``connect_packet``), made before: a login storm measures the broker.
        ``pipelined``: SUBSCRIBE goes with the CONNECT (MQTT 3.1.4 lets a client send before its CONNACK);
        otherwise after the CONNACK, as paho does. ``chat``: the inbox at QoS 0 and acks at QoS 0
        (PROTOCOL.md section 3); otherwise QoS 1 both ways."""
        self.worker = worker
        self.user = user
        self._subscribe = subscribe_packet(1, topic_in, 0 if chat else 1)
        self._connect = connect + self._subscribe if pipelined else connect
        self._pipelined = pipelined
        self._topic_in = topic_in
        self.connacked = 0.0  # when the CONNACK came (perf_counter)
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._wbuf: list[bytes] = []
        self._flush_scheduled = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._next_pid = 1
        self.puback_wait: dict[int, float] = {}
        self.last_tx = time.monotonic()
        self.closed = False
        self.on_message: Callable[[Conn, bytes], None] = _ignore
        self.seqs: list[int] = []  # chat: seqs to ack at the end of this read
        self.out_topic = f"u/{user}/out".encode() if chat else b""
        self._ack_topic = f"u/{user}/ack".encode() if chat else None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        self.send(self._connect)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.user}: connection lost before SUBACK ({exc!r})"))
        self.worker.lost += 1

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        found, pos = split_packets(buf)
        for first, i, end in found:
            kind = first >> 4
            if kind == 3:  # PUBLISH
                packet_id, payload = publish_parts(buf, first, i, end)
                if packet_id:
                    self.send(b"\x40\x02" + packet_id)
                self.on_message(self, payload)
            elif kind == 4:  # PUBACK
                sent = self.puback_wait.pop((buf[i] << 8) | buf[i + 1], None)
                if sent is not None:
                    self.worker.record_puback(sent)
            elif kind == 2:  # CONNACK
                code = buf[i + 1]
                self.connacked = perf()
                if code != 0:
                    self._fail(f"{self.user}: CONNACK return code {code}")
                elif not self._pipelined:
                    self.send(self._subscribe)
            elif kind == 9 and not self.ready.done():  # SUBACK
                if buf[i + 2:end] in (b"\x01", b"\x00"):
                    self.ready.set_result(None)
                else:
                    self._fail(f"{self.user}: SUBACK {buf[i + 2:end].hex()} for {self._topic_in}")
        self._buf = buf[pos:] if pos < len(buf) else b""
        if self.seqs:
            seqs = ",".join(map(str, self.seqs)).encode()
            self.send(ack_publish(self._ack_topic or b"", b'{"seqs":[' + seqs + b"]}"))
            self.seqs.clear()

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(BenchError(reason))
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes) -> None:
        self._wbuf.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.transport is not None and not self.closed:
            self.transport.write(b"".join(self._wbuf) if len(self._wbuf) > 1 else self._wbuf[0])
            self.last_tx = time.monotonic()
        self._wbuf.clear()

    def publish(self, topic: bytes, payload: bytes, track_puback: bool = False) -> None:
        pid = self._next_pid
        self._next_pid = pid % 65535 + 1
        if track_puback:
            self.puback_wait[pid] = perf()
        self.send(publish_packet(topic, pid, payload))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            with contextlib.suppress(Exception):
                self.transport.write(DISCONNECT_BYTES)
            self.transport.close()
        self.closed = True


def _ignore(conn: Conn, payload: bytes) -> None:
    pass


# --- credentials and topics per dialect ---------------------------------------------------------------


def identity(dialect: str, user: str) -> tuple[str, str | None, str | None, str]:
    """(client id, username, password, inbox topic) of a bench user."""
    if dialect == "chat":
        return f"{user}.{DEVICE}", user, token_for(user), f"u/{user}/in"
    return user, None, None, f"bench/{user}"


def message_parts(dialect: str, sender: str, recipient: str, body_bytes: int) -> tuple[bytes, bytes, bytes]:
    """(topic, payload prefix, payload suffix): payload = prefix + message id + suffix."""
    body = ("x" * body_bytes).encode()
    prefix = b'{"id":"'
    suffix = b'","to":"' + recipient.encode() + b'","type":"text","body":"' + body + b'"}'
    topic = f"u/{sender}/out" if dialect == "chat" else f"bench/{recipient}"
    return topic.encode(), prefix, suffix
