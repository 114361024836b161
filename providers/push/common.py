"""What the push providers share: the httpx client (timeouts on every call, a private CA for tests),
one POST that turns a transport failure into RETRY, Retry-After, and the collapse tag."""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from bridge.push.provider import Outcome, PushResult, WakeUp
from providers.push.jws import b64url

DEFAULT_TIMEOUT_S = 10.0
DETAIL_CHARS = 200  # of a service's answer kept for the log
# An idle connection is kept this long (httpx's default is 5 s): Apple asks for connections kept
# open across notifications, and a wake-up after a pause then skips the TLS handshake.
KEEPALIVE_S = 60.0
MAX_RETRY_AFTER_S = 86400.0


def make_client(*, verify: bool | str, timeout_s: float, http1: bool = True) -> httpx.AsyncClient:
    """``verify``: True (the system's CAs), False, or a CA bundle's path (a local test server).
    HTTP/2 is offered always; ``http1=False`` refuses HTTP/1.1 (APNs speaks only HTTP/2)."""
    tls: bool | ssl.SSLContext = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
    limits = httpx.Limits(keepalive_expiry=KEEPALIVE_S)
    return httpx.AsyncClient(http1=http1, http2=True, verify=tls, timeout=httpx.Timeout(timeout_s), limits=limits)


async def post(
    client: httpx.AsyncClient, url: str, *, headers: Mapping[str, str], content: bytes
) -> httpx.Response | PushResult:
    """The response, or RETRY when none came (refused, reset, timed out: the service may be fine
    a moment later)."""
    try:
        return await client.post(url, headers=dict(headers), content=content)
    except httpx.HTTPError as exc:
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
