"""The metrics endpoint through the real broker: a chat over real sockets moves every counter and
histogram by exactly what was sent, staged figures follow an offline recipient, and two brokers in
one process keep separate registries."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatserver.status import Snapshot
from tests.helpers import BrokerThread, Peer, eventually
from tests.observe import scrape

MESSAGES = 3


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[BrokerThread]:
    running = BrokerThread(tmp_path / "data", {"metrics.bind": "127.0.0.1:0"}).start()
    running.add_users({"alice": "alice-pw", "bob": "bob-pw"})
    yield running
    running.stop()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """Peers a test made, closed afterwards (this file's brokers, not conftest's)."""
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.close()


def online(broker: BrokerThread, made: list[Peer], user: str) -> Peer:
    peer = Peer(broker.port, user, f"{user}-pw")
    made.append(peer)
    assert peer.connect() == 0
    assert peer.subscribe() == [1]
    return peer


def delta(after: Snapshot, before: Snapshot, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def receive(peer: Peer, count: int) -> list[dict[str, Any]]:
    return [peer.items() for _ in range(count)]


def test_a_chat_moves_the_counters_by_exactly_what_was_sent(metered: BrokerThread, peers: list[Peer]) -> None:
    before = scrape(metered)
    wrong = Peer(metered.port, "alice", "not-the-password", device="tablet")
    peers.append(wrong)
    assert wrong.connect() not in (0, -1)  # refused (paho reports 0x05 as reason 135)
    alice, bob = online(metered, peers, "alice"), online(metered, peers, "bob")
    alone = 0  # 'sent' receipts of their own: only for a message the flush wrote before bob's ack came
    for i in range(MESSAGES):
        alice.publish("u/alice/out", {"id": f"m{i}", "to": "bob", "body": f"body {i}"})
        (item,) = receive(bob, 1)
        assert item["kind"] == "msg" and item["id"] == f"m{i}"
        bob.publish("u/bob/ack", {"seqs": [item["seq"]]})
        receipts = {r["status"]: r for r in receive(alice, 1)}
        if "sent" in receipts:
            alone += 1
            receipts.update((r["status"], r) for r in receive(alice, 1))
        assert set(receipts) <= {"sent", "delivered"} and "delivered" in receipts  # it stands for 'sent' too
        alice.publish("u/alice/ack", {"seqs": [receipts["delivered"]["seq"]]})
    alice.publish("u/alice/out", {"id": "x", "to": "nobody", "body": "lost"})
    alice.publish("u/bob/out", {"id": "y", "to": "bob", "body": "as bob"})
    codes = sorted(item["code"] for item in receive(alice, 2))
    assert codes == ["forbidden", "unknown_recipient"]
    assert alice.nothing_arrives(0.2) and bob.nothing_arrives(0.0)

    eventually(lambda: scrape(metered).value("chat_staged_items") == 0, what="everything acked and forgotten")
    after = scrape(metered)
    assert delta(after, before, "chat_logins_total", result="ok") == 2
    assert delta(after, before, "chat_logins_total", result="bad_password") == 1
    assert delta(after, before, "chat_connections_accepted_total", listener="tcp") == 3
    assert after.value("chat_connections", listener="tcp") == 2
    assert after.value("chat_devices_online") == 2
    assert delta(after, before, "chat_uplink_total", kind="out") == MESSAGES + 1
    assert delta(after, before, "chat_uplink_total", kind="ack") == 2 * MESSAGES
    assert delta(after, before, "chat_uplink_total", kind="forbidden") == 1
    assert delta(after, before, "chat_downlink_total", kind="msg") == MESSAGES
    assert delta(after, before, "chat_downlink_total", kind="receipt") == MESSAGES + alone
    assert delta(after, before, "chat_downlink_total", kind="error") == 2
    assert delta(after, before, "chat_errors_total", code="unknown_recipient") == 1
    assert delta(after, before, "chat_errors_total", code="forbidden") == 1
    assert delta(after, before, "chat_redeliveries_total") == 0
    for histogram in ("chat_sent_latency_seconds", "chat_delivered_latency_seconds"):
        assert delta(after, before, f"{histogram}_count") == MESSAGES
        assert delta(after, before, f"{histogram}_bucket", le="+Inf") == MESSAGES
        assert 0 <= delta(after, before, f"{histogram}_sum") < 10 * MESSAGES
    assert after.value("chat_staged_bytes") == 0 and after.value("chat_staged_messages") == 0
    assert after.value("chat_event_loop_lag_seconds_count") >= 0
    assert after.value("process_resident_memory_bytes") > 0


def test_staged_figures_follow_an_offline_recipient(metered: BrokerThread, peers: list[Peer]) -> None:
    alice = online(metered, peers, "alice")
    bob = Peer(metered.port, "bob", "bob-pw")  # logs in once so that bob.phone is a known device, then leaves
    assert bob.connect() == 0
    bob.close()
    commits = scrape(metered).value("chat_store_commit_seconds_count")
    body = "ünïcödé ✓"  # 9 characters, 16 UTF-8 bytes
    alice.publish("u/alice/out", {"id": "m1", "to": "bob", "body": body})
    assert alice.items()["status"] == "sent"  # only once durable: a group commit happened
    now = scrape(metered)
    assert now.value("chat_staged_items") == 1
    assert now.value("chat_staged_messages") == 1
    assert now.value("chat_staged_bytes") == len(body.encode())
    assert now.value("chat_device_queue_depth_max") == 1
    assert now.value("chat_device_queue_depth_bucket", le="0.0") == 1  # alice.phone: online, nothing queued
    assert now.value("chat_device_queue_depth_bucket", le="1.0") == 2  # and bob.phone's one item
    assert now.value("chat_device_queue_depth_bucket", le="+Inf") == 2
    assert now.value("chat_staged_oldest_age_seconds") >= 0
    assert now.value("chat_store_commit_seconds_count") > commits
    assert now.value("chat_store_commit_rows_sum") >= 1
    eventually(lambda: scrape(metered).value("chat_staged_oldest_age_seconds") > 0.05, what="the item ages")


def test_each_broker_has_its_own_registry(metered: BrokerThread, tmp_path: Path, peers: list[Peer]) -> None:
    other = BrokerThread(tmp_path / "other", {"metrics.bind": "127.0.0.1:0"}).start()
    try:
        online(metered, peers, "alice")
        assert scrape(metered).value("chat_logins_total", result="ok") == 1
        assert scrape(other).value("chat_logins_total", result="ok") == 0
        assert scrape(other).value("chat_connections", listener="tcp") == 0
    finally:
        other.stop()


def test_metrics_are_off_unless_configured(tmp_path: Path) -> None:
    plain = BrokerThread(tmp_path / "plain").start()
    try:
        assert "metrics" not in plain.call(_addresses(plain))
        assert json.dumps(plain.settings.metrics.model_dump()) == '{"bind": null}'
    finally:
        plain.stop()


async def _addresses(broker: BrokerThread) -> dict[str, tuple[str, int]]:
    return broker.app.addresses()
