"""UnifiedPush (https://unifiedpush.org): a POST to the endpoint the device's distributor gave it
(a self-hosted ntfy, NextPush, ...), RFC 8030-style.

The request: ``POST <endpoint>`` with ``TTL`` (seconds the distributor may keep it), ``Urgency:
high`` (a chat message; RFC 8030 5.3) and ``Topic`` (the collapse tag: a newer wake-up replaces a
waiting one, RFC 8030 5.4), and the body every provider's app reads (``common.payload``): a
wake-up -- never a sender, a body or a group name. The endpoint is a URL a client chose: the
connection goes only to an address checked when it is made (``common.EndpointGuard``: no
loopback, private, link-local, ... address, however the name resolves), and redirects are not
followed (where one points was checked by no one).

Answers: 2xx sent; 404 and 410 gone (the distributor forgot the endpoint: the app was
uninstalled or registered anew); 429 and 5xx, a timeout or a refused connection: retry, after
the ``Retry-After`` when given; any other answer: rejected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from bridge.push.provider import PushResult, PushTarget, WakeUp
from providers.push import common


class UnifiedPushProvider:
    platform = "unifiedpush"

    def __init__(self, *, verify: bool | str = True, timeout_s: float = common.DEFAULT_TIMEOUT_S,
                 clock: Callable[[], float] = time.time, allow_loopback_endpoints: bool = False) -> None:
        self._client = common.make_client(verify=verify, timeout_s=timeout_s,
                                          guard=common.EndpointGuard(allow_loopback_endpoints))
        self._clock = clock

    async def send(self, target: PushTarget, wake: WakeUp) -> PushResult:
        now = self._clock()
        headers = {
            "ttl": str(common.ttl_s(wake.expires_at_ms, now)),
            "urgency": "high",
            "topic": common.collapse_tag(wake.collapse_key),
            "content-type": "application/json",
        }
        response = await common.post(self._client, target.token, headers=headers, content=common.payload(wake))
        if isinstance(response, PushResult):
            return response
        status = response.status_code
        return common.outcome(response, self._clock(), common.detail(response, response.reason_phrase),
                              sent=200 <= status < 300, gone=status in (404, 410))

    async def close(self) -> None:
        await self._client.aclose()


def from_settings(settings: Mapping[str, Any]) -> UnifiedPushProvider:
    return UnifiedPushProvider(allow_loopback_endpoints=common.loopback_allowed(settings),
                               **common.client_settings(settings))
