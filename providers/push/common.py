"""What the push providers share: the httpx client (timeouts on every call, a private CA for tests;
for endpoints a client chose, connections only to the addresses checked), one POST that turns a
transport failure into RETRY, Retry-After, and the collapse tag."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import httpcore
import httpx

from bridge.push.provider import Outcome, PushResult, WakeUp
from chatproto import address_refusal
from providers.push.jws import b64url

DEFAULT_TIMEOUT_S = 10.0
DETAIL_CHARS = 200  # of a service's answer kept for the log
# An idle connection is kept this long (httpx's default is 5 s): Apple asks for connections kept
# open across notifications, and a wake-up after a pause then skips the TLS handshake.
KEEPALIVE_S = 60.0
MAX_RETRY_AFTER_S = 86400.0


def make_client(*, verify: bool | str, timeout_s: float, http1: bool = True,
                guard: EndpointGuard | None = None) -> httpx.AsyncClient:
    """``verify``: True (the system's CAs), False, or a CA bundle's path (a local test server).
    HTTP/2 is offered always; ``http1=False`` refuses HTTP/1.1 (APNs speaks only HTTP/2).
    ``guard``: for URLs a client chose (Web Push, UnifiedPush): every connection goes to an address
    the guard checked, and no proxy from the environment is used (it would connect for us)."""
    tls: bool | ssl.SSLContext = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
    limits = httpx.Limits(keepalive_expiry=KEEPALIVE_S)
    if guard is None:
        return httpx.AsyncClient(http1=http1, http2=True, verify=tls, timeout=httpx.Timeout(timeout_s), limits=limits)
    transport = httpx.AsyncHTTPTransport(verify=tls, http1=http1, http2=True, limits=limits, trust_env=False)
    pool = transport._pool  # httpx has no public way to set httpcore's network backend
    if not isinstance(pool, httpcore.AsyncConnectionPool):  # a proxy pool would connect elsewhere
        raise TypeError(f"unexpected httpx transport pool {type(pool).__name__}")
    pool._network_backend = guard.wrap(pool._network_backend)
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(timeout_s), follow_redirects=False,
                             trust_env=False)


class ForbiddenAddress(httpcore.ConnectError):
    """The endpoint's host is, or resolves to, an address a push must not go to (httpx raises it as
    an ``httpx.ConnectError`` whose ``__cause__`` this is)."""


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses, in the resolver's order (tests patch this)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class EndpointGuard:
    """Connect only to checked addresses: the host is resolved when the connection is made, every
    address it resolves to must pass ``chatproto.address_refusal`` (one bad address refuses the
    name), and the connection goes to one of those very addresses -- so a name re-pointed between
    the check and the connection (DNS rebinding) cannot reach another. TLS still verifies the
    certificate for, and sends SNI and Host of, the name in the URL (httpcore does TLS above this)."""

    def __init__(self, allow_loopback: bool) -> None:
        self.allow_loopback = allow_loopback

    def wrap(self, inner: httpcore.AsyncNetworkBackend) -> httpcore.AsyncNetworkBackend:
        return _GuardedBackend(self, inner)

    async def addresses(self, host: str, port: int, timeout_s: float | None) -> list[str]:
        """The checked addresses of ``host``; raises ForbiddenAddress, or httpcore.ConnectError when
        it does not resolve."""
        try:
            addresses = await asyncio.wait_for(resolve(host, port), timeout_s)
        except (OSError, TimeoutError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        for address in addresses:
            why = address_refusal(address, self.allow_loopback)
            if why is not None:
                raise ForbiddenAddress(f"{host} resolves to {why} ({address}); push endpoints must be public")
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolves to no address")
        return addresses


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, guard: EndpointGuard, inner: httpcore.AsyncNetworkBackend) -> None:
        self._guard = guard
        self._inner = inner

    async def connect_tcp(  # httpcore's signature, timeout included
            self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
            local_address: str | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        failed: httpcore.ConnectError | None = None
        for address in await self._guard.addresses(host, port, timeout):
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:  # the next address, as a resolver-driven connect would
                failed = exc
        assert failed is not None
        raise failed

    async def connect_unix_socket(
            self, path: str, timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
            socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise ForbiddenAddress("push endpoints are never Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


async def post(
    client: httpx.AsyncClient, url: str, *, headers: Mapping[str, str], content: bytes
) -> httpx.Response | PushResult:
    """The response, or RETRY when none came (refused, reset, timed out: the service may be fine
    a moment later)."""
    try:
        return await client.post(url, headers=dict(headers), content=content)
    except httpx.HTTPError as exc:
        if isinstance(exc.__cause__, ForbiddenAddress):  # not retried: the endpoint is the fault
            return PushResult(Outcome.REJECTED, detail=str(exc.__cause__)[:DETAIL_CHARS])
        return PushResult(Outcome.RETRY, detail=f"{type(exc).__name__}: {exc}"[:DETAIL_CHARS])


def retry_after_s(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from ``now`` (Unix time): delta-seconds or an HTTP-date (RFC 9110),
    at most a day (a garbled huge value must not park a device for ever)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        return min(max(0.0, parsedate_to_datetime(value).timestamp() - now), MAX_RETRY_AFTER_S)
    except (TypeError, ValueError, OverflowError):
        return None


def retry(response: httpx.Response, now: float, detail: str) -> PushResult:
    return PushResult(Outcome.RETRY, retry_after_s(response.headers.get("retry-after"), now), detail)


def is_retryable(status: int) -> bool:
    return status == 429 or status >= 500


def outcome(response: httpx.Response, now: float, said: str, *, sent: bool, gone: bool,
            retryable: bool = False) -> PushResult:
    """An answer's result from what the service's own codes say: 429 and 5xx are always RETRY
    (after its Retry-After), and what is neither sent, gone nor retryable is REJECTED for good."""
    if sent:
        return PushResult(Outcome.SENT)
    if gone:
        return PushResult(Outcome.GONE, detail=said)
    if retryable or is_retryable(response.status_code):
        return retry(response, now, said)
    return PushResult(Outcome.REJECTED, detail=said)


def detail(response: httpx.Response, reason: str = "") -> str:
    return f"HTTP {response.status_code} {reason}".strip()[:DETAIL_CHARS]


def payload(wake: WakeUp) -> bytes:
    """The body the app reads (Web Push after decryption, UnifiedPush as it is): a wake-up, and the
    preview only when the operator opted in."""
    data: dict[str, Any] = {"wake": 1} if wake.preview is None else {"wake": 1, "preview": wake.preview}
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


def collapse_tag(collapse_key: str) -> str:
    """A 32-character base64url tag for a collapse key: fits Web Push's Topic (32 chars, RFC 8030
    5.4) and apns-collapse-id (64 bytes), and tells Google and Apple nothing of which device or
    user the key names."""
    return b64url(hashlib.sha256(collapse_key.encode("utf-8")).digest())[:32]


def ttl_s(expires_at_ms: int, now: float) -> int:
    return max(0, int(expires_at_ms / 1000 - now))


def setting(settings: Mapping[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """One provider setting, checked: ValueError names it when missing or of the wrong type."""
    value = settings.get(name, default)
    if value is None:
        raise ValueError(f"push provider setting {name!r} is required")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is str and not value):
        raise ValueError(f"push provider setting {name!r} must be a non-empty {kind.__name__}")
    return value


def client_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``verify`` (True, False or a CA file) and ``timeout_s``, common to every provider."""
    verify = settings.get("verify", True)
    if not isinstance(verify, bool | str):
        raise ValueError("push provider setting 'verify' must be true, false or a CA file's path")
    return {"verify": verify, "timeout_s": setting(settings, "timeout_s", float, DEFAULT_TIMEOUT_S)}


def loopback_allowed(settings: Mapping[str, Any]) -> bool:
    """``allow_loopback_endpoints`` for a provider whose URLs clients choose (the push section's
    setting, handed down by the wiring; tests only)."""
    allow = settings.get("allow_loopback_endpoints", False)
    if not isinstance(allow, bool):
        raise ValueError("push provider setting 'allow_loopback_endpoints' must be true or false")
    return allow
