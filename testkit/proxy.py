"""A fault-injecting TCP proxy on 127.0.0.1 for tests: it understands MQTT packet boundaries.

Each client connection is relayed to the broker packet by packet. A test installs
a *rule*: a function of (direction, packet type, topic) that, when it returns
True, makes the proxy forward that packet and then cut the connection before any
further byte passes in either direction — exactly "between PUBLISH and its
answer". ``cut_all()`` drops every live connection at once.

Also (for tests/chaos and bench/chaos): ``stall()`` stops forwarding on every
live connection without closing it (half-open: no FIN, no RST; new connections
still flow) until ``resume()``; ``delay_s`` holds every packet that long (a slow
link); ``target_port`` may be changed while running (new connections go there).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

UP, DOWN = "client->broker", "broker->client"
PUBLISH = 3


@dataclass(frozen=True)
class Packet:
    direction: str
    kind: int
    topic: str | None
    data: bytes


Rule = Callable[[Packet], bool]


async def _read_packet(reader: asyncio.StreamReader) -> bytes:
    first = await reader.readexactly(1)
    length, multiplier, header = 0, 1, bytearray(first)
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        header.append(byte)
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    return bytes(header) + await reader.readexactly(length)


def _parse(direction: str, data: bytes) -> Packet:
    kind = data[0] >> 4
    topic = None
    if kind == PUBLISH:
        offset = 1
        while data[offset] & 0x80:
            offset += 1
        offset += 1
        size = int.from_bytes(data[offset:offset + 2], "big")
        topic = data[offset + 2:offset + 2 + size].decode("utf-8", "replace")
    return Packet(direction, kind, topic, data)


class MqttProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.rule: Rule | None = None
        self.cuts = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._live: set[asyncio.StreamWriter] = set()
        self._flowing: set[asyncio.Event] = set()  # one per live connection; cleared = stalled
        self.delay_s = 0.0
        self.stalls = 0
        self.port = 0

    def start(self) -> MqttProxy:
        self._thread.start()
        self.port = self._call(self._start())
        return self

    def _call(self, coro: object) -> int:
        future: Future[int] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return future.result(10)

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        self._live.update({client_writer, broker_writer})
        cut = asyncio.Event()
        flowing = asyncio.Event()
        flowing.set()
        self._flowing.add(flowing)

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
            try:
                while not cut.is_set():
                    data = await _read_packet(reader)
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    await flowing.wait()  # stalled: hold the bytes, keep the socket open
                    if cut.is_set():
                        return
                    writer.write(data)
                    await writer.drain()
                    rule = self.rule
                    if rule is not None and rule(_parse(direction, data)):
                        self.rule = None  # one cut per installed rule
                        self.cuts += 1
                        cut.set()
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                pass
            finally:
                cut.set()

        tasks = [asyncio.ensure_future(pump(client_reader, broker_writer, UP)),
                 asyncio.ensure_future(pump(broker_reader, client_writer, DOWN))]
        await cut.wait()
        self._flowing.discard(flowing)
        for task in tasks:
            task.cancel()
        for writer in (client_writer, broker_writer):
            self._live.discard(writer)
            _abort(writer)

    def cut_after(self, rule: Rule) -> None:
        """Cut the connection right after the first packet matching ``rule`` has been forwarded."""
        self.rule = rule

    def cut_all(self) -> None:
        def cut() -> None:
            for writer in list(self._live):
                _abort(writer)
            self._live.clear()
        self.loop.call_soon_threadsafe(cut)

    def stall(self) -> None:
        """Stop forwarding on every live connection, without closing it (half-open), until ``resume()``."""
        def stall() -> None:
            for flowing in self._flowing:
                flowing.clear()
            self.stalls += 1
        self.loop.call_soon_threadsafe(stall)

    def resume(self) -> None:
        def resume() -> None:
            for flowing in self._flowing:
                flowing.set()
        self.loop.call_soon_threadsafe(resume)

    def stop(self) -> None:
        async def close() -> int:
            if self._server is not None:
                self._server.close()
            for writer in list(self._live):
                _abort(writer)
            return 0
        with contextlib.suppress(Exception):
            self._call(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    with contextlib.suppress(Exception):
        transport.abort()  # RST, no FIN handshake: like a lost network
