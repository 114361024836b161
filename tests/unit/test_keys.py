"""The key directory without a network: argument rules of keys.* / devices.remove (bridge/keys/core.py),
the in-memory set of devices with keys, and the SQLite key store (publish limits, reinstall,
claims that take each one-time key once, also when a publish is retried or claims overlap)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.keys.core import KeyedDevices, KeyRuleError, parse_claim, parse_device, parse_publish
from chatproto import MAX_ONE_TIME_KEYS_PER_PUBLISH, MAX_ONE_TIME_KEYS_STORED
from storage.sqlite.keys import SqliteKeyStore


def device_keys(user: str = "bob", device: str = "phone", curve: str = "Q1VSVkU") -> dict[str, Any]:
    return {"user": user, "device": device, "curve25519": curve, "ed25519": "RUQyNTUxOQ", "signature": "U0lH"}


def otks(first: int, count: int) -> dict[str, Any]:
    return {f"AAA{n}": {"key": f"a2V5{n}", "signature": "c2ln"} for n in range(first, first + count)}


def test_publish_parses_all_three_parts() -> None:
    args = {"device_keys": device_keys(), "one_time_keys": otks(0, 2),
            "fallback_key": {"id": "FB1", "key": "ZmI", "signature": "c2ln"}}
    publish = parse_publish("bob", "phone", args)
    assert publish.device_keys is not None and publish.device_keys.signed == device_keys()
    assert [k.id for k in publish.one_time_keys] == ["AAA0", "AAA1"]
    assert publish.fallback_key is not None and publish.fallback_key.id == "FB1"
    assert parse_publish("bob", "phone", {}).device_keys is None


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"device_keys": device_keys(user="alice")}, "forbidden"),
        ({"device_keys": device_keys(device="laptop")}, "forbidden"),
        ({"device_keys": {**device_keys(), "extra": 1}}, "bad_envelope"),
        ({"device_keys": {**device_keys(), "curve25519": "not base64!"}}, "bad_envelope"),
        ({"device_keys": {**device_keys(), "signature": 5}}, "bad_envelope"),
        ({"one_time_keys": []}, "bad_envelope"),
        ({"one_time_keys": {"id with space": {"key": "a", "signature": "b"}}}, "bad_envelope"),
        ({"one_time_keys": {"k": {"key": "a"}}}, "bad_envelope"),
        ({"one_time_keys": otks(0, MAX_ONE_TIME_KEYS_PER_PUBLISH + 1)}, "bad_envelope"),
        ({"fallback_key": {"key": "a", "signature": "b"}}, "bad_envelope"),
        ({"other": 1}, "bad_envelope"),
    ],
)
def test_publish_rules(args: dict[str, Any], code: str) -> None:
    with pytest.raises(KeyRuleError) as info:
        parse_publish("bob", "phone", args)
    assert info.value.code == code


def test_claim_and_remove_arguments() -> None:
    assert parse_claim({"user": "bob"}) == ("bob", None)
    assert parse_claim({"user": "bob", "devices": ["phone", "phone", "tab"]}) == ("bob", ["phone", "tab"])
    for bad in ({}, {"user": "Bob"}, {"user": "bob", "devices": []}, {"user": "bob", "devices": ["a.b"]},
                {"user": "bob", "x": 1}):
        with pytest.raises(KeyRuleError):
            parse_claim(bad)
    assert parse_device({"device": "phone"}) == "phone"
    for bad in ({}, {"device": "a.b"}, {"device": "phone", "x": 1}):
        with pytest.raises(KeyRuleError):
            parse_device(bad)


def test_keyed_devices() -> None:
    keyed = KeyedDevices([("bob", "phone", "K1"), ("bob", "tab", "K2"), ("alice", "phone", "K3")])
    assert keyed.of_user("bob") == {"bob.phone", "bob.tab"}
    keyed.remove("bob", "phone")
    keyed.remove("alice", "phone")
    keyed.add("carol", "x", "K4")
    assert keyed.of_user("bob") == {"bob.tab"} and keyed.of_user("alice") == frozenset()
    assert keyed.of_user("carol") == {"carol.x"}
    assert (keyed.key_of("carol.x"), keyed.key_of("bob.phone")) == ("K4", None), "a removed device has no key"


def test_keyed_devices_name_stale_identity_keys() -> None:
    keyed = KeyedDevices([("bob", "phone", "OLD"), ("bob", "tab", "T")])
    stated = {"bob.phone": "OLD", "bob.tab": "T", "carol.x": "C"}
    assert keyed.stale(stated, ["bob.phone", "bob.tab"]) == []
    keyed.add("bob", "phone", "NEW")  # a reinstall under the same device id
    assert keyed.of_user("bob") == {"bob.phone", "bob.tab"}
    assert keyed.stale(stated, ["bob.tab", "bob.phone"]) == ["bob.phone"]
    assert keyed.stale(stated, ["bob.tab"]) == [], "only the devices asked about"
    assert keyed.stale({"bob.tab": "T"}, ["bob.phone", "bob.tab"]) == [], "a device without a stated key is not stale"


# --- the SQLite store ------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteKeyStore]:
    opened = await SqliteKeyStore.open(tmp_path)
    try:
        yield opened
    finally:
        await opened.close()


async def publish(store: SqliteKeyStore, args: dict[str, Any], device: str = "phone") -> tuple[int, bool]:
    return await store.publish("bob", device, parse_publish("bob", device, args))


async def test_one_time_keys_need_device_keys_first(store: SqliteKeyStore) -> None:
    with pytest.raises(KeyRuleError, match="device_keys"):
        await publish(store, {"one_time_keys": otks(0, 1)})
    assert await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 3)}) == (3, True)
    assert await publish(store, {"one_time_keys": otks(3, 2)}) == (5, True)
    assert await store.count("bob", "phone") == (5, False)
    assert await store.keyed_devices() == [("bob", "phone", "Q1VSVkU")]


async def test_claims_take_each_key_once_then_the_fallback(store: SqliteKeyStore) -> None:
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


async def test_device_without_keys_is_left_out_of_claims(store: SqliteKeyStore) -> None:
    await publish(store, {"device_keys": device_keys()})
    assert await store.claim("bob", None) == {}
    assert await store.device_keys("bob") == {"phone": device_keys()}
    assert await store.device_keys("nobody") == {}


async def test_stored_limit_refuses_the_whole_publish(store: SqliteKeyStore) -> None:
    batch = MAX_ONE_TIME_KEYS_PER_PUBLISH
    await publish(store, {"device_keys": device_keys()})
    for first in range(0, MAX_ONE_TIME_KEYS_STORED, batch):
        await publish(store, {"one_time_keys": otks(first, batch)})
    with pytest.raises(KeyRuleError, match=str(MAX_ONE_TIME_KEYS_STORED)):
        await publish(store, {"one_time_keys": otks(MAX_ONE_TIME_KEYS_STORED, 1),
                              "fallback_key": {"id": "FB", "key": "ZmI", "signature": "c2ln"}})
    assert await store.count("bob", "phone") == (MAX_ONE_TIME_KEYS_STORED, False), "nothing of it was stored"


async def test_same_id_with_another_key_is_refused(store: SqliteKeyStore) -> None:
    await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 1)})
    await publish(store, {"one_time_keys": otks(0, 1)})  # the same again: a retry, accepted
    with pytest.raises(KeyRuleError, match="another key"):
        await publish(store, {"one_time_keys": {"AAA0": {"key": "b3RoZXI", "signature": "c2ln"}}})


async def test_new_identity_keys_drop_the_old_keys(store: SqliteKeyStore) -> None:
    await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 3),
                          "fallback_key": {"id": "FB", "key": "ZmI", "signature": "c2ln"}})
    await store.claim("bob", None)
    assert await publish(store, {"device_keys": device_keys()}) == (2, True), "same keys again: nothing changes"
    assert await publish(store, {"device_keys": device_keys(curve="TkVX"), "one_time_keys": otks(0, 1)}) == (1, True)
    assert await store.count("bob", "phone") == (1, False)
    assert (await store.claim("bob", None))["phone"]["id"] == "AAA0", "claimed ids are forgotten on a reinstall"
    assert await store.keyed_devices() == [("bob", "phone", "TkVX")], "the new identity key is what boot loads"


async def test_remove_device_forgets_everything(store: SqliteKeyStore) -> None:
    await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 3)})
    await publish(store, {"device_keys": device_keys(device="tab"), "one_time_keys": otks(0, 1)}, device="tab")
    await store.remove_device("bob", "phone")
    assert await store.keyed_devices() == [("bob", "tab", "Q1VSVkU")]
    assert await store.count("bob", "phone") == (0, False)
    assert set(await store.claim("bob", None)) == {"tab"}


async def test_concurrent_claims_on_one_connection_never_share_a_key(store: SqliteKeyStore) -> None:
    await publish(store, {"device_keys": device_keys(), "one_time_keys": otks(0, 50)})
    results = await asyncio.gather(*(store.claim("bob", None) for _ in range(60)))
    ids = [r["phone"]["id"] for r in results if r]
    assert sorted(ids) == sorted(otks(0, 50)), "each key exactly once"
    assert sum(1 for r in results if not r) == 10, "then nothing: no fallback key was published"
