"""Fuzzing ``push.register`` through the real broker (Hypothesis): arbitrary arguments never crash the
broker and never get ``internal``: each request gets exactly one ``res``, ok or refused with
``bad_envelope`` (or ``unsupported`` for a platform the server does not send); a fresh client still pings."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import BrokerThread, Peer, online_peer

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=80))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12),
                                                                                         inner, max_size=4),
                    max_leaves=10)
URLS = st.sampled_from(["https://", "http://", "ftp://", "https://127.0.0.1", "https://[::1]", "https://10.1.2.3",
                        "http://localhost:1", "https://a.example"]).flatmap(
    lambda scheme: st.text(max_size=60).map(lambda rest: scheme + rest))
PLATFORM_ARGS = st.fixed_dictionaries({"platform": st.sampled_from(["fcm", "apns", "webpush", "unifiedpush", "x"])},
                                      optional={"token": st.text(max_size=300) | JSON, "endpoint": URLS | JSON,
                                                "subscription": st.fixed_dictionaries(
                                                    {"endpoint": URLS, "keys": JSON}) | JSON,
                                                "device": st.text(max_size=10)})


@pytest.fixture(scope="module")
def phone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    overrides = {"push.enabled": True, "push.unifiedpush": {}, "push.allow_loopback_endpoints": True}
    broker = BrokerThread(Path(tmp_path_factory.mktemp("fuzzpush")) / "data", overrides).start()
    made: list[Peer] = []
    try:
        broker.add_users({"bob": "bob-pw"})
        yield online_peer(broker.port, made, "bob")
        fresh = Peer(broker.port, "bob", "bob-pw", device=f"d{uuid.uuid4().hex[:8]}")
        made.append(fresh)
        assert fresh.connect() == 0 and fresh.subscribe() == [1]
        assert fresh.request("ping")["ok"] is True
    finally:
        for peer in made:
            peer.close()
        broker.stop()


def answered(phone: Peer, args: Any) -> None:
    res = phone.request("push.register", args)
    assert res["ok"] or res["error"]["code"] in {"bad_envelope", "unsupported"}, res


@FUZZ
@given(args=PLATFORM_ARGS)
def test_fuzzed_registrations_are_answered(phone: Peer, args: dict[str, Any]) -> None:
    answered(phone, args)


@FUZZ
@given(args=st.dictionaries(st.text(max_size=12), JSON, max_size=5))
def test_fuzzed_argument_objects_are_answered(phone: Peer, args: dict[str, Any]) -> None:
    answered(phone, args)
