"""One broker node's link to Redis, made breakable: a TCP proxy per Redis node, and the node run through them.

A cluster client learns the Redis nodes' addresses from ``CLUSTER SLOTS``, so a proxy in front of the
startup address alone would not cut it off. ``python -m bench.chaos.redis_link run ...`` is
``python -m chatserver run ...`` with every redis-py connection it opens (the cluster client's and the
nudge subscriber's) sent to the proxy of the Redis port it asked for, as ``REMAP_ENV`` maps them
(``"7001=41001,7002=41002"``): the broker's code runs unchanged, only its sockets take the detour.
The other nodes talk to Redis directly, so ``TcpProxy.cut()`` cuts one node off and nobody else.

``TcpProxy.cut("refuse")``: every live connection is reset and new ones are refused (a host whose
Redis route is gone); ``cut("blackhole")``: connections are accepted and held, nothing passes either
way (a partition: packets dropped, no RST); ``restore()`` lets bytes flow again (held ones first).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

REMAP_ENV = "CHAT_CHAOS_REDIS_VIA"
CHUNK = 65536


class TcpProxy:
    """A byte relay ``127.0.0.1:port`` -> ``127.0.0.1:target_port`` in its own thread and event loop."""

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
                while data := await reader.read(CHUNK):
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
    if not transport.is_closing():
        transport.abort()  # an RST, not a FIN: the peer sees the link break


def remap(text: str) -> dict[int, int]:
    """``"7001=41001,7002=41002"`` -> ``{7001: 41001, 7002: 41002}``."""
    return {int(a): int(b) for a, b in (pair.split("=") for pair in text.split(",") if pair)}


@contextlib.contextmanager
def redis_via(ports: dict[int, int]) -> Iterator[None]:
    """Meanwhile every redis-py asyncio connection made to 127.0.0.1:<p> goes to 127.0.0.1:<ports[p]> instead."""
    from redis.asyncio.connection import Connection  # noqa: PLC0415 (only the proxied node needs it)

    original = Connection.__init__

    def init(self: Connection, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.port = ports.get(int(self.port), self.port)  # the cluster client still names the node by its own port

    Connection.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        Connection.__init__ = original  # type: ignore[method-assign]


def main() -> int:
    from chatserver.cli import main as chatserver  # noqa: PLC0415

    with redis_via(remap(os.environ.get(REMAP_ENV, ""))):
        return chatserver(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
