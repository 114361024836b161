"""The UnifiedPush provider (providers/push/unifiedpush.py) against a distributor on 127.0.0.1
(tests/push_distributor.py): the request (POST, TTL, Urgency, Topic, the content-free body) and what
each answer means (sent, gone, retry with Retry-After, rejected; a redirect is not followed), and
that it connects only to the address it checked (a name resolving to this machine is refused)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from bridge.push.provider import Outcome, PushResult, PushTarget, WakeUp
from providers.push import common
from providers.push.unifiedpush import from_settings
from tests.helpers import free_port
from tests.push_distributor import Distributor


def push(endpoint: str, wake: WakeUp | None = None, allow_loopback: bool = True) -> PushResult:
    async def run() -> PushResult:
        provider = from_settings({"timeout_s": 5.0, "allow_loopback_endpoints": allow_loopback})
        try:
            return await provider.send(PushTarget("unifiedpush", endpoint, "bob.phone"),
                                       wake or WakeUp("wake", int(time.time() * 1000) + 3_600_000))
        finally:
            await provider.close()

    return asyncio.run(run())


def test_the_request_is_content_free_rfc_8030(distributor: Distributor) -> None:
    assert push(distributor.endpoint("bob")).outcome is Outcome.SENT
    [request] = distributor.wait(1)
    assert request.method == "POST" and request.path == "/up/bob"
    assert 3590 <= int(request.headers["ttl"]) <= 3600 and request.headers["urgency"] == "high"
    assert request.headers["topic"] == common.collapse_tag("wake") and len(request.headers["topic"]) == 32
    assert json.loads(request.body) == {"wake": 1}


@pytest.mark.parametrize(("status", "headers", "outcome", "after"), [
    (200, {}, Outcome.SENT, None),
    (202, {}, Outcome.SENT, None),
    (404, {}, Outcome.GONE, None),
    (410, {}, Outcome.GONE, None),
    (429, {"Retry_After": "7"}, Outcome.RETRY, 7.0),
    (503, {}, Outcome.RETRY, None),
    (413, {}, Outcome.REJECTED, None),
    (400, {}, Outcome.REJECTED, None),
    (301, {"Location": "http://127.0.0.1:1/elsewhere"}, Outcome.REJECTED, None),
])
def test_answers(distributor: Distributor, status: int, headers: dict[str, str], outcome: Outcome,
                 after: float | None) -> None:
    distributor.answer(status, **headers)
    result = push(distributor.endpoint("bob"))
    assert (result.outcome, result.retry_after_s) == (outcome, after)
    assert len(distributor.wait(1)) == 1  # a redirect is not followed


def test_a_refused_connection_is_a_retry() -> None:
    assert push(f"http://127.0.0.1:{free_port()}/up/bob").outcome is Outcome.RETRY


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the provider resolves, as this test says (any other name: not found)."""
    names: dict[str, list[str]] = {}

    async def resolve(host: str, port: int) -> list[str]:
        if host not in names:
            raise OSError(f"{host}: no such name (test resolver)")
        return names[host]

    monkeypatch.setattr(common, "resolve", resolve)
    return names


def test_a_name_resolving_to_this_machine_is_refused(distributor: Distributor, resolver: dict[str, list[str]]) -> None:
    resolver["push.example.test"] = ["127.0.0.1"]
    result = push(f"http://push.example.test:{distributor.port}/up/bob", allow_loopback=False)
    assert result.outcome is Outcome.REJECTED and "loopback" in result.detail
    resolver["mapped.example.test"] = ["::ffff:127.0.0.1"]
    assert push(f"http://mapped.example.test:{distributor.port}/up/bob", allow_loopback=False).outcome \
        is Outcome.REJECTED
    assert distributor.requests == []


def test_the_connection_goes_to_the_checked_address_with_the_name_kept(
        distributor: Distributor, resolver: dict[str, list[str]]) -> None:
    # push.example.test exists only in the test's resolver: the connection was made to the address
    # checked, not to a name resolved again (which would fail, or, rebound, reach another address).
    resolver["push.example.test"] = ["127.0.0.1"]
    assert push(f"http://push.example.test:{distributor.port}/up/bob").outcome is Outcome.SENT
    [request] = distributor.wait(1)
    assert request.headers["host"] == f"push.example.test:{distributor.port}"


def test_one_internal_address_among_others_refuses_the_name(distributor: Distributor,
                                                           resolver: dict[str, list[str]]) -> None:
    resolver["push.example.test"] = ["127.0.0.1", "10.1.2.3"]  # loopback allowed here, private never
    result = push(f"http://push.example.test:{distributor.port}/up/bob")
    assert result.outcome is Outcome.REJECTED and "10.1.2.3" in result.detail
    assert distributor.requests == []


def test_a_name_that_does_not_resolve_is_a_retry(resolver: dict[str, list[str]]) -> None:
    assert push("https://gone.example.test/up/bob").outcome is Outcome.RETRY


@pytest.mark.parametrize(("addresses", "allow_loopback", "allowed"), [
    (["8.8.8.8"], False, True),
    (["2001:4860:4860::8888"], False, True),
    (["8.8.8.8", "192.168.1.1"], False, False),
    (["127.0.0.1"], True, True),
    (["::1"], False, False),
    (["::ffff:10.0.0.1"], True, False),
    (["169.254.169.254"], True, False),
    (["fe80::1%eth0"], True, False),
    (["0.0.0.0"], True, False),
    (["239.1.2.3"], True, False),
    (["64:ff9b::a00:1"], True, False),  # NAT64 of 10.0.0.1
])
def test_the_guard_checks_every_address(resolver: dict[str, list[str]], addresses: list[str], allow_loopback: bool,
                                        allowed: bool) -> None:
    """The decision alone (no connection is made: a public address is never contacted by a test)."""
    resolver["push.example.org"] = addresses
    guard = common.EndpointGuard(allow_loopback)

    async def check() -> list[str]:
        return await guard.addresses("push.example.org", 443, 5.0)

    if allowed:
        assert asyncio.run(check()) == addresses
    else:
        with pytest.raises(common.ForbiddenAddress):
            asyncio.run(check())
