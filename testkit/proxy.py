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

``TcpProxy``: a plain byte relay that can be cut (refused or blackholed) and restored on its port.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

UP, DOWN = "client->broker", "broker->client"
RELAY_CHUNK = 65536
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


class TcpProxy:
    """A byte relay ``127.0.0.1:port`` -> ``127.0.0.1:target_port`` (any protocol: Redis for bench/chaos) in
    its own thread and event loop. ``cut("refuse")``: every live connection is reset and new ones are
    refused (a host whose route is gone); ``cut("blackhole")``: connections are accepted and held, nothing
    passes either way (a partition: packets dropped, no RST); ``restore()`` lets bytes flow again (held
    ones first), on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.mode = ""  # "" flowing, "refuse" or "blackhole"
        self.cuts = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="redis-link", daemon=True)
        self._server: asyncio.Server | None = None
        self._live: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        self._call(self._set_flowing(True))
        return self

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _set_flowing(self, on: bool) -> None:
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._live.add(client_writer)
        try:
            await self._flowing.wait()  # blackholed: accepted, then nothing (the client's connect succeeds)
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _abort(client_writer)
            self._live.discard(client_writer)
            return
        self._live.add(server_writer)

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await reader.read(RELAY_CHUNK):
                    await self._flowing.wait()
                    writer.write(data)
                    await writer.drain()
            _abort(writer)

        try:
            await asyncio.gather(pump(client_reader, server_writer), pump(server_reader, client_writer))
        finally:
            for writer in (client_writer, server_writer):
                _abort(writer)
                self._live.discard(writer)

    def cut(self, mode: str) -> None:
        async def cut() -> None:
            self.mode, self.cuts = mode, self.cuts + 1
            self._flowing.clear()
            if mode == "refuse":
                assert self._server is not None
                self._server.close()
                for writer in list(self._live):
                    _abort(writer)
        self._call(cut())

    def restore(self) -> None:
        async def restore() -> None:
            if self.mode == "refuse":
                await self._listen()  # the same port: the node's client keeps asking for it
            self.mode = ""
            self._flowing.set()
        self._call(restore())

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._live):
                _abort(writer)
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:  # relays held by a cut: ended here, not destroyed pending with the loop
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        with contextlib.suppress(Exception):
            self._call(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    with contextlib.suppress(Exception):
        transport.abort()  # RST, no FIN handshake: like a lost network
