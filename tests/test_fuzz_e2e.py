"""Fuzzing the end-to-end additions through the real broker (Hypothesis): olm messages with
arbitrary ``bodies``/``body``/``type``/``keys`` (stated identity keys) and keys.* /
devices.remove requests with arbitrary arguments. Each gets exactly one answer -- an
``error``/failed ``res`` naming an input fault (never ``internal``), or ``sent``/a result when
it happens to be valid -- and the broker keeps serving: a ping fence follows every example,
and a fresh client pings after every test."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import WAIT_S, BrokerThread, Peer, is_text

FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MESSAGE_FAULTS = {"bad_json", "bad_envelope", "too_large", "devices_mismatch", "no_keys", "unknown_recipient"}
REQUEST_FAULTS = {"bad_envelope", "forbidden", "unknown_recipient"}
BOB_KEY = "Q1"  # bob.phone's Curve25519 identity key, as the fixture publishes it
OPS = ("keys.publish", "keys.count", "keys.list", "keys.claim", "devices.remove")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Peer]]:
    """One broker; bob.phone with keys (the recipient), mallory.phone (the fuzzer)."""
    overrides = {"limits.send_rate_per_s": 1e6, "limits.send_burst": 1_000_000, "limits.max_body_bytes": 256,
                 "limits.max_devices_per_message": 8}
    broker = BrokerThread(Path(tmp_path_factory.mktemp("fuzz-e2e")) / "data", overrides).start()
    made: dict[str, Peer] = {}
    try:
        for name in ("alice", "bob", "mallory"):
            broker.add_user(name, f"{name}-pw")
        for name in ("bob", "mallory"):
            peer = made[name] = Peer(broker.port, name, f"{name}-pw")
            assert peer.connect() == 0
            assert peer.subscribe() == [1]
        keys = {"user": "bob", "device": "phone", "curve25519": BOB_KEY, "ed25519": "RU", "signature": "U0"}
        assert made["bob"].request("keys.publish", {"device_keys": keys})["ok"]
        yield made
    finally:
        for peer in made.values():
            peer.close()
        broker.stop()


@pytest.fixture(autouse=True)
def still_serving(running: dict[str, Peer]) -> Iterator[None]:
    yield
    fresh = Peer(running["bob"].port, "alice", "alice-pw", device=f"f{uuid.uuid4().hex[:8]}")
    try:
        assert fresh.connect() == 0 and fresh.subscribe() == [1]
        assert fresh.request("ping")["ok"] is True
    finally:
        fresh.close()


def answers_until_fence(peer: Peer, matches: Any) -> list[dict[str, Any]]:
    """Items matching ``matches`` that arrive before the answer to a ping sent once one has arrived."""
    found: list[dict[str, Any]] = []
    fence: str | None = None
    deadline = time.monotonic() + WAIT_S
    while True:
        assert time.monotonic() < deadline, f"no answer within {WAIT_S}s"
        item = peer.items()
        if fence is not None and item.get("rid") == fence:
            return found
        if matches(item):
            found.append(item)
            if fence is None:
                fence = f"fence-{uuid.uuid4().hex}"
                peer.publish("u/mallory/req", {"rid": fence, "op": "ping"})


texts = st.text(max_size=12) | st.sampled_from(["bob.phone", "mallory.phone", "bob.x", "\ud800", "a.b.c"])
values = st.recursive(st.none() | st.booleans() | st.integers() | texts,
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                      max_leaves=10)
bodies = (st.dictionaries(texts, texts | values, max_size=10) | values
          | st.just({"bob.phone": "Y3Q"}) | st.just({"bob.phone": "x" * 300}))


ABSENT = "<no keys field>"
stated_keys = (st.just(ABSENT) | st.just({"bob.phone": BOB_KEY}) | st.just({"bob.phone": "Q2"})
               | st.dictionaries(texts, texts | values, max_size=3) | values)


@FUZZ
@given(bodies=bodies, kind=st.sampled_from(["olm", "text", None, 5]), body=st.sampled_from([None, "hi", 3]),
       to=st.sampled_from(["bob", "alice", "nobody", "mallory"]), keys=stated_keys)
@example(bodies={"bob.phone": "Y3Q"}, kind="olm", body=None, to="bob", keys=ABSENT)
@example(bodies={"bob.phone": "Y3Q"}, kind="olm", body=None, to="bob", keys={"bob.phone": BOB_KEY})
@example(bodies={"bob.phone": "Y3Q"}, kind="olm", body=None, to="bob", keys={"bob.phone": "Q2"})
@example(bodies={"bob.phone": "Y3Q"}, kind="olm", body=None, to="bob", keys={"bob.phone": "\ud800"})
@example(bodies={f"bob.d{n}": "x" for n in range(9)}, kind="olm", body=None, to="bob", keys=ABSENT)
def test_olm_envelopes(running: dict[str, Peer], bodies: Any, kind: Any, body: Any, to: str, keys: Any) -> None:
    msg_id = uuid.uuid4().hex
    obj: dict[str, Any] = {"id": msg_id, "to": to, "bodies": bodies}
    if kind is not None:
        obj["type"] = kind
    if body is not None:
        obj["body"] = body
    if keys != ABSENT:
        obj["keys"] = keys
    mallory = running["mallory"]
    mallory.publish("u/mallory/out", json.dumps(obj).encode())
    [answer] = answers_until_fence(mallory, lambda i: i.get("ref") == msg_id or msg_id in i.get("ids", []))
    if answer["kind"] == "receipt":
        assert answer["status"] == "sent"
        assert obj.get("bodies") == {"bob.phone": "Y3Q"} and to == "bob", "only a valid message is taken"
        assert keys in (ABSENT, {"bob.phone": BOB_KEY}), "only the current identity key, or none stated"
    else:
        assert answer["kind"] == "error" and answer["code"] in MESSAGE_FAULTS, answer
        if answer["code"] == "devices_mismatch" and "missing" in answer:
            assert answer["missing"] in ([], ["bob.phone"]), answer
            assert answer["stale"] in ([], ["bob.phone"]), answer
            if answer["stale"]:
                assert keys["bob.phone"] != BOB_KEY, answer


@FUZZ
@given(op=st.sampled_from(OPS), args=st.dictionaries(
    st.sampled_from(["device_keys", "one_time_keys", "fallback_key", "user", "devices", "device", "x"]), values,
    max_size=3) | st.fixed_dictionaries({"device_keys": st.dictionaries(st.sampled_from(
        ["user", "device", "curve25519", "ed25519", "signature"]), texts | values, max_size=5)}))
@example(op="keys.publish", args={"device_keys": {"user": "mallory", "device": "phone", "curve25519": "Q",
                                                  "ed25519": "R", "signature": "\ud800"}})
@example(op="devices.remove", args={"device": "phone"})
@example(op="keys.claim", args={"user": "bob", "devices": ["phone", "phone"]})
def test_key_requests(running: dict[str, Peer], op: str, args: dict[str, Any]) -> None:
    rid = uuid.uuid4().hex[:16]
    mallory = running["mallory"]
    mallory.publish("u/mallory/req", json.dumps({"rid": rid, "op": op, "args": args}).encode())
    [answer] = answers_until_fence(mallory, lambda i: i.get("rid") == rid or i.get("ref") == rid)
    if not is_text(args):  # a lone surrogate anywhere: refused before the op runs
        assert (answer["kind"], answer["code"], answer["ref"]) == ("error", "bad_json", rid), answer
        return
    assert answer["kind"] == "res", answer
    if not answer["ok"]:
        assert answer["error"]["code"] in REQUEST_FAULTS, answer
