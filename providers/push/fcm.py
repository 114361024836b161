"""FCM HTTP v1 (issue #18): a service account's RS256 JWT exchanged for an OAuth2 access token
(cached until shortly before it expires), then ``messages:send`` with a high-priority data message
that carries no content unless the operator opted into a preview (docs/PUSH-PROVIDERS.md)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.push.provider import Outcome, PushResult, PushTarget, WakeUp
from providers.push import common, jws

DEFAULT_BASE_URL = "https://fcm.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME_S = 3600  # Google's maximum
TOKEN_MARGIN_S = 300  # an access token is renewed this long before it expires
GONE_CODES = frozenset({"UNREGISTERED", "NOT_FOUND"})
RETRY_CODES = frozenset({"UNAVAILABLE", "INTERNAL", "QUOTA_EXCEEDED"})


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    client_email: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    token_uri: str = ""

    @classmethod
    def from_file(cls, path: str | Path) -> ServiceAccount:
        """The JSON key file Firebase hands out; errors name the file and field, never the key."""
        try:
            data = json.loads(Path(path).read_text("utf-8"))
            email, pem, token_uri = data["client_email"], data["private_key"], data["token_uri"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a service account file ({type(exc).__name__})") from None
        key = jws.load_private_key(str(pem).encode("utf-8"))
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path}: private_key is not an RSA key")
        return cls(str(email), key, str(token_uri))

    def assertion(self, now: float) -> str:
        """The signed JWT the token endpoint exchanges (RFC 7523)."""
        iat = int(now)
        claims = {"iss": self.client_email, "scope": SCOPE, "aud": self.token_uri, "iat": iat,
                  "exp": iat + ASSERTION_LIFETIME_S}
        return jws.sign(self.private_key, claims)


def message(token: str, wake: WakeUp, now: float) -> dict[str, Any]:
    """The v1 message: data only (the app wakes, connects and fetches), high priority so Android
    wakes it from Doze, one per collapse key."""
    data = {"wake": "1"} if wake.preview is None else {"wake": "1", "preview": wake.preview}
    android = {"priority": "HIGH", "ttl": f"{common.ttl_s(wake.expires_at_ms, now)}s",
               "collapse_key": common.collapse_tag(wake.collapse_key)}
    return {"message": {"token": token, "data": data, "android": android}}


def error_codes(body: bytes) -> tuple[str, str]:
    """(status, FCM errorCode) of an error answer: {"error": {"status": ..., "details": [{"errorCode"}]}}."""
    try:
        error = json.loads(body)["error"]
        codes = [d.get("errorCode", "") for d in error.get("details", []) if isinstance(d, dict)]
        return str(error.get("status", "")), str(next((c for c in codes if c), ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", ""


def classify(response: httpx.Response, now: float) -> PushResult:
    """What one ``messages:send`` answer means (401 is handled by the caller: a new token)."""
    grpc_status, code = error_codes(response.content) if response.status_code != 200 else ("", "")
    return common.outcome(
        response, now, common.detail(response, f"{grpc_status} {code}".strip()),
        sent=response.status_code == 200,
        gone=response.status_code == 404 or grpc_status in GONE_CODES or code in GONE_CODES,
        retryable=grpc_status in RETRY_CODES or code in RETRY_CODES,
    )


class FcmProvider:
    platform = "fcm"

    def __init__(
        self,
        *,
        project_id: str,
        service_account_file: str | Path,
        base_url: str = DEFAULT_BASE_URL,
        verify: bool | str = True,
        timeout_s: float = common.DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._account = ServiceAccount.from_file(service_account_file)
        self._url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self._client = common.make_client(verify=verify, timeout_s=timeout_s)
        self._clock = clock
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._token_lock = asyncio.Lock()

    async def send(self, target: PushTarget, wake: WakeUp) -> PushResult:
        answer = await self._send_once(target, wake)
        if isinstance(answer, tuple) and answer[0].status_code == 401:
            self._forget(answer[1])  # revoked or expired early: one new token, one more try
            answer = await self._send_once(target, wake)
        if isinstance(answer, PushResult):
            return answer
        return classify(answer[0], self._clock())

    async def _send_once(self, target: PushTarget, wake: WakeUp) -> tuple[httpx.Response, str] | PushResult:
        """The answer and the access token it was sent with, or why there is none."""
        token = await self._access_token()
        if isinstance(token, PushResult):
            return token
        body = json.dumps(message(target.token, wake, self._clock())).encode("utf-8")
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        response = await common.post(self._client, self._url, headers=headers, content=body)
        return response if isinstance(response, PushResult) else (response, token)

    async def close(self) -> None:
        await self._client.aclose()

    def _forget(self, token: str) -> None:
        if self._token == token:
            self._token = None

    async def _access_token(self) -> str | PushResult:
        async with self._token_lock:  # one exchange at a time; the others take its token
            if self._token is not None and self._clock() < self._token_renew_at:
                return self._token
            now = self._clock()
            form = {"grant_type": GRANT_TYPE, "assertion": self._account.assertion(now)}
            headers = {"content-type": "application/x-www-form-urlencoded"}
            response = await common.post(self._client, self._account.token_uri, headers=headers,
                                         content=urlencode(form).encode("ascii"))
            if isinstance(response, PushResult):
                return response
            if common.is_retryable(response.status_code):
                return common.retry(response, now, common.detail(response, "token exchange"))
            granted = token_grant(response)
            if isinstance(granted, str):  # invalid_grant and the like: a deleted key, a wrong clock
                return PushResult(Outcome.REJECTED, detail=common.detail(response, f"token exchange {granted}"))
            token, expires_in = granted
            self._token, self._token_renew_at = token, now + expires_in - TOKEN_MARGIN_S
            return token


def token_grant(response: httpx.Response) -> tuple[str, float] | str:
    """(access token, lifetime in seconds) of a token endpoint's answer, or its OAuth error."""
    try:
        answer = response.json()
    except ValueError:
        return "(not JSON)"
    if not isinstance(answer, dict):
        return "(not an object)"
    try:
        if response.status_code == 200:
            return str(answer["access_token"]), float(answer["expires_in"])
    except (KeyError, TypeError, ValueError):
        return "(no access_token/expires_in)"
    return str(answer.get("error", ""))[:40]


def from_settings(settings: Mapping[str, Any]) -> FcmProvider:
    return FcmProvider(
        project_id=common.setting(settings, "project_id", str),
        service_account_file=common.setting(settings, "service_account_file", str),
        base_url=common.setting(settings, "base_url", str, DEFAULT_BASE_URL),
        **common.client_settings(settings),
    )
