"""A UnifiedPush distributor on 127.0.0.1 for the push tests: a small HTTP/1.1 server (its own
thread and event loop) that records every request and answers from a script (``answer``: status
and headers, in order; 201 once the script is used up), as ntfy or NextPush would."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from tests.helpers import WAIT_S


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic()


@dataclass
class Distributor:
    requests: list[Received] = field(default_factory=list)
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    port: int = 0
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.Server | None = None
    _thread: threading.Thread | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    def endpoint(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/up/{name}"

    def answer(self, status: int, **headers: str) -> None:
        """The next unanswered request gets ``status`` (after those already scripted)."""
        with self._changed:
            self.script.append((status, {k.replace("_", "-"): v for k, v in headers.items()}))

    def wait(self, count: int, timeout: float = WAIT_S) -> list[Received]:
        """The first ``count`` requests, once they have come (AssertionError after ``timeout``)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"{len(self.requests)} push(es) arrived, expected {count}")
            return self.requests[:count]

    def start(self) -> Distributor:
        ready = threading.Event()
        loop = self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        self._thread = threading.Thread(target=loop.run_forever, name="distributor", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), loop)
        assert ready.wait(WAIT_S)
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or self._thread is None:
            return

        async def close() -> None:
            server.close()
            for task in self._handlers:  # keep-alive connections the broker left open
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(WAIT_S)
        loop.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:  # keep-alive: one request after another
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, path, _version = request_line.split(" ")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                with self._changed:
                    self.requests.append(Received(method, path, headers, body, time.monotonic()))
                    status, extra = self.script.pop(0) if self.script else (201, {})
                    self._changed.notify_all()
                extra_lines = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n{extra_lines}\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
