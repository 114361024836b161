"""The media endpoint over HTTP/1.1 with the standard library (``http.client``): one connection
per transfer, Basic auth with the device token, JSON errors mapped to ``MediaError``.

The SDK installs without the server's HTTP libraries (setup.cfg, import-linter), so this is
``http.client``: bodies are sent from iterables with a known ``Content-Length`` (never whole
in memory) and responses read in bounded pieces.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from client_sdk.errors import ChatError

READ_BYTES: Final = 256 * 1024
MAX_JSON_BYTES: Final = 64 * 1024
TRANSIENT_STATUS: Final = frozenset({408, 429, 500, 502, 503, 504})

NetworkError = (OSError, http.client.HTTPException)
"""What a cut or refused connection raises (``ssl.SSLError`` and timeouts are ``OSError`` s)."""


class MediaError(ChatError):
    """The media endpoint refused (``code``: ``not_found``, ``gone``, ``too_large``,
    ``quota_exceeded``, ``unauthorized``, ...; ``status``: the HTTP status, 0 when the server
    could not be reached), or a transfer could not be completed (``code`` ``network``,
    ``digest_mismatch``, ``bad_response``)."""

    def __init__(self, code: str, detail: str, status: int = 0, offset: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"media: {code}: {detail}")
        self.code = code
        self.detail = detail
        self.status = status
        self.offset = offset
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        """Worth retrying after a wait (a cut, an overloaded or restarting server, rate limits)."""
        return self.status in TRANSIENT_STATUS or self.code == "network"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: http.client.HTTPMessage
    data: Any
    """The decoded JSON body (None for an empty one)."""


def basic_auth(user: str, device: str, token: str) -> str:
    raw = f"{user}.{device}:{token}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


class MediaHTTP:
    """Requests to the media endpoint at ``url`` (``http://`` or ``https://``, with an optional
    path prefix). ``tls`` verifies an ``https`` server (default: the system's CAs)."""

    def __init__(self, url: str, auth: str, tls: ssl.SSLContext | None = None, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"media_url must be http(s)://host[:port][/prefix], not {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._tls = tls if tls is not None or not self._https else ssl.create_default_context()
        self._auth = auth
        self._timeout = timeout

    def connect(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._tls)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def send(self, conn: http.client.HTTPConnection, method: str, path: str, body: bytes | Iterable[bytes] = b"",
             headers: dict[str, str] | None = None, length: int | None = None) -> http.client.HTTPResponse:
        """Send one request on ``conn`` and return the response, unread. ``length`` is the byte
        count of an iterable ``body``. Raises ``MediaError`` ``network`` for a cut."""
        sent = {"Authorization": self._auth, **(headers or {})}
        if isinstance(body, bytes):
            length = len(body)
        if method in ("POST", "PATCH", "PUT") or length:
            sent["Content-Length"] = str(length or 0)
        try:
            conn.request(method, self._prefix + path, body=body or None, headers=sent)
            return conn.getresponse()
        except ssl.SSLCertVerificationError as exc:  # not a cut: retrying cannot help
            conn.close()
            raise MediaError("tls_failed", f"the media endpoint's certificate does not verify ({exc.verify_message}): "
                             "check media_url's host and media_tls") from exc
        except NetworkError as exc:
            conn.close()
            raise MediaError("network", f"{method} {path}: {exc or type(exc).__name__}") from exc

    def call(self, method: str, path: str, payload: Any = None, body: Iterable[bytes] | None = None,
             headers: dict[str, str] | None = None, length: int | None = None) -> Reply:
        """One request on a fresh connection; a JSON ``payload`` or a streamed ``body`` of ``length``
        bytes. Returns the reply of a 2xx status; raises ``MediaError`` otherwise."""
        conn = self.connect()
        try:
            if payload is not None:
                data: bytes | Iterable[bytes] = json.dumps(payload).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            else:
                data = b"" if body is None else body
            response = self.send(conn, method, path, data, headers, length)
            reply = read_reply(response, f"{method} {path}")
        finally:
            conn.close()
        return reply


def read_reply(response: http.client.HTTPResponse, what: str) -> Reply:
    """The reply of a 2xx response; ``MediaError`` with the server's code and detail otherwise."""
    try:
        raw = response.read(MAX_JSON_BYTES + 1)
    except NetworkError as exc:
        raise MediaError("network", f"{what}: {exc or type(exc).__name__}") from exc
    if response.length and len(raw) <= MAX_JSON_BYTES:  # ended early: http.client does not raise
        raise MediaError("network", f"{what}: the connection ended {response.length} bytes before the answer's end")
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if 200 <= response.status < 300:
        if raw and (data is None or len(raw) > MAX_JSON_BYTES):
            raise MediaError("bad_response", f"{what}: the answer is not JSON", response.status)
        return Reply(response.status, response.headers, data)
    raise error_of(response, data, what)


def error_of(response: http.client.HTTPResponse, data: Any, what: str) -> MediaError:
    """The ``MediaError`` for a non-2xx response whose (JSON) body was ``data``."""
    fields = data if isinstance(data, dict) else {}
    code = fields.get("error") if isinstance(fields.get("error"), str) else f"http_{response.status}"
    detail = fields.get("detail") if isinstance(fields.get("detail"), str) else response.reason
    offset = fields.get("offset")
    retry = response.headers.get("Retry-After", "")
    return MediaError(str(code), f"{what}: {detail}", response.status,
                      offset if isinstance(offset, int) and not isinstance(offset, bool) else None,
                      float(retry) if retry.isdigit() else None)


def read_body(response: http.client.HTTPResponse, what: str) -> Iterator[bytes]:
    """The response body in pieces of at most ``READ_BYTES``; a cut raises ``MediaError`` ``network``."""
    while True:
        try:
            piece = response.read(READ_BYTES)
        except NetworkError as exc:
            raise MediaError("network", f"{what}: {exc or type(exc).__name__}") from exc
        if not piece:
            return
        yield piece
