"""Push wiring and the UnifiedPush provider's reading of answers, without a broker: a provider
configured but not importable stops the start with a clear error; HTTP answers map to outcomes."""

from __future__ import annotations

import asyncio
import sys
import types
from email.utils import formatdate

import httpx
import pytest

from bridge.push.provider import Outcome, PushTarget, WakeUp, retry_after_s
from chatserver.config import ConfigError, build_settings
from chatserver.push import build_providers
from chatserver.push_config import PushSettings
from providers.push.unifiedpush import UnifiedPushProvider


def push_settings(**sections: object) -> PushSettings:
    return build_settings({"push": {"enabled": True, **sections}}).push


def test_a_provider_configured_but_missing_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "providers.push.fcm", None)  # as if the module were not in this build
    settings = push_settings(fcm={"project_id": "p", "service_account_file": "/nonexistent.json"})
    with pytest.raises(ConfigError, match=r"push\.fcm is configured but providers\.push\.fcm cannot be imported"):
        build_providers(settings)


def test_a_module_without_the_provider_class_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "providers.push.apns", types.ModuleType("providers.push.apns"))
    settings = push_settings(apns={"team_id": "T", "key_id": "K", "key_file": "/k.p8", "topic": "com.example"})
    with pytest.raises(ConfigError, match="has no provider class"):
        build_providers(settings)


def test_unifiedpush_is_built_from_its_settings() -> None:
    providers = build_providers(push_settings(unifiedpush={"timeout_s": 3.0}))
    assert set(providers) == {"unifiedpush"}
    asyncio.run(providers["unifiedpush"].close())


def test_include_preview_is_refused_until_clients_can_send_one() -> None:
    with pytest.raises(ConfigError, match="include_preview"):
        push_settings(include_preview=True)


def test_retry_after_seconds_and_dates() -> None:
    assert retry_after_s("120", 0.0) == 120.0
    assert retry_after_s(None, 0.0) is None and retry_after_s("soon", 0.0) is None
    assert retry_after_s(formatdate(1_000_030, usegmt=True), 1_000_000.0) == 30.0
    assert retry_after_s(formatdate(999_000, usegmt=True), 1_000_000.0) == 0.0


@pytest.mark.parametrize(("status", "headers", "outcome", "after"), [
    (201, {}, Outcome.SENT, None),
    (200, {}, Outcome.SENT, None),
    (404, {}, Outcome.GONE, None),
    (410, {}, Outcome.GONE, None),
    (429, {"Retry-After": "7"}, Outcome.RETRY, 7.0),
    (503, {}, Outcome.RETRY, None),
    (413, {}, Outcome.REJECTED, None),
    (301, {"Location": "https://elsewhere.example/"}, Outcome.REJECTED, None),
])
def test_answers_map_to_outcomes(status: int, headers: dict[str, str], outcome: Outcome, after: float | None) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, headers=headers)

    async def run() -> None:
        provider = UnifiedPushProvider(transport=httpx.MockTransport(handler))
        try:
            result = await provider.send(PushTarget("unifiedpush", "https://ntfy.example/up1", "bob.phone"),
                                         WakeUp("wake", 2**42))
        finally:
            await provider.close()
        assert (result.outcome, result.retry_after_s) == (outcome, after)

    asyncio.run(run())
    assert len(seen) == 1 and seen[0].method == "POST" and seen[0].headers["urgency"] == "high"


def test_a_refused_connection_is_a_retry() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async def run() -> Outcome:
        provider = UnifiedPushProvider(transport=httpx.MockTransport(handler))
        try:
            result = await provider.send(PushTarget("unifiedpush", "https://x.example/", "b.p"), WakeUp("wake", 0))
            return result.outcome
        finally:
            await provider.close()

    assert asyncio.run(run()) is Outcome.RETRY


def test_push_is_refused_in_cluster_mode() -> None:
    with pytest.raises(ConfigError, match="not available in cluster mode"):
        build_settings({"push": {"enabled": True}, "cluster": {"redis": ["127.0.0.1:7000"]}})
