"""Log set-up: plain text or JSON lines, on stderr, with the connection each line is about.

Never logs message bodies, passwords or tokens: our own log calls carry ids,
topics and reasons only (tests/test_logs.py checks a real chat at level
debug). Two libraries would leak at DEBUG and are held above it whatever the
level: amqtt prints whole packets (CONNECT passwords, PUBLISH payloads), and
aiosqlite every SQL statement with its parameters (staged bodies).

Connection ids: ``bind_connection`` / ``bind_client`` set context variables
in the task that serves one connection; asyncio copies the context into tasks
that task starts, so every line logged on behalf of that connection carries
``conn`` (e.g. ``tcp-17``) and, once logged in, ``client`` (``alice.phone``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

_connection: contextvars.ContextVar[str | None] = contextvars.ContextVar("connection", default=None)
_client: contextvars.ContextVar[str | None] = contextvars.ContextVar("client", default=None)


def bind_connection(conn_id: str) -> None:
    """Call at the start of the task serving one connection: its log lines carry ``conn``."""
    _connection.set(conn_id)
    _client.set(None)


def bind_client(client_id: str) -> None:
    """Call once the connection has logged in: its log lines carry ``client`` too."""
    _client.set(client_id)


class ContextFilter(logging.Filter):
    """Copies the connection context onto each record (``record.conn``, ``record.client``, ``record.ctx``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        conn, client = _connection.get(), _client.get()
        record.conn, record.client = conn, client
        parts = [p for p in (conn, client) if p]
        record.ctx = f" [{' '.join(parts)}]" if parts else ""
        return True


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("conn", "client"):
            value = getattr(record, key, None)
            if value:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s%(ctx)s: %(message)s"


def setup_logging(level: str, log_format: str = "text") -> None:
    """Send every log line to stderr as ``log_format`` (``text`` or ``json``: one object per line)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonLineFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # amqtt logs every connection at INFO and whole packets at DEBUG (passwords,
    # bodies): problems only, or INFO when the operator asked for debug output.
    logging.getLogger("amqtt").setLevel(logging.INFO if level == "debug" else logging.WARNING)
    # aiosqlite logs every statement with its parameters at DEBUG: staged bodies, token digests.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)


class QuietHandshakes(logging.LoggerAdapter[logging.Logger]):
    """The WebSocket listeners' logger. websockets logs a failed opening handshake (a bare TCP
    connect or a plain HTTP request: a load balancer's health check) as an ERROR with a
    traceback; it is one debug line here, as a bare connect on the TCP listener is."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if msg == "opening handshake failed" and kwargs.get("exc_info"):
            level, msg, args, kwargs = logging.DEBUG, "ws: opening handshake failed: %r", (sys.exc_info()[1],), {}
        super().log(level, msg, *args, **kwargs)


WS_LOG = QuietHandshakes(logging.getLogger("websockets.server"))
