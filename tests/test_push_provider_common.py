"""What the push providers share (providers/push/common.py, jws.py): JWT signing checked against
an independent verifier, Retry-After, the collapse tag, and every provider answering RETRY, not
raising, when the service cannot be reached or does not answer in time."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.push.provider import Outcome, PushProvider, PushResult, PushTarget, WakeUp
from providers.push import apns, fcm, jws, webpush
from providers.push.common import collapse_tag, retry_after_s
from testkit.https_server import pem
from testkit.push_servers import Subscriber, verify_jwt


def test_es256_and_rs256_jwts_verify_with_the_public_key_only() -> None:
    ec_key, rsa_key = ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)
    header, claims = verify_jwt(jws.sign(ec_key, {"iss": "T", "iat": 1}, {"kid": "K"}), ec_key.public_key())
    assert (header, claims) == ({"alg": "ES256", "typ": "JWT", "kid": "K"}, {"iss": "T", "iat": 1})
    assert verify_jwt(jws.sign(rsa_key, {"aud": "a"}), rsa_key.public_key())[0]["alg"] == "RS256"
    head, _, signature = jws.sign(ec_key, {"iss": "T"}).split(".")
    forged = jws.b64url(json.dumps({"iss": "U"}).encode())
    with pytest.raises(ValueError, match="signature"):
        verify_jwt(f"{head}.{forged}.{signature}", ec_key.public_key())
    with pytest.raises(ValueError, match="signature"):
        verify_jwt(jws.sign(ec.generate_private_key(ec.SECP256R1()), {}), ec_key.public_key())


def test_retry_after_is_seconds_or_an_http_date() -> None:
    now = time.time()
    assert retry_after_s("120", now) == 120.0
    assert retry_after_s(formatdate(now + 90, usegmt=True), now) == pytest.approx(90, abs=1)
    assert retry_after_s(formatdate(now - 90, usegmt=True), now) == 0.0
    assert retry_after_s("soon", now) is None
    assert retry_after_s("²", now) is None  # a digit to str.isdigit, not to RFC 9110
    assert retry_after_s("9" * 400, now) == 86400.0
    assert retry_after_s(None, now) is None


def test_the_collapse_tag_fits_web_push_and_apns_and_names_no_one() -> None:
    tag = collapse_tag("alice/phone-1")
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", tag)
    assert tag == collapse_tag("alice/phone-1") != collapse_tag("alice/phone-2")
    assert "alice" not in tag


ProviderFactory = Callable[[Path, str, float], PushProvider]


def make_fcm(tmp: Path, base_url: str, timeout_s: float) -> PushProvider:
    account = tmp / "sa.json"
    account.write_text(json.dumps({"client_email": "a@b", "token_uri": f"{base_url}/token",
                                   "private_key": pem(rsa.generate_private_key(65537, 2048)).decode()}))
    return fcm.FcmProvider(project_id="p", service_account_file=account, base_url=base_url, timeout_s=timeout_s)


def make_apns(tmp: Path, base_url: str, timeout_s: float) -> PushProvider:
    (tmp / "k.p8").write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    return apns.ApnsProvider(team_id="T", key_id="K", key_file=tmp / "k.p8", topic="t", base_url=base_url,
                             timeout_s=timeout_s)


def make_webpush(tmp: Path, base_url: str, timeout_s: float) -> PushProvider:
    (tmp / "v.pem").write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    return webpush.WebPushProvider(vapid_private_key_file=tmp / "v.pem", subject="mailto:a@b", timeout_s=timeout_s,
                                   allow_loopback_endpoints=True)


def target(platform: str, base_url: str) -> PushTarget:
    token = {"fcm": "t", "apns": "ab" * 32, "webpush": Subscriber(f"{base_url}/push/x").subscription()}[platform]
    return PushTarget(platform, token, "alice/phone")


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port that accepts connections and never says a word (not even the TLS handshake)."""
    held: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _r, w: held.append(w), "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for writer in held:
        writer.close()
    await server.wait_closed()


PLATFORMS = ["fcm", "apns", "webpush"]
PROVIDERS = list(zip([make_fcm, make_apns, make_webpush], PLATFORMS, strict=True))


async def send_once(factory: ProviderFactory, tmp: Path, platform: str, port: int, timeout_s: float) -> PushResult:
    base_url = f"https://127.0.0.1:{port}"
    provider = factory(tmp, base_url, timeout_s)
    try:
        return await provider.send(target(platform, base_url), WakeUp("k", 0))
    finally:
        await provider.close()


@pytest.mark.parametrize(("factory", "platform"), PROVIDERS, ids=PLATFORMS)
async def test_a_refused_connection_is_retry(tmp_path: Path, factory: ProviderFactory, platform: str) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await send_once(factory, tmp_path, platform, port, 5.0)
    assert (result.outcome, "ConnectError" in result.detail) == (Outcome.RETRY, True)


@pytest.mark.parametrize(("factory", "platform"), PROVIDERS, ids=PLATFORMS)
async def test_a_silent_service_is_retry_after_the_timeout(
    tmp_path: Path, silent_port: int, factory: ProviderFactory, platform: str
) -> None:
    started = time.monotonic()
    result = await send_once(factory, tmp_path, platform, silent_port, 0.3)
    assert (result.outcome, "Timeout" in result.detail) == (Outcome.RETRY, True)
    assert time.monotonic() - started < 5


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(200, 599),
    body=st.one_of(st.binary(max_size=64), st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
            ["error", "status", "details", "errorCode", "reason", "code"]), inner, max_size=3),
        max_leaves=8).map(lambda v: json.dumps(v).encode())),
    retry_after=st.one_of(st.none(), st.text(max_size=30), st.sampled_from(
        ["31 Dec 9999 23:59:59 -2359", "Tue, 1 Jan 99999999 00:00:00 GMT", "1 Jan 0001 00:00:00 +0000", "1.5"])),
)
def test_any_answer_is_a_result_never_an_exception(status: int, body: bytes, retry_after: str | None) -> None:
    headers = [] if retry_after is None else [(b"retry-after", retry_after.encode("utf-8", "replace"))]
    response = httpx.Response(status, headers=headers, content=body)
    for classify in (fcm.classify, apns.classify, webpush.classify):
        result = classify(response, time.time())
        sent = status == 200 or (classify is webpush.classify and status in (201, 202))
        assert (result.outcome is Outcome.SENT) == sent
        if result.outcome is Outcome.RETRY:
            assert result.retry_after_s is None or result.retry_after_s >= 0
