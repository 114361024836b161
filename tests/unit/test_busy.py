"""``bridge.busy.BusyDevices``: the redelivery round and the expiry sweep look only at devices with something to do."""

from __future__ import annotations

from bridge.busy import BusyDevices
from bridge.directory import Directory
from bridge.limits import RateLimiter, RecentIds
from bridge.messaging.core import Staging
from chatproto import ChatMessage, MsgItem
from tests.unit.test_staging import RULES


def test_a_round_keeps_only_the_devices_still_waiting_for_an_ack() -> None:
    sending = BusyDevices()
    in_flight: dict[str, dict[int, float] | None] = {"a.1": {1: 0.0}, "b.1": {}, "c.1": None}
    for device in ("a.1", "b.1", "c.1", "d.1"):
        sending.add(device)
    assert sending.still(in_flight.get) == ["a.1"]
    assert len(sending) == 1
    in_flight["a.1"] = {}
    assert sending.still(in_flight.get) == []
    assert len(sending) == 0


def test_redelivery_looks_at_the_devices_sent_to_not_at_every_connected_one() -> None:
    directory = Directory()
    directory.load([("alice", "phone"), ("bob", "phone"), *((f"idle{n}", "phone") for n in range(100))])
    staging = Staging(RULES, 1, directory, RateLimiter(1.0, 1000), RecentIds(1000))
    for user in ("alice", "bob", *(f"idle{n}" for n in range(100))):
        staging.device_online(f"{user}.phone", 0.0)
    looked_at: list[str] = []
    in_flight = staging._in_flight

    def spy(device: str) -> dict[int, float] | None:
        looked_at.append(device)
        return in_flight(device)

    staging._in_flight = spy  # type: ignore[method-assign]
    assert staging.redeliver(10.0).deliveries == []
    assert looked_at == []  # nothing was sent: no device is looked at

    sent = staging.submit("alice.phone", "alice", ChatMessage("m1", "bob", "hi"), 1_000, 1.0).deliveries
    assert [device for device, _ in sent] == ["bob.phone"]
    again = staging.redeliver(1.0 + RULES.redeliver_after_s)
    assert [(device, item.id) for device, item in again.deliveries if isinstance(item, MsgItem)] == [
        ("bob.phone", "m1")]
    assert looked_at == ["bob.phone"]

    staging.ack("bob.phone", [sent[0][1].seq], 7_000, 7.0)  # alice gets 'delivered': in flight to her now
    looked_at.clear()
    staging.redeliver(8.0)
    assert sorted(looked_at) == ["alice.phone", "bob.phone"]  # bob's last look: nothing of his in flight
    looked_at.clear()
    staging.redeliver(9.0)
    assert looked_at == ["alice.phone"]


def test_the_expiry_sweep_looks_at_devices_with_staged_items_only() -> None:
    directory = Directory()
    directory.load([("alice", "phone"), ("bob", "phone"), *((f"idle{n}", "phone") for n in range(100))])
    staging = Staging(RULES, 1, directory, RateLimiter(1.0, 1000), RecentIds(1000))
    for n in range(100):
        staging.device_online(f"idle{n}.phone", 0.0)
    looked_at: list[str] = []
    staged = staging._staged

    def spy(device: str) -> object:
        looked_at.append(device)
        return staged(device)

    staging._staged = spy  # type: ignore[assignment,method-assign]
    assert staging.expire(0, 0.0).notices == []
    assert looked_at == []
    staging.submit("alice.phone", "alice", ChatMessage("m1", "bob", "hi"), 1_000, 1.0)  # bob is offline
    staging.expire(1_000 + RULES.ttl_ms, 2.0)
    assert looked_at == ["bob.phone"]
    assert "bob.phone" not in staging.boxes  # offline, nothing left: the box goes
    assert [item.receipt["status"] for item in staging.boxes["alice.phone"].items.values() if item.receipt] == [
        "expired"]  # staged for alice (offline)
    looked_at.clear()
    staging.expire(2_000 + RULES.ttl_ms, 3.0)
    assert sorted(looked_at) == ["alice.phone", "bob.phone"]  # bob's last look: his box is gone
    looked_at.clear()
    staging.expire(3_000 + RULES.ttl_ms, 4.0)
    assert looked_at == ["alice.phone"]  # her receipt waits for her


def test_a_refused_message_leaves_no_box_for_an_offline_recipient() -> None:
    directory = Directory()
    directory.load([("alice", "phone"), ("bob", "phone")])
    staging = Staging(RULES, 1, directory, RateLimiter(1.0, 1), RecentIds(1000))
    staging.submit("alice.phone", "alice", ChatMessage("m1", "bob", "hi"), 1_000, 1.0)
    refused = staging.submit("alice.phone", "alice", ChatMessage("m2", "carol", "hi"), 1_000, 1.0)
    assert refused.notices  # no such user
    staging.submit("alice.phone", "alice", ChatMessage("m3", "bob", "hi"), 1_000, 1.0)  # rate limited
    assert set(staging.boxes) == {"bob.phone"}
