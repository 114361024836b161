"""Push wiring without a broker: every provider is built from its ``push:`` section through its
module's ``from_settings``; a provider configured but missing, or whose key file cannot be read,
stops the start with an error naming it; settings push cannot run with are refused."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from chatserver.config import ConfigError, build_settings
from chatserver.push import build_providers
from chatserver.push_config import PushSettings

PEM = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()


def push_settings(**sections: object) -> PushSettings:
    return build_settings({"push": {"enabled": True, **sections}}).push


def test_every_provider_is_built_from_its_section(tmp_path: Path) -> None:
    account = tmp_path / "fcm.json"
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(*PEM).decode()
    account.write_text(json.dumps({"client_email": "push@p.iam.gserviceaccount.com", "private_key": rsa_pem,
                                   "token_uri": "https://oauth2.googleapis.com/token"}))
    for name in ("apns.p8", "vapid.pem"):
        (tmp_path / name).write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(*PEM))
    settings = push_settings(
        fcm={"project_id": "p", "service_account_file": str(account), "timeout_s": 5},
        apns={"team_id": "T", "key_id": "K", "key_file": str(tmp_path / "apns.p8"), "topic": "com.example.chat",
              "base_url": "https://api.sandbox.push.apple.com"},
        webpush={"vapid_private_key_file": str(tmp_path / "vapid.pem"), "subject": "mailto:ops@example.com"},
        unifiedpush={"timeout_s": 3.0})
    providers = build_providers(settings)
    assert {platform: provider.platform for platform, provider in providers.items()} == {
        "fcm": "fcm", "apns": "apns", "webpush": "webpush", "unifiedpush": "unifiedpush"}

    async def close() -> None:
        for provider in providers.values():
            await provider.close()

    asyncio.run(close())


def test_a_key_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    settings = push_settings(apns={"team_id": "T", "key_id": "K", "key_file": str(tmp_path / "missing.p8"),
                                   "topic": "com.example.chat"})
    with pytest.raises(ConfigError, match=r"push\.apns: .*missing\.p8"):
        build_providers(settings)


def test_a_provider_configured_but_missing_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "providers.push.fcm", None)  # as if the module were not in this build
    settings = push_settings(fcm={"project_id": "p", "service_account_file": "/nonexistent.json"})
    with pytest.raises(ConfigError, match=r"push\.fcm is configured but providers\.push\.fcm cannot be imported"):
        build_providers(settings)


def test_a_module_without_from_settings_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "providers.push.apns", types.ModuleType("providers.push.apns"))
    settings = push_settings(apns={"team_id": "T", "key_id": "K", "key_file": "/k.p8", "topic": "com.example"})
    with pytest.raises(ConfigError, match="has no from_settings"):
        build_providers(settings)


def test_include_preview_is_taken_and_only_client_chosen_urls_get_the_loopback_setting() -> None:
    settings = push_settings(include_preview=True, allow_loopback_endpoints=True, unifiedpush={}, webpush={
        "vapid_private_key_file": "/v.pem", "subject": "mailto:a@b"}, fcm={"project_id": "p",
                                                                           "service_account_file": "/sa.json"})
    assert settings.include_preview
    platforms = settings.platforms()
    assert platforms["unifiedpush"]["allow_loopback_endpoints"] is True
    assert platforms["webpush"]["allow_loopback_endpoints"] is True
    assert "allow_loopback_endpoints" not in platforms["fcm"]  # the operator's own URL


def test_push_and_its_previews_are_taken_in_cluster_mode() -> None:
    settings = build_settings({"push": {"enabled": True}, "cluster": {"redis": ["127.0.0.1:7000"]}})
    assert settings.push.enabled and settings.cluster is not None
    settings = build_settings({"push": {"enabled": True, "include_preview": True},
                               "cluster": {"redis": ["127.0.0.1:7000"]}})
    assert settings.push.include_preview and settings.cluster is not None
