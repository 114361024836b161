"""providers/push/apns.py against a local APNs (testkit/push_servers.py) that speaks only HTTP/2
over TLS with ALPN, verifies the ES256 provider token with the key's PUBLIC half (kid, iss, iat
under an hour) and answers as Apple does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.push.provider import Outcome, PushTarget, WakeUp
from providers.push import apns
from providers.push.common import collapse_tag
from testkit.https_server import HttpsServer, Reply, make_tls, pem
from testkit.push_servers import Clock, FakeApns, apns_error

TEAM, KEY_ID, TOPIC = "TEAM123456", "ABC123DEFG", "com.example.chat"
DEVICE = "a1" * 32
TARGET = PushTarget("apns", DEVICE, "alice/iphone")


@dataclass
class Setup:
    provider: apns.ApnsProvider
    fake: FakeApns
    server: HttpsServer
    clock: Clock

    def wake(self, preview: str | None = None) -> WakeUp:
        return WakeUp("alice/iphone", int((self.clock() + 600) * 1000), preview)

    async def sent(self) -> bool:
        return (await self.provider.send(TARGET, self.wake())).outcome is Outcome.SENT


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    clock, key, tls = Clock(), ec.generate_private_key(ec.SECP256R1()), make_tls(tmp_path)
    fake = FakeApns(clock, TEAM, KEY_ID, key.public_key(), TOPIC)
    server = await HttpsServer(fake.handle, tls, alpn=("h2",)).start()
    key_file = tmp_path / f"AuthKey_{KEY_ID}.p8"
    key_file.write_bytes(pem(key))
    provider = apns.ApnsProvider(team_id=TEAM, key_id=KEY_ID, key_file=key_file, topic=TOPIC,
                                 base_url=server.base_url, verify=str(tls.ca_file), timeout_s=5, clock=clock)
    key_file.unlink()  # read once
    yield Setup(provider, fake, server, clock)
    await provider.close()
    await server.close()
    assert fake.faults == []


async def test_a_background_push_over_http2_carries_nothing_but_the_wake_up(setup: Setup) -> None:
    wake = setup.wake()
    assert (await setup.provider.send(TARGET, wake)).outcome is Outcome.SENT
    [(headers, payload)] = setup.fake.pushes
    assert payload == {"aps": {"content-available": 1}}
    assert headers["apns-push-type"] == "background"
    assert headers["apns-priority"] == "5"
    assert headers["apns-collapse-id"] == collapse_tag("alice/iphone")
    assert headers["apns-expiration"] == str(wake.expires_at_ms // 1000)
    assert setup.server.requests[0].http_version == "HTTP/2"
    assert setup.server.requests[0].path == f"/3/device/{DEVICE}"


async def test_a_preview_goes_as_an_alert_for_the_notification_extension(setup: Setup) -> None:
    assert (await setup.provider.send(TARGET, setup.wake("c2VhbGVk"))).outcome is Outcome.SENT
    [(headers, payload)] = setup.fake.pushes
    assert (headers["apns-push-type"], headers["apns-priority"]) == ("alert", "10")
    assert payload["preview"] == "c2VhbGVk"
    assert payload["aps"]["mutable-content"] == 1


async def test_the_provider_token_is_reused_and_renewed_within_the_hour(setup: Setup) -> None:
    assert all([await setup.sent() for _ in range(3)])
    setup.clock.advance(20 * 60)  # Apple refuses renewals more often than every 20 minutes
    assert await setup.sent()
    setup.clock.advance(apns.TOKEN_RENEW_S - 20 * 60 - 1)
    assert await setup.sent()
    assert len(setup.fake.provider_tokens) == 1
    setup.clock.advance(2)
    assert await setup.sent()
    assert len(setup.fake.provider_tokens) == 2
    setup.clock.advance(3600 + 1)  # past the hour since the last send: renewed, not refused
    assert await setup.sent()
    assert len(setup.fake.provider_tokens) == 3
    assert setup.server.connections == 1  # one HTTP/2 connection kept open, as Apple asks


async def test_expired_provider_token_gets_a_new_token_and_one_more_try(setup: Setup) -> None:
    setup.fake.script.append(apns_error(403, "ExpiredProviderToken"))
    assert await setup.sent()
    assert len(setup.fake.provider_tokens) == 2
    setup.fake.script += [apns_error(403, "ExpiredProviderToken")] * 2
    result = await setup.provider.send(TARGET, setup.wake())
    assert result.outcome is Outcome.REJECTED
    assert len(setup.fake.provider_tokens) == 3


@pytest.mark.parametrize(
    ("reply", "outcome", "retry_after"),
    [
        (apns_error(410, "Unregistered"), Outcome.GONE, None),
        (apns_error(400, "BadDeviceToken"), Outcome.GONE, None),
        (apns_error(400, "DeviceTokenNotForTopic"), Outcome.REJECTED, None),
        (apns_error(403, "InvalidProviderToken"), Outcome.REJECTED, None),
        (apns_error(413, "PayloadTooLarge"), Outcome.REJECTED, None),
        (apns_error(429, "TooManyRequests", {"retry-after": "7"}), Outcome.RETRY, 7.0),
        (apns_error(500, "InternalServerError"), Outcome.RETRY, None),
        (apns_error(503, "ServiceUnavailable", {"retry-after": "120"}), Outcome.RETRY, 120.0),
    ],
)
async def test_answers_map_to_outcomes(setup: Setup, reply: Reply, outcome: Outcome, retry_after: float | None) -> None:
    setup.fake.script.append(reply)
    result = await setup.provider.send(TARGET, setup.wake())
    assert (result.outcome, result.retry_after_s) == (outcome, retry_after)
    assert len(setup.fake.provider_tokens) == 1


async def test_a_token_that_is_not_hex_is_rejected_unsent(setup: Setup) -> None:
    for token in ("../../3/device/" + DEVICE, "zz" * 32, "a1" * 8):
        result = await setup.provider.send(PushTarget("apns", token, "x"), setup.wake())
        assert result.outcome is Outcome.REJECTED
    assert setup.server.requests == []


async def test_it_never_sends_over_http1(tmp_path: Path) -> None:
    key, tls = ec.generate_private_key(ec.SECP256R1()), make_tls(tmp_path)
    fake = FakeApns(Clock(), TEAM, KEY_ID, key.public_key(), TOPIC)
    server = await HttpsServer(fake.handle, tls, alpn=("http/1.1",)).start()
    (tmp_path / "key.p8").write_bytes(pem(key))
    provider = apns.from_settings({"team_id": TEAM, "key_id": KEY_ID, "key_file": str(tmp_path / "key.p8"),
                                   "topic": TOPIC, "base_url": server.base_url, "verify": str(tls.ca_file)})
    try:
        result = await provider.send(TARGET, WakeUp("k", 0))
    finally:
        await provider.close()
        await server.close()
    assert result.outcome is Outcome.RETRY
    assert server.requests == []  # not one HTTP/1.1 request: the server saw the HTTP/2 preface only
    assert server.refused == ["PRI * HTTP/2.0"]


def test_the_key_must_be_p256(tmp_path: Path) -> None:
    (tmp_path / "k.p8").write_bytes(pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(ValueError, match="P-256"):
        apns.ApnsProvider(team_id=TEAM, key_id=KEY_ID, key_file=tmp_path / "k.p8", topic=TOPIC)
