"""Olm messages in the staging core and store, without a network: each device gets only its own
ciphertext (and the sender's device as ``dev``), the required device set and its refusals
(devices_mismatch holds later messages, no_keys, encryption_required), stated identity keys that a
reinstall replaced (``stale``), ``delivered`` only from the recipient, a ciphertext leaves memory and
disk with its item, eviction and reload after a flush, devices.remove, and the upgrade of a
staging.db written by schema 1."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

from bridge.directory import Directory
from bridge.keys.core import KeyedDevices
from bridge.limits import RateLimiter, RecentIds
from bridge.messaging.core import Staging
from bridge.messaging.records import FlushBatch, Rules, StagingOutcome
from chatproto import OLM_TYPE, ChatMessage
from storage.sqlite.messages import MIGRATIONS, STAGING_DB, SqliteMessageStore

RULES = Rules(flush_s=0.05, ttl_ms=10_000, window=8, redeliver_after_s=5.0, max_queue=100, dedup_window_ms=60_000)
DEVICES = [("alice", "phone"), ("alice", "tab"), ("bob", "phone"), ("bob", "laptop"), ("bob", "old"), ("carol", "x")]
KEYED = [("alice", "phone", "K-ap"), ("alice", "tab", "K-at"), ("bob", "phone", "K-bp"), ("bob", "laptop", "K-bl")]
# bob.old has no keys
FOR_BOB = {"bob.phone": "ct-bp", "bob.laptop": "ct-bl", "alice.tab": "ct-at"}
KEYS_FOR_BOB = {"bob.phone": "K-bp", "bob.laptop": "K-bl", "alice.tab": "K-at"}


def core(rules: Rules = RULES) -> Staging:
    directory = Directory()
    directory.load(DEVICES)
    return Staging(rules, 1, directory, RateLimiter(1.0, 1000), RecentIds(1000), KeyedDevices(KEYED))


def olm(msg_id: str, bodies: dict[str, str], to: str = "bob", keys: dict[str, str] | None = None) -> ChatMessage:
    return ChatMessage(msg_id, to, "", OLM_TYPE, None, bodies, keys)


def sent_to(out: StagingOutcome) -> dict[str, dict[str, Any]]:
    """The items delivered, by device, as each device reads them."""
    return {device: json.loads(item.encode()) for device, item in out.deliveries}


def errors(out: StagingOutcome) -> list[dict[str, Any]]:
    return [json.loads(item.encode()) for _, item in out.notices if item.KIND == "error"]


def online(s: Staging, *devices: str) -> None:
    for device in devices:
        s.device_online(device, 0.0)


def test_each_device_gets_only_its_own_ciphertext() -> None:
    s = core()
    online(s, "bob.phone", "bob.laptop", "bob.old", "alice.tab", "alice.phone")
    out = sent_to(s.submit("alice.phone", "alice", olm("m1", FOR_BOB), 1000, 0.0))
    assert set(out) == set(FOR_BOB), "not bob.old (no keys), not the sending device"
    for device, item in out.items():
        assert (item["body"], item["dev"], item["type"]) == (FOR_BOB[device], "phone", OLM_TYPE)
        assert (item["from"], item["to"], item["id"]) == ("alice", "bob", "m1")


def test_delivered_only_after_a_recipient_device_acks() -> None:
    s = core()
    online(s, "bob.phone", "alice.tab")
    out = sent_to(s.submit("alice.phone", "alice", olm("m1", FOR_BOB), 1000, 0.0))
    history = s.ack("alice.tab", [out["alice.tab"]["seq"]], 1001, 0.01)
    assert not history.deliveries, "the sender's own device acking is no delivery"
    acked = s.ack("bob.phone", [out["bob.phone"]["seq"]], 1002, 0.02)
    assert not acked.deliveries, "held until the message is safe: bob.laptop's copy is in memory only"
    batch = s.take_flush(1.0)
    assert batch is not None
    delivered = s.flush_done(batch)
    assert {(d, getattr(i, "status", None)) for d, i in delivered.deliveries} == {("alice.tab", "delivered")}


def test_mismatch_names_missing_and_extra_and_holds_later_messages() -> None:
    s = core()
    wrong = {"bob.phone": "a", "bob.old": "b", "carol.x": "c"}
    out = s.submit("alice.phone", "alice", olm("m1", wrong), 1000, 0.0)
    [error] = errors(out)
    assert (error["code"], error["ref"]) == ("devices_mismatch", "m1")
    assert error["missing"] == ["alice.tab", "bob.laptop"] and error["extra"] == ["bob.old", "carol.x"]
    assert error["stale"] == []
    [held] = errors(s.submit("alice.phone", "alice", olm("m2", FOR_BOB), 1000, 0.1))
    assert (held["code"], held["ref"]) == ("devices_mismatch", "m2")
    assert errors(s.submit("alice.tab", "alice", ChatMessage("t1", "bob", "plain"), 1000, 0.1)) == [], \
        "only the refused device is held"
    assert not errors(s.submit("alice.phone", "alice", olm("m1", FOR_BOB), 1000, 0.2)), "the re-send is taken"
    assert not errors(s.submit("alice.phone", "alice", olm("m2", FOR_BOB), 1000, 0.3))


def test_stated_identity_keys_must_be_current() -> None:
    s = core()
    assert not errors(s.submit("alice.phone", "alice", olm("m1", FOR_BOB, keys=KEYS_FOR_BOB), 1000, 0.0))
    s.keyed.add("bob", "laptop", "K-bl-new")  # bob reinstalled his laptop (what keys.publish does)
    [error] = errors(s.submit("alice.phone", "alice", olm("m2", FOR_BOB, keys=KEYS_FOR_BOB), 1000, 0.1))
    assert (error["code"], error["ref"]) == ("devices_mismatch", "m2")
    assert (error["missing"], error["extra"], error["stale"]) == ([], [], ["bob.laptop"])
    [held] = errors(s.submit("alice.phone", "alice", olm("m3", FOR_BOB), 1000, 0.2))
    assert (held["code"], held["ref"]) == ("devices_mismatch", "m3"), "held behind m2"
    assert ("alice", "m2") not in s.live, "nothing of the refused message is staged"
    fresh = {**KEYS_FOR_BOB, "bob.laptop": "K-bl-new"}
    assert not errors(s.submit("alice.phone", "alice", olm("m2", FOR_BOB, keys=fresh), 1000, 0.3))
    assert not errors(s.submit("alice.phone", "alice", olm("m3", FOR_BOB), 1000, 0.4)), \
        "without 'keys' only the device ids are checked (an older SDK)"


def test_stale_is_reported_with_missing_and_extra() -> None:
    s = core()
    s.keyed.add("bob", "phone", "K-bp-new")
    bodies = {"bob.phone": "a", "bob.old": "b", "alice.tab": "c"}
    keys = {"bob.phone": "K-bp", "bob.old": "whatever", "alice.tab": "K-at"}
    [error] = errors(s.submit("alice.phone", "alice", olm("m1", bodies, keys=keys), 1000, 0.0))
    assert (error["missing"], error["extra"], error["stale"]) == (["bob.laptop"], ["bob.old"], ["bob.phone"])


def test_no_keys_is_not_held() -> None:
    s = core()
    [error] = errors(s.submit("alice.phone", "alice", olm("m1", {"carol.x": "c"}, to="carol"), 1000, 0.0))
    assert (error["code"], error["ref"]) == ("no_keys", "m1")
    assert not errors(s.submit("alice.phone", "alice", olm("m2", FOR_BOB), 1000, 0.1))


def test_message_to_oneself_goes_to_the_other_devices() -> None:
    s = core()
    out = s.submit("alice.phone", "alice", olm("m1", {"alice.tab": "x"}, to="alice"), 1000, 0.0)
    assert not errors(out) and s.boxes["alice.tab"].items
    [error] = errors(s.submit("alice.tab", "alice", olm("m2", {"alice.tab": "x"}, to="alice"), 1000, 0.0))
    assert (error["missing"], error["extra"]) == (["alice.phone"], ["alice.tab"])


def test_require_encryption_refuses_plain_bodies() -> None:
    s = core(dataclasses.replace(RULES, require_encryption=True))
    [error] = errors(s.submit("alice.phone", "alice", ChatMessage("m1", "bob", "plain"), 1000, 0.0))
    assert (error["code"], error["ref"]) == ("encryption_required", "m1")
    assert not errors(s.submit("alice.phone", "alice", olm("m2", FOR_BOB), 1000, 0.0))


def test_ack_drops_that_devices_ciphertext_and_the_rest_stays() -> None:
    s = core()
    online(s, "bob.phone")
    out = sent_to(s.submit("alice.phone", "alice", olm("m1", FOR_BOB), 1000, 0.0))
    item = s.boxes["bob.phone"].items[out["bob.phone"]["seq"]]
    s.ack("bob.phone", [item.seq], 1001, 0.01)
    assert item.body is None
    batch = s.take_flush(1.0)
    assert batch is not None
    assert {i.device: i.body for i in batch.items if i.message} == {"bob.laptop": "ct-bl", "alice.tab": "ct-at"}
    assert [m.body for m in batch.bodies] == [""], "no plaintext-like body is kept for an olm message"


def on_disk(s: Staging) -> FlushBatch:
    """Submit FOR_BOB as m1 while nobody is online, and write it."""
    s.submit("alice.phone", "alice", olm("m1", FOR_BOB), 1000, 0.0)
    batch = s.take_flush(1.0)
    assert batch is not None
    s.flush_done(batch)
    return batch


def test_evicted_ciphertexts_are_read_back_per_device() -> None:
    s = core()
    batch = on_disk(s)
    assert all(i.body is None for i in batch.items if i.message), "nobody online: evicted once on disk"
    out = s.device_online("bob.laptop", 2.0)
    assert not out.deliveries and out.need_bodies == []
    [(device, seq)] = out.need_item_bodies
    assert device == "bob.laptop"
    loaded = sent_to(s.bodies_loaded({}, 2.1, {(device, seq): "ct-bl"}))
    assert loaded["bob.laptop"]["body"] == "ct-bl"
    s.device_offline("bob.laptop")
    assert s.boxes["bob.laptop"].items[seq].body is None, "offline again: evicted (it is on disk)"


def test_missing_ciphertext_drops_only_that_item() -> None:
    s = core()
    on_disk(s)
    [(device, seq)] = s.device_online("bob.phone", 2.0).need_item_bodies
    s.item_body_missing(device, seq, 2.1)
    assert not s.boxes["bob.phone"].items and s.boxes["bob.laptop"].items


def test_removed_device_leaves_targets_and_required_set() -> None:
    s = core()
    s.submit("alice.phone", "alice", olm("m1", FOR_BOB), 1000, 0.0)
    s.keyed.remove("bob", "laptop")  # what devices.remove does before the staging core
    s.remove_device("bob.laptop")
    assert "bob.laptop" not in s.boxes
    assert "bob.laptop" not in s.directory.targets("bob")
    without = {k: v for k, v in FOR_BOB.items() if k != "bob.laptop"}
    assert not errors(s.submit("alice.phone", "alice", olm("m2", without), 1000, 0.1))
    plain = sent_to(s.submit("alice.phone", "alice", ChatMessage("m3", "bob", "x"), 1000, 0.2))
    assert "bob.laptop" not in plain


async def test_olm_items_survive_a_store_round_trip(tmp_path: Path) -> None:
    s = core()
    s.submit("alice.phone", "alice", olm("m1", FOR_BOB), 1000, 0.0)
    batch = s.take_flush(1.0)
    assert batch is not None
    store = await SqliteMessageStore.open(tmp_path)
    try:
        await store.commit(batch)
        messages, items, _ = await store.load(1000)
        assert [(m.olm, m.dev) for m in messages] == [(True, "phone")]
        keys = [(i.device, i.seq) for i in items]
        assert await store.item_bodies(keys) == {(i.device, i.seq): FOR_BOB[i.device] for i in items}
    finally:
        await store.close()


SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE bodies (mid INTEGER PRIMARY KEY, sender TEXT NOT NULL, msg_id TEXT NOT NULL, recipient TEXT NOT NULL,
    type TEXT NOT NULL, body TEXT NOT NULL, ts INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
    delivered INTEGER NOT NULL, origin TEXT NOT NULL);
CREATE TABLE items (device TEXT NOT NULL, seq INTEGER NOT NULL, mid INTEGER, receipt TEXT,
    expires_ms INTEGER NOT NULL, PRIMARY KEY (device, seq)) WITHOUT ROWID;
CREATE TABLE dedup (sender TEXT NOT NULL, msg_id TEXT NOT NULL, expires_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, msg_id)) WITHOUT ROWID;
INSERT INTO bodies VALUES (7, 'alice', 'old1', 'bob', 'text', 'hello', 5, 99999999999999, 0, 'alice.phone');
INSERT INTO items VALUES ('bob.phone', 1000000001, 7, NULL, 99999999999999);
PRAGMA user_version = 1;
"""


async def test_schema_1_database_is_upgraded_and_its_messages_kept(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / STAGING_DB) as db:
        db.executescript(SCHEMA_1)
    store = await SqliteMessageStore.open(tmp_path)
    try:
        messages, items, _ = await store.load(1000)
        assert [(m.msg_id, m.olm, m.dev) for m in messages] == [("old1", False, "phone")]
        assert await store.bodies([7]) == {7: "hello"}
        assert [(i.device, i.body) for i in items] == [("bob.phone", None)]
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / STAGING_DB) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
