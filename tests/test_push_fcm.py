"""providers/push/fcm.py against a local FCM that also plays Google's OAuth token endpoint
(testkit/push_servers.py): the RS256 assertion verified with the service account's public key,
the access token cached and renewed, each answer mapped to the PushResult the push service needs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.push.provider import Outcome, PushTarget, WakeUp
from providers.push import fcm
from providers.push.common import collapse_tag
from testkit.https_server import HttpsServer, Reply, make_tls, pem
from testkit.push_servers import Clock, FakeFcm, fcm_error

PROJECT = "chat-test-1"
EMAIL = "push@chat-test-1.iam.gserviceaccount.com"
TARGET = PushTarget("fcm", "fcm-registration-token-1", "alice/phone")


@dataclass
class Setup:
    provider: fcm.FcmProvider
    fake: FakeFcm
    server: HttpsServer
    clock: Clock

    def wake(self, preview: str | None = None) -> WakeUp:
        return WakeUp("alice/phone", int((self.clock() + 600) * 1000), preview)

    def token_requests(self) -> int:
        return sum(r.path == "/token" for r in self.server.requests)


def service_account(path: Path, key: rsa.RSAPrivateKey, token_uri: str) -> Path:
    path.write_text(json.dumps({
        "type": "service_account", "project_id": PROJECT, "private_key_id": "0123abcd",
        "private_key": pem(key).decode(), "client_email": EMAIL, "token_uri": token_uri,
    }))
    return path


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    clock, key, tls = Clock(), rsa.generate_private_key(65537, 2048), make_tls(tmp_path)
    fake = FakeFcm(clock, PROJECT, EMAIL, key.public_key())
    server = await HttpsServer(fake.handle, tls).start()
    fake.token_uri = f"{server.base_url}/token"
    account = service_account(tmp_path / "sa.json", key, fake.token_uri)
    provider = fcm.FcmProvider(project_id=PROJECT, service_account_file=account, base_url=server.base_url,
                               verify=str(tls.ca_file), timeout_s=5, clock=clock)
    account.unlink()  # read once: the provider never goes back to the file
    yield Setup(provider, fake, server, clock)
    await provider.close()
    await server.close()
    assert fake.faults == []


async def test_sends_a_content_free_high_priority_data_message(setup: Setup) -> None:
    result = await setup.provider.send(TARGET, setup.wake())
    assert result.outcome is Outcome.SENT
    [message] = setup.fake.messages
    assert message["token"] == TARGET.token
    assert message["data"] == {"wake": "1"}  # no body, sender or group: the app fetches
    assert message["android"] == {"priority": "HIGH", "ttl": "600s", "collapse_key": collapse_tag("alice/phone")}
    assert "notification" not in message
    send = setup.server.requests[-1]
    assert send.http_version == "HTTP/2"
    assert send.headers["authorization"].startswith("Bearer ya29.")


async def test_a_preview_goes_in_the_data_when_the_operator_opted_in(setup: Setup) -> None:
    assert (await setup.provider.send(TARGET, setup.wake("c2VhbGVk"))).outcome is Outcome.SENT
    assert setup.fake.messages[0]["data"] == {"wake": "1", "preview": "c2VhbGVk"}


async def test_the_access_token_is_cached_until_shortly_before_it_expires(setup: Setup) -> None:
    for _ in range(3):
        assert (await setup.provider.send(TARGET, setup.wake())).outcome is Outcome.SENT
    assert setup.token_requests() == 1
    setup.clock.advance(3600 - fcm.TOKEN_MARGIN_S - 1)
    assert (await setup.provider.send(TARGET, setup.wake())).outcome is Outcome.SENT
    assert setup.token_requests() == 1
    setup.clock.advance(2)  # inside the margin: renewed before FCM would refuse it
    assert (await setup.provider.send(TARGET, setup.wake())).outcome is Outcome.SENT
    assert setup.token_requests() == 2
    bearers = {r.headers["authorization"] for r in setup.server.requests if r.path != "/token"}
    assert len(bearers) == 2


async def test_concurrent_sends_share_one_token_exchange(setup: Setup) -> None:
    results = await asyncio.gather(*(setup.provider.send(TARGET, setup.wake()) for _ in range(8)))
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert setup.token_requests() == 1


async def test_a_401_gets_one_new_token_and_one_more_try(setup: Setup) -> None:
    assert (await setup.provider.send(TARGET, setup.wake())).outcome is Outcome.SENT
    setup.fake.revoke_all()
    assert (await setup.provider.send(TARGET, setup.wake())).outcome is Outcome.SENT
    assert setup.token_requests() == 2
    setup.fake.revoke_all()
    setup.fake.script.append(fcm_error(401, "UNAUTHENTICATED"))  # still refused with the new token
    result = await setup.provider.send(TARGET, setup.wake())
    assert result.outcome is Outcome.REJECTED
    assert setup.token_requests() == 3


@pytest.mark.parametrize(
    ("reply", "outcome", "retry_after"),
    [
        (fcm_error(404, "NOT_FOUND", "UNREGISTERED"), Outcome.GONE, None),
        (fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"), Outcome.REJECTED, None),
        (fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"), Outcome.REJECTED, None),
        (fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"), Outcome.RETRY, 30.0),
        (fcm_error(503, "UNAVAILABLE", "UNAVAILABLE"), Outcome.RETRY, None),
        (fcm_error(500, "INTERNAL", "INTERNAL"), Outcome.RETRY, 30.0),
    ],
)
async def test_answers_map_to_outcomes(
    setup: Setup, reply: Reply, outcome: Outcome, retry_after: float | None
) -> None:
    if retry_after is not None:
        reply = Reply(reply.status, {**reply.headers, "retry-after": "30"}, reply.body)
    setup.fake.script.append(reply)
    result = await setup.provider.send(TARGET, setup.wake())
    assert (result.outcome, result.retry_after_s) == (outcome, retry_after)
    assert str(reply.status) in result.detail


async def test_the_token_exchange_failing_is_retried_or_rejected(setup: Setup) -> None:
    setup.fake.token_script.append(Reply(503, {"retry-after": "5"}))
    result = await setup.provider.send(TARGET, setup.wake())
    assert (result.outcome, result.retry_after_s) == (Outcome.RETRY, 5.0)
    setup.fake.token_script.append(Reply.json(400, {"error": "invalid_grant", "error_description": "bad"}))
    result = await setup.provider.send(TARGET, setup.wake())
    assert result.outcome is Outcome.REJECTED
    assert "invalid_grant" in result.detail
    assert (await setup.provider.send(TARGET, setup.wake())).outcome is Outcome.SENT
    assert setup.token_requests() == 3


async def test_from_settings_builds_a_working_provider(tmp_path: Path) -> None:
    clock, key, tls = Clock(), rsa.generate_private_key(65537, 2048), make_tls(tmp_path)
    fake = FakeFcm(clock, PROJECT, EMAIL, key.public_key())
    server = await HttpsServer(fake.handle, tls).start()
    fake.token_uri = f"{server.base_url}/token"
    account = service_account(tmp_path / "sa.json", key, fake.token_uri)
    provider = fcm.from_settings({"project_id": PROJECT, "service_account_file": str(account),
                                  "base_url": server.base_url, "verify": str(tls.ca_file), "timeout_s": 5})
    try:
        assert provider.platform == "fcm"
        assert (await provider.send(TARGET, WakeUp("k", 0))).outcome is Outcome.SENT
        assert fake.messages[0]["android"]["ttl"] == "0s"  # already expired: now or never
    finally:
        await provider.close()
        await server.close()
    assert fake.faults == []


def test_a_bad_service_account_file_is_refused_without_showing_the_key(tmp_path: Path) -> None:
    secret = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n"
    bad = tmp_path / "sa.json"
    bad.write_text(json.dumps({"client_email": EMAIL, "private_key": secret, "token_uri": "https://x/token"}))
    with pytest.raises(ValueError) as caught:
        fcm.FcmProvider(project_id=PROJECT, service_account_file=bad)
    assert "c2VjcmV0" not in str(caught.value)
    (tmp_path / "partial.json").write_text(json.dumps({"client_email": EMAIL}))
    with pytest.raises(ValueError, match="not a service account file"):
        fcm.FcmProvider(project_id=PROJECT, service_account_file=tmp_path / "partial.json")
    with pytest.raises(ValueError, match="'project_id' is required"):
        fcm.from_settings({"service_account_file": str(bad)})
