"""The ``KeyStore`` contract (bridge/keys/store.py): publish limits, a reinstall, claims that take each
one-time key at most once -- also when a publish is retried or claims overlap, on one handle or two --
then the fallback key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.keys.core import KeyRuleError, parse_publish
from bridge.keys.store import KeyStore
from chatproto import MAX_ONE_TIME_KEYS_PER_PUBLISH, MAX_ONE_TIME_KEYS_STORED
from tests.stores.backends import Backend
from tests.unit.test_keys import device_keys, otks


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[KeyStore]:
    opened = await backend.keys()
    try:
        yield opened
    finally:
        await opened.close()


async def publish(store: KeyStore, args: dict[str, Any], device: str = "phone") -> tuple[int, bool]:
    return await store.publish("bob", device, parse_publish("bob", device, args))


async def test_one_time_keys_need_device_keys_first(store: KeyStore) -> None:
    with pytest.raises(KeyRuleError, match="device_keys"):
        await publish(store, {"one_time_keys": otks(0, 1)})
    assert await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 3)}) == (3, True)
    assert await publish(store, {"one_time_keys": otks(3, 2)}) == (5, True)
    assert await store.count("bob", "phone") == (5, False)
    assert await store.keyed_devices() == [("bob", "phone", "Q1VSVkU")]


async def test_claims_take_each_key_once_then_the_fallback(store: KeyStore) -> None:
    await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 2),
                          "fallback_key": {"id": "FB", "key": "ZmI", "signature": "c2ln"}})
    first = await store.claim("bob", None)
    second = await store.claim("bob", ["phone", "unknown"])
    third = await store.claim("bob", None)
    assert [first["phone"]["id"], second["phone"]["id"]] == ["AAA0", "AAA1"]
    assert not first["phone"]["fallback"]
    assert third == {"phone": {"id": "FB", "key": "ZmI", "signature": "c2ln", "fallback": True}}
    assert await store.count("bob", "phone") == (0, True)
    # A retried publish of claimed keys does not bring them back.
    assert await publish(store, {"one_time_keys": otks(0, 2)}) == (0, True)
    assert (await store.claim("bob", None))["phone"]["fallback"]


async def test_device_without_keys_is_left_out_of_claims(store: KeyStore) -> None:
    await publish(store, {"device_keys": device_keys()})
    assert await store.claim("bob", None) == {}
    assert await store.device_keys("bob") == {"phone": device_keys()}
    assert await store.device_keys("nobody") == {}


async def test_stored_limit_refuses_the_whole_publish(store: KeyStore) -> None:
    batch = MAX_ONE_TIME_KEYS_PER_PUBLISH
    await publish(store, {"device_keys": device_keys()})
    for first in range(0, MAX_ONE_TIME_KEYS_STORED, batch):
        await publish(store, {"one_time_keys": otks(first, batch)})
    with pytest.raises(KeyRuleError, match=str(MAX_ONE_TIME_KEYS_STORED)):
        await publish(store, {"one_time_keys": otks(MAX_ONE_TIME_KEYS_STORED, 1),
                              "fallback_key": {"id": "FB", "key": "ZmI", "signature": "c2ln"}})
    assert await store.count("bob", "phone") == (MAX_ONE_TIME_KEYS_STORED, False), "nothing of it was stored"


async def test_same_id_with_another_key_is_refused(store: KeyStore) -> None:
    await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 1)})
    await publish(store, {"one_time_keys": otks(0, 1)})  # the same again: a retry, accepted
    with pytest.raises(KeyRuleError, match="another key"):
        await publish(store, {"one_time_keys": {"AAA0": {"key": "b3RoZXI", "signature": "c2ln"}}})


async def test_new_identity_keys_drop_the_old_keys(store: KeyStore) -> None:
    await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 3),
                          "fallback_key": {"id": "FB", "key": "ZmI", "signature": "c2ln"}})
    await store.claim("bob", None)
    assert await publish(store, {"device_keys": device_keys()}) == (2, True), "same keys again: nothing changes"
    assert await publish(store, {"device_keys": device_keys(curve="TkVX"), "one_time_keys": otks(0, 1)}) == (1, True)
    assert await store.count("bob", "phone") == (1, False)
    assert (await store.claim("bob", None))["phone"]["id"] == "AAA0", "claimed ids are forgotten on a reinstall"
    assert await store.keyed_devices() == [("bob", "phone", "TkVX")], "the new identity key is what boot loads"


async def test_remove_device_forgets_everything(store: KeyStore) -> None:
    await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 3)})
    await publish(store, {"device_keys": device_keys(device="tab"), "one_time_keys": otks(0, 1)}, device="tab")
    await store.remove_device("bob", "phone")
    assert await store.keyed_devices() == [("bob", "tab", "Q1VSVkU")]
    assert await store.count("bob", "phone") == (0, False)
    assert set(await store.claim("bob", None)) == {"tab"}


async def test_concurrent_claims_on_one_connection_never_share_a_key(store: KeyStore) -> None:
    await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 50)})
    results = await asyncio.gather(*(store.claim("bob", None) for _ in range(60)))
    ids = [r["phone"]["id"] for r in results if r]
    assert sorted(ids) == sorted(otks(0, 50)), "each key exactly once"
    assert sum(1 for r in results if not r) == 10, "then nothing: no fallback key was published"


async def test_concurrent_claims_on_two_handles_never_share_a_key(backend: Backend, store: KeyStore) -> None:
    """Two handles on the same keys: two processes, or two nodes of a cluster."""
    await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 40)})
    other = await backend.keys()
    try:
        results = await asyncio.gather(*(handle.claim("bob", None) for _ in range(25) for handle in (store, other)))
    finally:
        await other.close()
    ids = [r["phone"]["id"] for r in results if r]
    assert sorted(ids) == sorted(otks(0, 40)), "each key exactly once, whichever handle claimed it"
    assert await store.count("bob", "phone") == (0, False)


async def test_a_claim_for_named_devices_takes_only_theirs(store: KeyStore) -> None:
    await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 2)})
    await publish(store, {"device_keys": device_keys(device="tab"), "one_time_keys": otks(10, 2)}, device="tab")
    assert {d: k["id"] for d, k in (await store.claim("bob", None)).items()} == {"phone": "AAA0", "tab": "AAA10"}
    assert {d: k["id"] for d, k in (await store.claim("bob", ["tab"])).items()} == {"tab": "AAA11"}
    assert (await store.count("bob", "phone"), await store.count("bob", "tab")) == ((1, False), (0, False))
    assert await store.claim("alice", None) == {}, "keys are per user"


async def test_keys_survive_reopening(backend: Backend, store: KeyStore) -> None:
    await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 2),
                          "fallback_key": {"id": "FB", "key": "ZmI", "signature": "c2ln"}})
    await store.claim("bob", None)
    again = await backend.keys()
    try:
        assert await again.count("bob", "phone") == (1, True)
        assert await again.device_keys("bob") == {"phone": device_keys()}
        assert await again.keyed_devices() == [("bob", "phone", "Q1VSVkU")]
        assert (await again.claim("bob", None))["phone"]["id"] == "AAA1"
    finally:
        await again.close()
