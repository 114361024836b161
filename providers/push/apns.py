"""APNs with token authentication (issue #18): an ES256 provider token from the team's .p8 key,
reused and renewed within the hour, over HTTP/2 only. Content-free by default: a background push
(content-available, priority 5) that wakes the app to connect and fetch; with a preview, an alert
whose ``preview`` the app's notification service extension decrypts (docs/PUSH-PROVIDERS.md)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from bridge.push.provider import Outcome, PushResult, PushTarget, WakeUp
from providers.push import common, jws

PRODUCTION_URL = "https://api.push.apple.com"
SANDBOX_URL = "https://api.sandbox.push.apple.com"
# Apple refuses a provider token older than an hour (ExpiredProviderToken) and one renewed more
# often than every 20 minutes (TooManyProviderTokenUpdates): renew at 50.
TOKEN_RENEW_S = 50 * 60
DEVICE_TOKEN = re.compile(r"[0-9A-Fa-f]{64,200}")
EXPIRED = "ExpiredProviderToken"  # renewed once, then the send tried again
GONE_REASONS = frozenset({"Unregistered", "BadDeviceToken"})


def request(wake: WakeUp, topic: str) -> tuple[dict[str, str], bytes]:
    """(headers without authorization, JSON body) of one wake-up."""
    headers = {
        "apns-topic": topic,
        "apns-collapse-id": common.collapse_tag(wake.collapse_key),
        "apns-expiration": str(max(0, wake.expires_at_ms // 1000)),
    }
    payload: dict[str, Any]
    if wake.preview is None:  # Apple requires priority 5 for background pushes
        headers |= {"apns-push-type": "background", "apns-priority": "5"}
        payload = {"aps": {"content-available": 1}}
    else:  # the app's localized NEW_MESSAGE shows unless its extension decrypts the preview
        headers |= {"apns-push-type": "alert", "apns-priority": "10"}
        payload = {"aps": {"alert": {"loc-key": "NEW_MESSAGE"}, "mutable-content": 1, "content-available": 1},
                   "preview": wake.preview}
    return headers, json.dumps(payload, separators=(",", ":")).encode("utf-8")


def reason(response: httpx.Response) -> str:
    try:
        return str(json.loads(response.content).get("reason", ""))[:60]
    except (ValueError, AttributeError):
        return ""


def classify(response: httpx.Response, now: float) -> PushResult:
    """What one answer means (a first 403 ExpiredProviderToken is the caller's: a new token)."""
    status, why = response.status_code, reason(response)
    gone = status == 410 or (status == 400 and why in GONE_REASONS)
    return common.outcome(response, now, common.detail(response, why), sent=status == 200, gone=gone)


class ApnsProvider:
    platform = "apns"

    def __init__(
        self,
        *,
        team_id: str,
        key_id: str,
        key_file: str | Path,
        topic: str,
        base_url: str = PRODUCTION_URL,
        verify: bool | str = True,
        timeout_s: float = common.DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = jws.load_p256_key(key_file)
        self._team_id, self._key_id, self._topic = team_id, key_id, topic
        self._base_url = base_url.rstrip("/")
        self._client = common.make_client(verify=verify, timeout_s=timeout_s, http1=False)
        self._clock = clock
        self._token = ""
        self._token_iat = 0.0

    def provider_token(self, *, refused: str = "") -> str:
        """The current token, renewed when due or when Apple refused it (once for all the sends it
        refused: Apple also refuses renewals that come too often)."""
        now = self._clock()
        if not self._token or refused == self._token or now - self._token_iat >= TOKEN_RENEW_S:
            self._token_iat = now
            self._token = jws.sign(self._key, {"iss": self._team_id, "iat": int(now)}, {"kid": self._key_id})
        return self._token

    async def send(self, target: PushTarget, wake: WakeUp) -> PushResult:
        if not DEVICE_TOKEN.fullmatch(target.token):
            return PushResult(Outcome.REJECTED, detail="not an APNs device token (hex)")
        headers, body = request(wake, self._topic)
        url = f"{self._base_url}/3/device/{target.token}"
        token = self.provider_token()
        response = await self._post(url, headers, body, token)
        if isinstance(response, httpx.Response) and (response.status_code, reason(response)) == (403, EXPIRED):
            response = await self._post(url, headers, body, self.provider_token(refused=token))
        if isinstance(response, PushResult):
            return response
        return classify(response, self._clock())

    async def _post(self, url: str, headers: dict[str, str], body: bytes, token: str) -> httpx.Response | PushResult:
        auth = {"authorization": f"bearer {token}", "content-type": "application/json"}
        return await common.post(self._client, url, headers=headers | auth, content=body)

    async def close(self) -> None:
        await self._client.aclose()


def from_settings(settings: Mapping[str, Any]) -> ApnsProvider:
    return ApnsProvider(
        team_id=common.setting(settings, "team_id", str),
        key_id=common.setting(settings, "key_id", str),
        key_file=common.setting(settings, "key_file", str),
        topic=common.setting(settings, "topic", str),
        base_url=common.setting(settings, "base_url", str, PRODUCTION_URL),
        **common.client_settings(settings),
    )
