"""The broker's HTTP listeners, on aiohttp inside the broker's event loop (no thread).

``HttpServer`` serves one ``aiohttp.web.Application`` on a bind address (optionally TLS) with
``AppRunner``/``TCPSite``. Two apps use it: the operator's (``metrics.bind``: ``/metrics``,
``/healthz``, ``/readyz``, built by ``ops_app``) and the media endpoint (``media.bind``,
chatserver/media_http.py).

Why in the loop: a scrape reads the staging core while the loop changes it (a thread would see
torn figures, "dict changed size during iteration"), and ``/readyz`` runs a write transaction on
the store's connection, which belongs to the loop.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from chatserver.binds import parse_bind

READY_TIMEOUT_S = 5.0  # a guard: BrokerApp.readiness answers within ~1 s
SHUTDOWN_S = 2.0  # how long a stop waits for requests in progress
IDLE_S = 10.0  # a connection's wait for a request head (the operator's listener; media sets its own)
MAX_CONNECTIONS = 64  # open at once (the operator's listener: a few scrapers and probes)
TEXT = "text/plain"

# Problems that make the broker not ready (empty: ready). Must not raise.
ReadyCheck = Callable[[], Awaitable[list[str]]]


class _NotClientErrors(logging.Filter):
    """aiohttp logs each malformed request (the client's fault) at ERROR with a traceback: anyone
    could fill the log. Those records are dropped; a failing handler is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


_server_log = logging.getLogger("chatserver.http.server")
_server_log.addFilter(_NotClientErrors())


class HttpServer:
    """``app`` served on ``bind``. ``await start()`` (raises OSError if the port is taken), ``await close()``.

    Bounds against a client that holds connections open (slowloris): a connection waiting for a
    request's head (the first, or the next on a kept-alive connection) is closed after ``idle_s``
    (aiohttp's keep-alive timer, which also runs before the first request); at most
    ``max_connections`` are open at once, and one more is closed at once, before any byte is read.
    A handler that streams a body bounds its own reads and writes (chatserver/media_http.py).
    """

    def __init__(self, app: web.Application, bind: str, ssl_context: ssl.SSLContext | None = None, *,
                 idle_s: float = IDLE_S, max_connections: int = MAX_CONNECTIONS) -> None:
        self._host, self._port = parse_bind(bind)
        self._ssl = ssl_context
        self._max_connections = max_connections
        # access_log=None: one log line per request would swamp the broker's log. lingering_time: the
        # unread rest of a body answered early is read for at most this long (aiohttp's 10 s held a
        # stalled client's connection).
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_S, logger=_server_log,
                                     keepalive_timeout=idle_s, lingering_time=idle_s)
        self._listener: asyncio.Server | None = None
        self.refused = 0  # connections closed for max_connections

    async def start(self) -> None:
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        live: weakref.WeakSet[_Counted] = weakref.WeakSet()

        def protocol() -> asyncio.BaseProtocol:
            # Counted from the accept, not from aiohttp's connection_made: accepts come in batches
            # (and a TLS handshake comes first), so aiohttp's count lags the sockets held.
            if len(live) >= self._max_connections:
                self.refused += 1
                return _Refused()
            counted = _Counted(server(), live)
            live.add(counted)
            return counted

        self._listener = await asyncio.get_running_loop().create_server(
            protocol, self._host, self._port, ssl=self._ssl, reuse_address=True)

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None
        host, port = self._listener.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections; those open are shut down by the runner
            self._listener = None
            await self._runner.cleanup()


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted in ``live`` until the connection is lost (or,
    if it never was made -- a failed TLS handshake -- until the transport drops it: a weak set)."""

    def __init__(self, inner: asyncio.Protocol, live: weakref.WeakSet[_Counted]) -> None:
        self._inner = inner
        self._live = live

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._live.discard(self)
        self._inner.connection_lost(exc)


class _Refused(asyncio.Protocol):
    """A connection over ``max_connections``: closed before anything is read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def ops_app(registry: CollectorRegistry, ready: ReadyCheck) -> web.Application:
    """The operator's endpoints. Every answer is ``no-store`` and closes its connection (a scraper
    opens one per scrape; nothing is gained by holding idle connections)."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n", content_type=TEXT)

    async def readyz(_: web.Request) -> web.Response:
        try:
            problems = await asyncio.wait_for(ready(), READY_TIMEOUT_S)
        except TimeoutError:
            problems = [f"readiness checks took longer than {READY_TIMEOUT_S:.0f}s"]
        if problems:
            return web.Response(status=503, text="not ready: " + "; ".join(problems) + "\n", content_type=TEXT)
        return web.Response(text="ready\n", content_type=TEXT)

    async def one_shot(_: web.Request, response: web.StreamResponse) -> None:
        # This hook runs after aiohttp chose the Connection header: set it, and close after.
        response.headers["Cache-Control"] = "no-store"
        response.headers["Connection"] = "close"
        response.force_close()

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.on_response_prepare.append(one_shot)
    return app
