"""UnifiedPush (https://unifiedpush.org): a POST to the endpoint the device's distributor gave it
(a self-hosted ntfy, NextPush, ...), RFC 8030-style.

The request: ``POST <endpoint>`` with ``TTL`` (seconds the distributor may keep it), ``Urgency:
high`` (a chat message; RFC 8030 5.3) and ``Topic`` (the collapse key: a newer wake-up replaces a
waiting one, RFC 8030 5.4), and a body that says only "wake up" -- never a sender, a body or a
group name; with ``push.include_preview``, the preview the client encrypted for its own device.
Redirects are not followed (the endpoint was checked when it was registered, its redirect was not).

Answers: 2xx sent; 404 and 410 gone (the distributor forgot the endpoint: the app was
uninstalled or re-registered); 429 and 5xx, a timeout or a refused connection: retry, after the
``Retry-After`` when given; any other answer: rejected.
"""

from __future__ import annotations

import json
import time

import httpx

from bridge.push.provider import Outcome, PushResult, PushTarget, WakeUp, retry_after_s

DEFAULT_TIMEOUT_S = 10.0


class UnifiedPushProvider:
    platform = "unifiedpush"

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, transport=transport,
                                         headers={"User-Agent": "chat-broker push"})

    async def send(self, target: PushTarget, wake: WakeUp) -> PushResult:
        ttl = max(0, (wake.expires_at_ms - int(time.time() * 1000)) // 1000)
        body = {"type": "wake"} if wake.preview is None else {"type": "wake", "preview": wake.preview}
        try:
            response = await self._client.post(
                target.token, content=json.dumps(body, separators=(",", ":")).encode(),
                headers={"TTL": str(ttl), "Urgency": "high", "Topic": wake.collapse_key,
                         "Content-Type": "application/json"})
        except httpx.HTTPError as exc:  # timeouts, refused connections, protocol errors: the network's fault
            return PushResult(Outcome.RETRY, detail=f"{type(exc).__name__}: {exc}")
        return classify(response)

    async def close(self) -> None:
        await self._client.aclose()


def classify(response: httpx.Response) -> PushResult:
    """The outcome of a push service's HTTP answer (RFC 8030 semantics, also Web Push's)."""
    status = response.status_code
    detail = f"HTTP {status}"
    if 200 <= status < 300:
        return PushResult(Outcome.SENT, detail=detail)
    if status in (404, 410):
        return PushResult(Outcome.GONE, detail=detail)
    if status == 429 or status >= 500:
        return PushResult(Outcome.RETRY, retry_after_s(response.headers.get("Retry-After"), time.time()), detail)
    return PushResult(Outcome.REJECTED, detail=f"{detail}: {response.text[:200]}")
