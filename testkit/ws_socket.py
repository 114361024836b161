"""MQTT over WebSocket by hand: a socket-like client connection for the raw-packet tests.

``WsSocket`` does the upgrade on ``/mqtt`` with subprotocol ``mqtt`` (websockets' sans-IO
``ClientProtocol``), then ``sendall`` sends its bytes as one binary frame and ``recv`` returns the
payload of the broker's binary frames, b"" once the broker closes (a close frame or EOF). So
``RawClient`` (testkit/packets.py) speaks the same packets over WebSocket. ``sock`` is the TCP socket
itself, for tests that write frames by hand (``frame``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import time

from websockets.client import ClientProtocol
from websockets.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PONG, Close, Frame
from websockets.http11 import Response
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

WAIT_S = 10.0
READ_BYTES = 65536


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 section 5.2), built by hand so tests can break it on purpose."""
    mask = os.urandom(4)
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class WsSocket:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = WAIT_S,
                 tls: ssl.SSLContext | None = None) -> None:
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
        scheme = "wss" if tls is not None else "ws"
        self.ws = ClientProtocol(parse_uri(f"{scheme}://{host}:{port}/mqtt"), subprotocols=[Subprotocol("mqtt")])
        self.ws.send_request(self.ws.connect())
        self._flush()
        self._buffer = bytearray()
        self._ended = False
        self._open = False
        self.close_code: int | None = None
        """The code of the broker's close frame, once one came."""
        self.pongs: list[bytes] = []
        deadline = time.monotonic() + timeout
        while not self._open:
            if self._ended:
                raise ConnectionError("closed during the WebSocket upgrade")
            self.settimeout(max(deadline - time.monotonic(), 0.001))
            self._read()
        self.settimeout(timeout)

    def _read(self) -> None:
        self._feed(self.sock.recv(READ_BYTES))
        with contextlib.suppress(OSError):  # a close frame echoed to a broker that has closed
            self._flush()
        for event in self.ws.events_received():
            if isinstance(event, Response):
                if event.status_code != 101 or self.ws.handshake_exc is not None:
                    raise ConnectionError(f"WebSocket upgrade refused: {event.status_code}")
                self._open = True
            elif isinstance(event, Frame) and event.opcode in (OP_BINARY, OP_CONT):
                self._buffer += event.data
            elif isinstance(event, Frame) and event.opcode is OP_PONG:
                self.pongs.append(bytes(event.data))
            elif isinstance(event, Frame) and event.opcode is OP_CLOSE:
                self._ended = True
                self.close_code = Close.parse(bytes(event.data)).code

    def _feed(self, data: bytes) -> None:
        if data:
            self.ws.receive_data(data)
        else:
            self.ws.receive_eof()
            self._ended = True

    def _flush(self) -> None:
        for data in self.ws.data_to_send():
            if data:
                self.sock.sendall(data)

    def sendall(self, data: bytes) -> None:
        self.ws.send_binary(data)
        self._flush()

    def recv(self, n: int) -> bytes:
        while not self._buffer and not self._ended:
            self._read()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.sock.setsockopt(level, option, value)

    def close(self) -> None:
        self.sock.close()
