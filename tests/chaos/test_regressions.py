"""Regressions for the bugs the chaos harness (bench/chaos) found, each pinned without sockets.

1. A ``delivered`` receipt went out when the FIRST device of the recipient acked,
   before the message was safe for the others. The SDK drops a message from its
   outbox on ``delivered`` (it implies ``sent``), so a broker crash in the next
   ``staging.flush_ms`` lost the message for every device that had not acked yet
   (found by ``run_kill``: a tablet missed a message its user's phone had).
2. A known device could not log in while the disk was full.
3. A stranger's bad passwords locked the user's own devices (device tokens) out.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiosqlite
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.directory import Directory
from bridge.limits import RateLimiter, RecentIds
from bridge.messaging.core import Staging
from bridge.messaging.records import Rules
from chatproto import ChatMessage
from client_sdk import Client
from storage.sqlite.users import SqliteUserStore
from tests.helpers import WAIT_S, BrokerThread, connack_code

RULES = Rules(flush_s=0.05, ttl_ms=10_000, window=8, redeliver_after_s=5.0, max_queue=100, dedup_window_ms=60_000)


def statuses(out: object, client_id: str) -> list[str]:
    items = [*out.notices, *out.deliveries]  # type: ignore[attr-defined]
    wire = [(cid, json.loads(item.encode())) for cid, item in items]  # as the devices read them
    return [item.get("status") or item["kind"] for cid, item in wire if cid == client_id]


def test_delivered_waits_until_the_message_is_safe_for_every_device() -> None:
    directory = Directory()
    directory.load([("alice", "phone"), ("bob", "phone"), ("bob", "tablet")])
    s = Staging(RULES, 1, directory, RateLimiter(1.0, 1000), RecentIds(1000))
    s.device_online("alice.phone", 0.0)
    s.device_online("bob.phone", 0.0)  # bob.tablet is offline: its copy lives only in memory for now
    out = s.submit("alice.phone", "alice", ChatMessage("m1", "bob", "hi"), 1000, 0.0)
    seq = next(item.seq for cid, item in out.deliveries if cid == "bob.phone")

    out = s.ack("bob.phone", [seq], 1001, 0.01)
    assert statuses(out, "alice.phone") == [], "nothing that lets alice's SDK forget m1 before it is safe"

    batch = s.take_flush(1.0)
    assert batch is not None
    out = s.flush_done(batch)  # now the tablet's copy is on disk: the held 'delivered', standing for 'sent' too
    assert statuses(out, "alice.phone") == ["delivered"] and [r.status for r in out.folded] == ["sent"]
    delivered = [json.loads(item.encode()) for cid, item in out.deliveries if cid == "alice.phone"]
    assert [(d["status"], d["ids"]) for d in delivered] == [("delivered", ["m1"])]


def test_delivered_is_immediate_once_sent_was_given() -> None:
    directory = Directory()
    directory.load([("alice", "phone"), ("bob", "phone")])
    s = Staging(RULES, 1, directory, RateLimiter(1.0, 1000), RecentIds(1000))
    s.device_online("alice.phone", 0.0)
    s.device_online("bob.phone", 0.0)
    out = s.submit("alice.phone", "alice", ChatMessage("m1", "bob", "hi"), 1000, 0.0)
    seq = out.deliveries[0][1].seq
    batch = s.take_flush(1.0)  # bob's phone is slow to ack: the copy is written first
    assert batch is not None
    assert statuses(s.flush_done(batch), "alice.phone") == ["sent"]
    assert statuses(s.ack("bob.phone", [seq], 3000, 3.0), "alice.phone") == ["delivered"]


async def test_a_known_device_logs_in_while_the_users_db_cannot_be_written(tmp_path: Path) -> None:
    """2. A login of a KNOWN device failed (traceback, connection dropped) while the disk was full,
    because its last-login time could not be written (found by ``run_disk``)."""
    store = await SqliteUserStore.open(tmp_path)
    try:
        await store.add_user("alice", "hash")
        assert await store.record_login("alice", "phone") is True
        await store._db.execute("PRAGMA query_only = ON")  # every write now fails, as on a full disk
        assert await store.record_login("alice", "phone") is False, "known: logs in, time not updated"
        with pytest.raises(aiosqlite.Error):
            await store.record_login("alice", "tablet")  # new: cannot be registered, so no login
    finally:
        await store.close()


def test_bad_passwords_from_a_stranger_do_not_lock_out_the_users_devices(tmp_path: Path) -> None:
    """3. Failed logins throttled the user name for everyone, device tokens included: a stranger's
    bad passwords kept the victim's own devices from reconnecting (found by ``run_flood``)."""
    broker = BrokerThread(tmp_path / "data", {"auth.free_failures": 1, "auth.base_delay_s": 60.0}).start()
    try:
        broker.add_user("alice", "alice-pw")
        with Client("alice", "alice-pw", device="phone", port=broker.port, store=tmp_path / "a.db"):
            pass  # logged in with the password once: the store now holds a device token
        for guess in ("guess-1", "guess-2", "guess-3"):
            stranger = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="alice.evil")
            stranger.username_pw_set("alice", guess)
            assert connack_code(stranger, broker.port) != 0
        wrong = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="alice.phone")
        wrong.username_pw_set("alice", "alice-pw")
        assert connack_code(wrong, broker.port) != 0, "the password is still throttled"
        with Client("alice", None, device="phone", port=broker.port, store=tmp_path / "a.db") as phone:
            assert phone.ping() < WAIT_S, "the device token still logs in"
    finally:
        broker.stop()
