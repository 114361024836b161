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
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from chatserver.binds import parse_bind

READY_TIMEOUT_S = 5.0  # a guard: BrokerApp.readiness answers within ~1 s
SHUTDOWN_S = 2.0  # how long a stop waits for requests in progress
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
    """``app`` served on ``bind``. ``await start()`` (raises OSError if the port is taken), ``await close()``."""

    def __init__(self, app: web.Application, bind: str, ssl_context: ssl.SSLContext | None = None) -> None:
        self._host, self._port = parse_bind(bind)
        self._ssl = ssl_context
        # access_log=None: one log line per request would swamp the broker's log.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_S, logger=_server_log)
        self._started = False

    async def start(self) -> None:
        await self._runner.setup()
        self._started = True
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl, reuse_address=True)
        await site.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._runner.addresses[0][:2]
        return str(host), int(port)

    async def close(self) -> None:
        if self._started:
            self._started = False
            await self._runner.cleanup()


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
