"""WebSocket listeners on the lean path: the WebSocket layer of one connection, as one object.

``WsLink`` is the ``asyncio.Protocol`` of the socket: it speaks WebSocket with websockets' sans-IO
``ServerProtocol`` (bytes in, handshake and frames out; no task, no queue). Once the upgrade is
accepted it makes the connection's ``ChatSession`` and is *its transport*: the session reads the
payload of the binary frames as the MQTT byte stream and its writes go out as binary frames. A
session whose CONNECT is no chat device is handed to amqtt as on tcp (``LeanSessions._hand_off``):
``set_protocol`` swaps the stream protocol in above the same WebSocket layer, so amqtt serves it as a
plain MQTT stream. So one object per connection holds the WebSocket layer, one the MQTT session.

What it keeps of the ws listener on amqtt's path (``websockets.serve``, broker/server.py):

- the upgrade on ``/mqtt`` only (HTTP 404 otherwise, ``front.mqtt_path_refusal``), subprotocol
  ``mqtt`` (a request without it gets HTTP 400), websockets' own request checks and limits (8 KiB
  per line, 128 headers), the handshake within ``connect_timeout_s`` (websockets' ``open_timeout``
  is the same 10 s by default) or the socket is dropped; here also at most ``MAX_UPGRADE_BYTES``;
- ``forwarded_for``: the handshake completes, then a peer that is no trusted proxy, or names no
  client, is closed with 1008 (``front.forwarded_address``); the client it names is the session's peer;
- messages of at most ``WS_MAX_MESSAGE`` (1009 otherwise), pings answered, the close handshake
  echoed; the MQTT session's end sends a 1000 close frame.

Where it differs: no permessage-deflate (the chat payloads are end-to-end encrypted, so it would not
pay, and it is a decompression bomb to guard), no server pings (MQTT's keepalive is the liveness
check: a proxy with an idle timeout needs a keepalive under it), and a text frame is closed with
1003, as [MQTT-6.0.0-1] says (amqtt's path reads it as bytes). Backpressure is the socket's: the
session's ``pause_reading`` pauses the socket, and the socket's ``pause_writing`` reaches the session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from broker.counters import BrokerCounters
from broker.downlink import CLOSE_FLUSH_S
from broker.front import WS_MAX_MESSAGE, WS_SUBPROTOCOL, forwarded_address, mqtt_path_refusal
from broker.logs import WS_LOG
from broker.proxy_protocol import Address, TrustedProxies

log = logging.getLogger(__name__)

MAX_UPGRADE_BYTES = 32 * 1024
"""The upgrade request and anything sent with it: websockets alone allows 128 headers of 8 KiB (1 MiB held
for the deadline). A browser's, cookies included, is a few KiB."""

SessionFactory = Callable[[Address | None], asyncio.Protocol]
"""The forwarded client (None: the socket's peer) -> the connection's MQTT session."""


@dataclass(frozen=True, slots=True)
class WsListener:
    """What every connection of one ws/wss listener shares."""

    name: str
    session: SessionFactory
    trusted: TrustedProxies | None
    """``forwarded_for``: the proxies that may name the client (None: the socket's peer is the client)."""
    handshake_s: float
    counters: BrokerCounters


