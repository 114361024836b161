"""providers/push/webpush.py against a local push service (testkit/push_servers.py) that checks
VAPID (the JWT verified with the applicationServerKey, aud, exp, sub) and DECRYPTS each body with
the subscription's private key and auth secret, as the browser would; and RFC 8291's own example."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.push.provider import Outcome, PushTarget, WakeUp
from providers.push import webpush
from providers.push.common import collapse_tag
from providers.push.jws import b64url, b64url_decode
from testkit.https_server import HttpsServer, Reply, make_tls, pem
from testkit.push_servers import Clock, FakeWebPush, Subscriber

SUBJECT = "mailto:ops@example.org"


@dataclass
class Setup:
    provider: webpush.WebPushProvider
    fake: FakeWebPush
    server: HttpsServer
    clock: Clock
    browser: Subscriber

    def wake(self, preview: str | None = None) -> WakeUp:
        return WakeUp("alice/browser", int((self.clock() + 600) * 1000), preview)

    async def send(self, preview: str | None = None) -> Outcome:
        target = PushTarget("webpush", self.browser.subscription(), "alice/browser")
        return (await self.provider.send(target, self.wake(preview))).outcome


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    clock, vapid, tls = Clock(), ec.generate_private_key(ec.SECP256R1()), make_tls(tmp_path)
    fake = FakeWebPush(clock, webpush.public_point(vapid))
    server = await HttpsServer(fake.handle, tls).start()
    fake.origin = server.base_url
    key_file = tmp_path / "vapid.pem"
    key_file.write_bytes(pem(vapid))
    provider = webpush.WebPushProvider(vapid_private_key_file=key_file, subject=SUBJECT, allow_loopback_endpoints=True,
                                       verify=str(tls.ca_file), timeout_s=5, clock=clock)
    key_file.unlink()  # read once
    yield Setup(provider, fake, server, clock, fake.subscribe("alice-browser"))
    await provider.close()
    await server.close()
    assert fake.faults == []


async def test_the_browser_decrypts_a_content_free_wake_up(setup: Setup) -> None:
    assert await setup.send() is Outcome.SENT
    assert await setup.send() is Outcome.SENT
    [(headers, plaintext), (_, again)] = setup.fake.received
    assert plaintext == again == b'{"wake":1}'  # no body, sender or group
    assert headers["ttl"] == "600"
    assert headers["urgency"] == "high"
    assert headers["topic"] == collapse_tag("alice/browser")
    bodies = [r.body for r in setup.server.requests]
    assert bodies[0][:16] != bodies[1][:16]  # a fresh salt (and sender key) per message


async def test_a_preview_is_encrypted_for_the_browser_when_the_operator_opted_in(setup: Setup) -> None:
    assert await setup.send("c2VhbGVk") is Outcome.SENT
    assert json.loads(setup.fake.received[0][1]) == {"wake": 1, "preview": "c2VhbGVk"}


async def test_the_vapid_jwt_is_reused_per_push_service_and_renewed_before_it_expires(setup: Setup) -> None:
    assert await setup.send() is Outcome.SENT
    setup.clock.advance(webpush.VAPID_LIFETIME_S - webpush.VAPID_RENEW_S - 1)
    assert await setup.send() is Outcome.SENT
    assert len(setup.fake.jwts) == 1
    setup.clock.advance(2)
    assert await setup.send() is Outcome.SENT
    assert len(setup.fake.jwts) == 2
    setup.clock.advance(24 * 3600)  # long idle: a JWT past its exp is never sent
    assert await setup.send() is Outcome.SENT
    assert len(setup.fake.jwts) == 3


@pytest.mark.parametrize(
    ("reply", "outcome", "retry_after"),
    [
        (Reply(201), Outcome.SENT, None),
        (Reply(202), Outcome.SENT, None),
        (Reply(404), Outcome.GONE, None),
        (Reply(410), Outcome.GONE, None),
        (Reply(413), Outcome.REJECTED, None),
        (Reply(400), Outcome.REJECTED, None),
        (Reply(429, {"retry-after": "60"}), Outcome.RETRY, 60.0),
        (Reply(500), Outcome.RETRY, None),
        (Reply(503, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}), Outcome.RETRY, 0.0),
    ],
)
async def test_answers_map_to_outcomes(setup: Setup, reply: Reply, outcome: Outcome, retry_after: float | None) -> None:
    setup.fake.script.append(reply)
    target = PushTarget("webpush", setup.browser.subscription(), "alice/browser")
    result = await setup.provider.send(target, setup.wake())
    assert (result.outcome, result.retry_after_s) == (outcome, retry_after)


async def test_a_bad_subscription_or_an_oversized_preview_is_rejected_unsent(setup: Setup) -> None:
    good = json.loads(setup.browser.subscription())
    bad = [
        "not json",
        json.dumps({**good, "endpoint": good["endpoint"].replace("https:", "http:")}),
        json.dumps({**good, "keys": {**good["keys"], "auth": b64url(b"short")}}),
        json.dumps({**good, "keys": {**good["keys"], "p256dh": b64url(b"\x04" + b"x" * 10)}}),
        json.dumps({**good, "keys": {**good["keys"], "p256dh": b64url(b"\x04" + b"x" * 64)}}),  # off the curve
        json.dumps({"endpoint": good["endpoint"]}),
        json.dumps({**good, "endpoint": "https://[::1/push/x"}),
        json.dumps({**good, "endpoint": "https://127.0.0.1:port/push/x"}),
        json.dumps({**good, "endpoint": "https://user:pw@127.0.0.1/push/x"}),
    ]
    for token in bad:
        result = await setup.provider.send(PushTarget("webpush", token, "x"), setup.wake())
        assert result.outcome is Outcome.REJECTED
    result = await setup.provider.send(PushTarget("webpush", setup.browser.subscription(), "x"),
                                       setup.wake("x" * webpush.MAX_PLAINTEXT))
    assert result.outcome is Outcome.REJECTED
    assert setup.server.requests == []


def test_the_vapid_audience_is_the_endpoints_origin() -> None:
    keys = json.loads(Subscriber("https://x").subscription())["keys"]
    for endpoint, origin in [("https://FCM.googleapis.com:443/fcm/send/a", "https://fcm.googleapis.com"),
                             ("https://127.0.0.1:8443/push/x?y=1", "https://127.0.0.1:8443")]:
        subscription = webpush.Subscription.parse(json.dumps({"endpoint": endpoint, "keys": keys}))
        assert subscription is not None
        assert subscription.origin == origin


def test_rfc8291_example() -> None:
    """RFC 8291 section 5, byte for byte (record size 4096)."""
    as_key = ec.derive_private_key(
        int.from_bytes(b64url_decode("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"), "big"), ec.SECP256R1())
    ua_public = b64url_decode("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4")
    body = webpush.encrypt(b"When I grow up, I want to be a watermelon", ua_public,
                           b64url_decode("BTBZMqHH6r4Tts7J_aSIgg"), as_key=as_key,
                           salt=b64url_decode("DGv6ra1nlYgDCS1FRnbzlw"))
    assert b64url(body) == (
        "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK"
        "6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN")
    # and the browser's side (testkit) reads what encrypt() writes at the largest size allowed
    browser = Subscriber("https://push.example/x")
    big = b"y" * webpush.MAX_PLAINTEXT
    body = webpush.encrypt(big, browser.public, browser.auth)
    assert len(body) == webpush.RECORD_SIZE
    assert browser.decrypt(body) == big
    with pytest.raises(ValueError, match="record"):
        webpush.encrypt(big + b"y", browser.public, browser.auth)


def test_the_vapid_key_may_be_pem_or_the_raw_base64url_web_push_tools_print(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "raw").write_text(b64url(key.private_numbers().private_value.to_bytes(32, "big")) + "\n")
    (tmp_path / "pem").write_bytes(pem(key))
    raw = webpush.from_settings({"vapid_private_key_file": str(tmp_path / "raw"), "subject": SUBJECT})
    from_pem = webpush.from_settings({"vapid_private_key_file": str(tmp_path / "pem"), "subject": "https://example.org"})
    assert raw.public_key == from_pem.public_key == b64url(webpush.public_point(key))
    (tmp_path / "junk").write_text("not a key")
    with pytest.raises(ValueError, match="neither a PEM key"):
        webpush.from_settings({"vapid_private_key_file": str(tmp_path / "junk"), "subject": SUBJECT})
    with pytest.raises(ValueError, match="subject"):
        webpush.from_settings({"vapid_private_key_file": str(tmp_path / "pem"), "subject": "ops@example.org"})
