"""The operator's HTTP listener (``metrics.bind``): ``/metrics``, ``/healthz``, ``/readyz``.

Served inside the broker's event loop with ``asyncio.start_server`` and a
minimal HTTP/1.1 handler (GET/HEAD, one request per connection, then close).
Why not prometheus_client's ``start_http_server``: it serves from a thread,
so a scrape would read the staging core while the loop changes it (torn
figures, "dict changed size during iteration"), and ``/readyz`` must run a
write transaction on the store's connection, which belongs to the loop. Its
ASGI app would need an ASGI server, which is not a dependency. The request
parsing and response building here are pure functions (tests/unit/test_observability.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from chatserver.config import parse_bind

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8192
READ_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 5.0  # a guard: BrokerApp.readiness answers within ~1 s
TEXT = "text/plain; charset=utf-8"

# Problems that make the broker not ready (empty: ready). Must not raise.
ReadyCheck = Callable[[], Awaitable[list[str]]]


class HttpError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str


def parse_head(head: bytes) -> Request:
    """The request line of an HTTP/1.x request head (headers are read and ignored)."""
    try:
        line = head.split(b"\r\n", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "Bad Request") from None
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "Bad Request")
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        raise HttpError(405, "Method Not Allowed")
    return Request(method, target.split("?", 1)[0])


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def response(status: int, body: bytes, content_type: str = TEXT, head_only: bool = False) -> bytes:
    headers = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if status == 405:
        headers.append("Allow: GET, HEAD")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + (b"" if head_only else body)


class OpsServer:
    """The HTTP listener. ``await start()`` (raises OSError if the port is taken), ``await close()``."""

    def __init__(self, bind: str, registry: CollectorRegistry, ready: ReadyCheck) -> None:
        self._host, self._port = parse_bind(bind)
        self._registry = registry
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port, reuse_address=True,
                                                  limit=MAX_HEAD_BYTES)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
                request = parse_head(head)
                status, body, content_type = await self._route(request.path)
            except HttpError as exc:
                status, body, content_type, request = exc.status, f"{exc}\n".encode(), TEXT, None
            except asyncio.LimitOverrunError:
                status, body, content_type, request = 400, b"request head too large\n", TEXT, None
            writer.write(response(status, body, content_type, request is not None and request.method == "HEAD"))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # a client that went away or never sent a request: nothing to answer
        except Exception:  # one bad request must never take the listener down
            log.exception("metrics listener: request failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            return 200, generate_latest(self._registry), CONTENT_TYPE_LATEST
        if path == "/healthz":
            return 200, b"ok\n", TEXT
        if path == "/readyz":
            try:
                problems = await asyncio.wait_for(self._ready(), READY_TIMEOUT_S)
            except TimeoutError:
                problems = [f"readiness checks took longer than {READY_TIMEOUT_S:.0f}s"]
            if problems:
                return 503, ("not ready: " + "; ".join(problems) + "\n").encode(), TEXT
            return 200, b"ready\n", TEXT
        raise HttpError(404, "Not Found")
