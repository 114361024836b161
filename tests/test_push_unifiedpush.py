"""The UnifiedPush provider (providers/push/unifiedpush.py) against a distributor on 127.0.0.1
(tests/push_distributor.py): the request (POST, TTL, Urgency, Topic, the content-free body) and what
each answer means (sent, gone, retry with Retry-After, rejected; a redirect is not followed)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from bridge.push.provider import Outcome, PushResult, PushTarget, WakeUp
from providers.push import common
from providers.push.unifiedpush import from_settings
from tests.helpers import free_port
from tests.push_distributor import Distributor


@pytest.fixture
def distributor() -> Iterator[Distributor]:
    running = Distributor().start()
    yield running
    running.stop()


def push(endpoint: str, wake: WakeUp | None = None) -> PushResult:
    async def run() -> PushResult:
        provider = from_settings({"timeout_s": 5.0})
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