class WsLink(asyncio.Protocol, asyncio.Transport):
    """The socket's protocol, and the transport of the MQTT session above it."""

    __slots__ = ("_closing", "_inner", "_listener", "_sock", "_timer", "_upgrade_bytes", "_ws")

    def __init__(self, listener: WsListener) -> None:
        # asyncio.BaseTransport's __init__ is not called: its ``_extra`` dict would go unused.
        self._listener = listener
        self._sock: asyncio.Transport | None = None
        self._ws = ServerProtocol(subprotocols=[WS_SUBPROTOCOL], max_size=WS_MAX_MESSAGE, logger=WS_LOG)
        self._inner: asyncio.Protocol | None = None  # the session, from the upgrade on
        self._timer: asyncio.TimerHandle | None = None  # the handshake's deadline
        self._upgrade_bytes = 0  # received before the upgrade was answered
        self._closing = False

    # --- the socket's side (asyncio.Protocol) -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sock = cast("asyncio.Transport", transport)  # uvloop's is no subclass
        self._timer = asyncio.get_running_loop().call_later(self._listener.handshake_s, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:  # the upgrade is not answered yet
            self._upgrade_bytes += len(data)
            if self._upgrade_bytes > MAX_UPGRADE_BYTES:
                log.info("%s: an upgrade request over %d bytes: closing", self._listener.name, MAX_UPGRADE_BYTES)
                self.abort()
                return
        self._ws.receive_data(data)
        self._received()

    def eof_received(self) -> bool:
        self._ws.receive_eof()
        self._received()
        # TCP: _sent closes it (websockets says when). TLS closes on its own (and warns if told otherwise).
        return self._sock is not None and self._sock.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:  # gone before its upgrade: a load balancer's TCP health check, say
            log.debug("%s: connection closed before the WebSocket handshake", self._listener.name)
            self._timer.cancel()
            self._timer = None
        self._closing = True
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # --- the WebSocket layer ----------------------------------------------------------------

    def _received(self) -> None:
        """Act on what websockets parsed: the upgrade request, then the binary frames' payload for the session."""
        payload: list[bytes | bytearray | memoryview] = []
        for event in self._ws.events_received():
            if isinstance(event, Request):
                self._upgrade(event)
            elif not isinstance(event, Frame) or self._inner is None:
                continue  # no Response comes to a server; after a refused upgrade websockets discards the rest
            elif event.opcode is Opcode.BINARY or event.opcode is Opcode.CONT:  # (a text message ends at its start)
                payload.append(event.data)
            elif event.opcode is Opcode.TEXT:
                log.info("%s: closing a WebSocket that sent a text frame [MQTT-6.0.0-1]", self._listener.name)
                self._ws.fail(CloseCode.UNSUPPORTED_DATA, "MQTT is sent in binary frames")
                break
        if payload and self._inner is not None and not self._closing:  # not after the session's end
            self._inner.data_received(b"".join(payload))  # one item: that bytes object itself
        self._sent()

    def _upgrade(self, request: Request) -> None:
        ws, listener = self._ws, self._listener
        response = mqtt_path_refusal(request) or ws.accept(request)
        ws.send_response(response)
        if response.status_code != 101:  # websockets ends the stream: _sent closes the socket
            log.debug("%s: WebSocket handshake refused: HTTP %d", listener.name, response.status_code)
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        client: Address | None = None
        if listener.trusted is not None:
            client = forwarded_address(self._peer(), request.headers, listener.trusted, listener.name)
            if client is None:
                listener.counters.refused_proxy += 1
                ws.send_close(CloseCode.POLICY_VIOLATION, "not through a trusted proxy")
                self._closing = True
                self._sent()  # the 101 and the close frame, then the socket closes
                self._close_socket()
                return
        # websockets' parse generator keeps the request in a local for the connection's life: its
        # headers, no longer needed, would be half of the WebSocket layer's memory (2.2 of 4.3 KiB).
        request.headers.clear()
        session = listener.session(client)
        self._inner = session
        session.connection_made(self)

    def _sent(self) -> None:
        """Write what websockets has to send; its end of stream (b"") ends the session, then the socket."""
        sock = self._sock
        for data in self._ws.data_to_send():
            if data:
                if sock is not None and not sock.is_closing():
                    sock.write(data)
            else:
                self._closing = True
                if self._inner is not None:
                    self._inner.eof_received()
                self._close_socket()

    def _close_socket(self) -> None:
        sock = self._sock
        if sock is None or sock.is_closing():
            return
        sock.close()  # after what is queued, for at most CLOSE_FLUSH_S
        if sock.get_write_buffer_size():
            asyncio.get_running_loop().call_later(CLOSE_FLUSH_S, sock.abort)

    def _too_slow(self) -> None:
        self._timer = None
        log.info("%s: no WebSocket upgrade within %.0fs: closing", self._listener.name, self._listener.handshake_s)
        if self._sock is not None:
            self._sock.abort()

    def _peer(self) -> str:
        peer = self._sock.get_extra_info("peername") if self._sock is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else ""

    # --- the session's side (asyncio.Transport) -------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._ws.state is not OPEN:
            return  # the WebSocket is closing: nothing more goes out
        self._ws.send_binary(bytes(data))
        self._sent()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # no half-close in WebSocket: close() ends it

    def close(self) -> None:
        """The session ends it: a close frame, then the socket closes after what is queued."""
        if self._closing:
            return
        self._closing = True
        if self._ws.state is OPEN:
            self._ws.send_close(CloseCode.NORMAL_CLOSURE)
        self._sent()
        self._close_socket()

    def abort(self) -> None:
        self._closing = True
        if self._sock is not None:
            self._sock.abort()

    def is_closing(self) -> bool:
        return self._closing or self._sock is None or self._sock.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._sock.get_extra_info(name, default) if self._sock is not None else default

    def pause_reading(self) -> None:
        if self._sock is not None:
            self._sock.pause_reading()

    def resume_reading(self) -> None:
        if self._sock is not None:
            self._sock.resume_reading()

    def is_reading(self) -> bool:
        return self._sock is not None and self._sock.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._sock is not None:
            self._sock.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._sock.get_write_buffer_size() if self._sock is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._sock.get_write_buffer_limits() if self._sock is not None else (0, 0)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """The session is handed to amqtt: its stream protocol reads from here on (``LeanSessions._hand_off``)."""
        if not isinstance(protocol, asyncio.Protocol):
            raise TypeError(f"a streaming protocol is needed, not {protocol!r}")
        self._inner = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner if self._inner is not None else self
