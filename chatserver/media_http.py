"""The media endpoint's HTTP handlers (docs/MEDIA.md): thin. Each parses the request, calls one
``MediaService`` method with the caller the ``Authorization`` header names, and answers; a
``MediaError`` (and any other failure) becomes a JSON error by ``_errors``, counted by code.

Bodies are streamed both ways: a PATCH body goes from the socket to the ``BlobStore`` in chunks
of ``BODY_CHUNK``, a download from the store to the socket in the store's chunks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from aiohttp import web

from bridge.media.core import STATUS, MediaError
from bridge.media.service import MediaService
from bridge.store import StoreError

log = logging.getLogger(__name__)

BODY_CHUNK = 256 * 1024
MAX_JSON_BYTES = 4096
UPLOAD_TYPE = "application/offset+octet-stream"
PREFIX = "/v1/media"

DRAIN_MAX_BYTES = 16 * 1024 * 1024  # a refused PATCH's body read to the end, up to this
DRAIN_S = 10.0
MAX_OFFSET_DIGITS = 19  # an int64
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Authenticate = Callable[[str, str], Awaitable[tuple[str, str] | None]]
"""``(client id, device token)`` -> ``(user, device)``, or None: refused."""

_CALLER: ContextVar[tuple[str, str]] = ContextVar("media_caller")  # set by the middleware, per request task


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """``(client id, token)`` of ``Authorization: Basic base64(client_id:token)``; None if malformed."""
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, token = decoded.partition(":")
    return (client_id, token) if sep else None


def media_app(service: MediaService, authenticate: Authenticate, public_cache: bool,
              idle_s: float) -> web.Application:
    handlers = _Handlers(service, authenticate, public_cache, idle_s)
    app = web.Application(middlewares=[handlers.errors], client_max_size=MAX_JSON_BYTES)
    app.router.add_post(f"{PREFIX}/uploads", handlers.create)
    app.router.add_get(f"{PREFIX}/uploads/{{upload}}", handlers.status, allow_head=False)
    app.router.add_patch(f"{PREFIX}/uploads/{{upload}}", handlers.patch)
    app.router.add_delete(f"{PREFIX}/uploads/{{upload}}", handlers.delete)
    app.router.add_get(f"{PREFIX}/blobs/{{blob}}", handlers.download)
    app.router.add_post(f"{PREFIX}/blobs/{{blob}}/fetched", handlers.fetched)
    return app


class _Handlers:
    def __init__(self, service: MediaService, authenticate: Authenticate, public_cache: bool, idle_s: float) -> None:
        self._service = service
        self._idle_s = idle_s
        self._authenticate = authenticate
        self._cache = f"{'public' if public_cache else 'private'}, max-age=31536000, immutable"

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        service = self._service
        try:
            credentials = parse_basic(request.headers.get("Authorization"))
            caller = await self._authenticate(*credentials) if credentials is not None else None
            if caller is None:
                raise MediaError("unauthorized", "Authorization: Basic base64(user.device:device token) is "
                                 "required; passwords are not accepted")
            _CALLER.set(caller)
            return await handler(request)
        except MediaError as exc:
            response = _refusal(service, exc)
        except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, body too large
            code = {404: "not_found", 413: "too_large"}.get(exc.status, "bad_request")
            response = _json(exc.status, {"error": code, "detail": exc.reason})
            if exc.status == 405:
                response.headers["Allow"] = exc.headers.get("Allow", "")
            service.counters.refused(code)
        except (ConnectionError, TimeoutError) as exc:  # gone, or stalled: a cut upload keeps what arrived
            log.debug("media: %s %s: %s", request.method, request.path,
                      "stalled" if isinstance(exc, TimeoutError) else "connection lost")
            response = web.Response(status=408 if isinstance(exc, TimeoutError) else 400)
            response.force_close()
            return response
        except StoreError as exc:
            log.error("media: %s %s failed: %s", request.method, request.path, exc)
            service.counters.refused("unavailable")
            response = _json(503, {"error": "unavailable", "detail": "storage failed; retry later"})
        if not await _drained(request):
            response.force_close()
        return response

    async def create(self, request: web.Request) -> web.Response:
        user, device = _CALLER.get()
        if request.content_length is None or request.content_length > MAX_JSON_BYTES:
            raise MediaError("bad_request", f"a JSON body of at most {MAX_JSON_BYTES} bytes is required")
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise MediaError("bad_request", "the body is not JSON") from None
        upload, offset = await self._service.create(user, device, body, request.headers.get("Idempotency-Key"))
        return _json(201, {"upload": upload.id, "offset": offset, "chunk_max": self._service.limits.chunk_max},
                     Location=f"{PREFIX}/uploads/{upload.id}")

    async def status(self, request: web.Request) -> web.Response:
        user, device = _CALLER.get()
        offset, size, blob = await self._service.status(user, device, request.match_info["upload"])
        url = f"{PREFIX}/blobs/{blob}" if blob is not None else None
        return _json(200, {"offset": offset, "size": size, "url": url}, **{"Upload-Offset": str(offset)})

    async def patch(self, request: web.Request) -> web.Response:
        user, device = _CALLER.get()
        if request.content_type != UPLOAD_TYPE:
            raise MediaError("bad_request", f"Content-Type must be {UPLOAD_TYPE}")
        offset_text = request.headers.get("Upload-Offset", "")
        if not offset_text.isdigit() or len(offset_text) > MAX_OFFSET_DIGITS:
            raise MediaError("bad_request", "Upload-Offset must be the stored offset (GET the upload to learn it)")
        offset, blob = await self._service.patch(user, device, request.match_info["upload"], int(offset_text),
                                                 request.content_length,
                                                 _paced(request.content.iter_chunked(BODY_CHUNK), self._idle_s))
        if blob is None:
            return web.Response(status=204, headers={"Upload-Offset": str(offset)})
        return _json(200, {"url": f"{PREFIX}/blobs/{blob}", "sha256": blob, "size": offset},
                     **{"Upload-Offset": str(offset)})

    async def delete(self, request: web.Request) -> web.Response:
        user, device = _CALLER.get()
        await self._service.delete(user, device, request.match_info["upload"])
        return web.Response(status=204)

    async def download(self, request: web.Request) -> web.StreamResponse:
        user, _ = _CALLER.get()
        found = await self._service.download(user, request.match_info["blob"], request.headers.get("Range"))
        blob = found.blob
        response = web.StreamResponse(status=206 if found.partial else 200, headers={
            "ETag": f'"{blob.sha256}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
            "Cache-Control": self._cache,
        })
        if found.partial:
            response.headers["Content-Range"] = f"bytes {found.start}-{found.end - 1}/{blob.size}"
        response.content_length = found.end - found.start
        try:
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in found.chunks:
                    async with asyncio.timeout(self._idle_s):  # a reader that stopped reading
                        await response.write(chunk)
            await response.write_eof()
        finally:
            await found.chunks.aclose()  # type: ignore[attr-defined]  # an async generator
        return response

    async def fetched(self, request: web.Request) -> web.Response:
        user, device = _CALLER.get()
        await self._service.fetched(user, device, request.match_info["blob"])
        return web.Response(status=204)


async def _paced(chunks: AsyncIterator[bytes], idle_s: float) -> AsyncIterator[bytes]:
    """``chunks``, each within ``idle_s`` of the last: a body that stops coming raises TimeoutError."""
    iterator = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(idle_s):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        yield chunk


async def _drained(request: web.Request) -> bool:
    """Read what is left of a refused request's body, so that the client reads the answer rather than
    a reset (and no lingering read outlives the connection). False: too much or too slow, close."""
    if not request.body_exists or request.content.at_eof():
        return True
    left = DRAIN_MAX_BYTES
    try:
        async with asyncio.timeout(DRAIN_S):
            while left >= 0 and (chunk := await request.content.readany()):
                left -= len(chunk)
    except (TimeoutError, ConnectionError):
        return False
    return left >= 0


def _refusal(service: MediaService, exc: MediaError) -> web.Response:
    service.counters.refused(exc.code)
    body: dict[str, Any] = {"error": exc.code, "detail": exc.detail}
    headers: dict[str, str] = {}
    if exc.offset is not None:
        body["offset"] = exc.offset
        headers["Upload-Offset"] = str(exc.offset)
    if exc.blob is not None:
        body["url"] = f"{PREFIX}/blobs/{exc.blob}"
    if exc.size is not None:
        headers["Content-Range"] = f"bytes */{exc.size}"  # RFC 9110 section 15.5.17
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    if exc.code == "unauthorized":
        headers["WWW-Authenticate"] = 'Basic realm="media"'
    return _json(STATUS[exc.code], body, **headers)


def _json(status: int, body: dict[str, Any], **headers: str) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json",
                        headers={"Cache-Control": "no-store", **headers})
