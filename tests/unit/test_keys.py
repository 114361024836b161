"""The key directory without a network: argument rules of keys.* / devices.remove (bridge/keys/core.py)
and the in-memory set of devices with keys. The key store itself: tests/stores/test_keys.py."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.keys.core import KeyedDevices, KeyRuleError, parse_claim, parse_device, parse_publish
from chatproto import MAX_ONE_TIME_KEYS_PER_PUBLISH


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
