"""One-to-one messaging through the real broker, as raw MQTT clients see it (PROTOCOL.md delivery rules 1-6).

The SDK-level guarantees (outbox, duplicate dropping) are tested in tests/sdk/; these tests check what the
server puts on the wire.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deployment import start_broker
from tests.helpers import BrokerProcess, Peer

USERS = ("alice", "bob", "carol")
DEPLOYMENTS = ("single", "cluster", "amqtt-path")  # tests/conftest.py: tests using `deployment` run on each


def start(path: Path, **overrides: Any) -> BrokerProcess:
    """The broker in its own process, as in production, with users alice, bob and carol."""
    broker = BrokerProcess(path, {k.replace("__", "."): v for k, v in overrides.items()})
    broker.add_users({name: f"{name}-pw" for name in USERS})
    return broker.start()


def start_on(deployment: str, path: Path, request: pytest.FixtureRequest, **overrides: Any) -> Any:
    """``start`` (one process on SQLite), or three cluster nodes behind HAProxy (tests/deployment.py)."""
    if deployment != "cluster":
        return start(path, **overrides)
    running = start_broker(deployment, path, request, {k.replace("__", "."): v for k, v in overrides.items()})
    running.add_users({name: f"{name}-pw" for name in USERS})
    return running



@pytest.fixture
def chat(tmp_path: Path, deployment: str, request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    broker = start_on(deployment, tmp_path / "data", request, limits__send_burst=5000)
    yield broker
    broker.stop()


def online(broker: BrokerProcess, made: list[Peer], user: str, device: str = "phone") -> Peer:
    peer = Peer(broker.port, user, f"{user}-pw", device=device)
    made.append(peer)
    assert peer.connect() == 0
    assert peer.subscribe() == [1]
    return peer


def send(peer: Peer, to: str, msg_id: str, body: str = "hello", **extra: Any) -> None:
    peer.publish(f"u/{peer.user}/out", {"id": msg_id, "to": to, "body": body, **extra})


def ack(peer: Peer, *seqs: int) -> None:
    peer.publish(f"u/{peer.user}/ack", {"seqs": list(seqs)})


def receipt(status: str, msg_id: str) -> Any:
    return lambda i: i.get("kind") == "receipt" and i.get("status") == status and msg_id in i.get("ids", [])


def is_error(code: str, ref: str | None = None) -> Any:
    return lambda i: i.get("kind") == "error" and i.get("code") == code and (ref is None or i.get("ref") == ref)


def is_msg(msg_id: str) -> Any:
    return lambda i: i.get("kind") == "msg" and i.get("id") == msg_id


def test_online_message_then_sent_delivered_seen(chat: BrokerProcess, made: list[Peer]) -> None:
    alice, bob = online(chat, made, "alice"), online(chat, made, "bob")
    before = int(time.time() * 1000)
    send(alice, "bob", "m1", "hi bob", type="text", ts=5)
    item = bob.expect(is_msg("m1"))
    assert item["from"] == "alice" and item["to"] == "bob" and item["body"] == "hi bob" and item["type"] == "text"
    assert item["ts"] >= before  # the server's clock, not the client's ts=5
    order = [alice.expect(lambda i: i.get("kind") == "receipt")["status"]]
    ack(bob, item["seq"])
    order.append(alice.expect(lambda i: i.get("kind") == "receipt")["status"])
    bob.publish("u/bob/seen", {"to": "alice", "ids": ["m1"]})
    seen = alice.expect(receipt("seen", "m1"))
    order.append(seen["status"])
    assert order == ["sent", "delivered", "seen"]
    assert seen["peer"] == "bob" and isinstance(seen["seq"], int)


def test_offline_backlog_arrives_once_in_order_and_receipts_wait_for_offline_sender(
    chat: BrokerProcess, made: list[Peer]
) -> None:
    alice = online(chat, made, "alice")
    ids = [f"m{i}" for i in range(1000)]
    for msg_id in ids:
        send(alice, "bob", msg_id, f"body {msg_id}")
    sent: set[str] = set()
    while len(sent) < len(ids):
        sent.update(alice.expect(lambda i: i.get("status") == "sent")["ids"])
    alice.close()  # the sender goes away before anything is delivered
    bob = online(chat, made, "bob")
    got: list[str] = []
    seqs: list[int] = []
    while len(got) < len(ids):
        item = bob.expect(lambda i: i.get("kind") == "msg")
        assert item["id"] not in got, "a message arrived twice"
        got.append(item["id"])
        seqs.append(item["seq"])
        ack(bob, item["seq"])
    assert got == ids and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert bob.nothing_arrives(0.5)
    alice = online(chat, made, "alice")  # comes back: the delivered receipts were staged for it
    delivered: set[str] = set()
    while len(delivered) < len(ids):
        item = alice.expect(lambda i: i.get("status") == "delivered")
        delivered.update(item["ids"])
        ack(alice, item["seq"])
    assert delivered == set(ids)


@pytest.mark.parametrize(
    ("payload", "code", "ref"),
    [
        (b"{not json", "bad_json", None),
        (b'{"id":"m1","to":"bob"}', "bad_envelope", "m1"),
        (b'{"id":"m2","to":"bob","body":5}', "bad_envelope", "m2"),
        (b'{"id":"bad id","to":"bob","body":"x"}', "bad_envelope", None),
        (b'{"id":"m3","to":"bob","body":"x","from":"carol"}', "bad_envelope", "m3"),
        (b'{"id":"m4","to":"nobody","body":"x"}', "unknown_recipient", "m4"),
        (b'{"id":"m5","to":"bob","body":"' + b"x" * 70000 + b'"}', "too_large", "m5"),
    ],
)
def test_refused_messages_get_a_clear_error_and_reach_no_one(
    chat: BrokerProcess, made: list[Peer], payload: bytes, code: str, ref: str | None
) -> None:
    alice, bob = online(chat, made, "alice"), online(chat, made, "bob")
    alice.publish("u/alice/out", payload)
    error = alice.expect(lambda i: i.get("kind") == "error")
    assert error["code"] == code and error.get("ref") == ref
    assert bob.nothing_arrives(0.3)
    send(alice, "bob", "after")  # the sender carries on
    assert bob.expect(is_msg("after"))


def test_repeated_id_is_delivered_once_and_answered_sent_again(chat: BrokerProcess, made: list[Peer]) -> None:
    alice, bob = online(chat, made, "alice"), online(chat, made, "bob")
    send(alice, "bob", "dup")
    item = bob.expect(is_msg("dup"))
    alice.expect(receipt("sent", "dup"))
    send(alice, "bob", "dup")  # before the ack
    alice.expect(receipt("sent", "dup"))
    ack(bob, item["seq"])
    alice.expect(receipt("delivered", "dup"))
    send(alice, "bob", "dup")  # after the message is gone from the server
    alice.expect(receipt("sent", "dup"))
    assert bob.nothing_arrives(0.5)


def test_two_devices_each_get_every_message_and_the_body_goes_after_both_ack(tmp_path: Path, made: list[Peer]) -> None:
    broker = start(tmp_path / "d", staging__flush_ms=0, staging__checkpoint_idle_s=0.2)
    try:
        alice = online(broker, made, "alice")
        phone, laptop = online(broker, made, "bob", "phone"), online(broker, made, "bob", "laptop")
        marker = "MARKER-7f3a9c-secret-body"
        send(alice, "bob", "m1", marker)
        first, second = phone.expect(is_msg("m1")), laptop.expect(is_msg("m1"))
        alice.expect(receipt("sent", "m1"))
        ack(phone, first["seq"])
        alice.expect(receipt("delivered", "m1"))
        files = [tmp_path / "d" / "staging.db", tmp_path / "d" / "staging.db-wal"]
        assert any(marker.encode() in f.read_bytes() for f in files if f.exists()), "flush_ms=0 writes at once"
        ack(laptop, second["seq"])
        deadline = time.monotonic() + 10
        while any(marker.encode() in f.read_bytes() for f in files if f.exists()):
            assert time.monotonic() < deadline, "the delivered body is still on disk"
            time.sleep(0.05)
        assert alice.nothing_arrives(0.3), "delivered is sent once, for the first device's ack"
    finally:
        broker.stop()


def test_quickly_acked_message_never_touches_the_disk(tmp_path: Path, made: list[Peer]) -> None:
    broker = start(tmp_path / "d", staging__flush_ms=20_000)  # generous: a loaded CI machine is slow to ack
    try:
        alice, bob = online(broker, made, "alice"), online(broker, made, "bob")
        marker = "MARKER-never-written"
        send(alice, "bob", "m1", marker)
        ack(bob, bob.expect(is_msg("m1"))["seq"])
        # every target acked: safe without a write; 'delivered' goes out at once and stands for 'sent' (rule 11)
        assert alice.expect(lambda i: i.get("kind") == "receipt")["status"] == "delivered"
        files = (tmp_path / "d").glob("staging.db*")
        assert not any(marker.encode() in f.read_bytes() for f in files)
    finally:
        broker.stop()


def test_first_device_gets_what_was_held_later_devices_do_not(chat: BrokerProcess, made: list[Peer]) -> None:
    alice = online(chat, made, "alice")
    send(alice, "carol", "early")  # carol has never connected: held for her first device
    alice.expect(receipt("sent", "early"))
    first = online(chat, made, "carol", "tablet")
    ack(first, first.expect(is_msg("early"))["seq"])
    alice.expect(receipt("delivered", "early"))
    second = online(chat, made, "carol", "phone")
    send(alice, "carol", "later")
    assert second.expect(is_msg("later"))
    assert first.expect(is_msg("later"))


def test_window_and_redelivery(tmp_path: Path, made: list[Peer], deployment: str,
                               request: pytest.FixtureRequest) -> None:
    broker = start_on(deployment, tmp_path / "d", request, delivery__window=5, delivery__redeliver_after_s=0.5)
    try:
        alice = online(broker, made, "alice")
        for i in range(12):
            send(alice, "bob", f"w{i}")
        bob = online(broker, made, "bob")
        first: list[dict[str, Any]] = []
        repeats: list[str] = []
        while len(first) < 5 or not repeats:  # (a slow machine may see a redelivery before the fifth)
            item = bob.expect(lambda i: i.get("kind") == "msg", timeout=5)
            if item["id"] in {i["id"] for i in first}:
                repeats.append(item["id"])
            else:
                first.append(item)
        assert [i["id"] for i in first] == [f"w{i}" for i in range(5)], "only 5 in flight"
        assert repeats[0] == "w0", "the oldest unacked is sent again first"
        ack(bob, *[i["seq"] for i in first])
        rest = []
        while len(rest) < 7:
            item = bob.expect(lambda i: i.get("kind") == "msg" and i["id"] not in {x["id"] for x in first})
            if item["id"] not in rest:
                rest.append(item["id"])
                ack(bob, item["seq"])
        assert rest == [f"w{i}" for i in range(5, 12)]
    finally:
        broker.stop()


def test_queue_full_and_rate_limited_are_errors_not_silent_drops(tmp_path: Path, made: list[Peer], deployment: str,
                                                                 request: pytest.FixtureRequest) -> None:
    broker = start_on(deployment, tmp_path / "d", request, delivery__max_queue=3, limits__send_burst=5,
                      limits__send_rate_per_s=0.01)
    try:
        alice = online(broker, made, "alice")
        for i in range(4):
            send(alice, "bob", f"q{i}")
        assert alice.expect(is_error("queue_full", "q3"))  # refused before it costs a token
        send(alice, "carol", "r0")  # a later message waits for q3: it may not overtake it
        assert alice.expect(is_error("queue_full", "r0"))
        bob = online(broker, made, "bob")
        first = bob.expect(is_msg("q0"))
        ack(bob, first["seq"])
        alice.expect(receipt("delivered", "q0"))
        send(alice, "bob", "q3")  # the re-send of the refused message is taken (token 4 of 5)
        send(alice, "carol", "r0")  # token 5
        send(alice, "carol", "r1")
        assert alice.expect(is_error("rate_limited", "r1"))
        got = [bob.expect(lambda i: i.get("kind") == "msg")["id"] for _ in range(3)]
        assert got == ["q1", "q2", "q3"] and bob.nothing_arrives(0.3)
        carol = online(broker, made, "carol")
        assert carol.expect(lambda i: i.get("kind") == "msg")["id"] == "r0" and carol.nothing_arrives(0.3)
    finally:
        broker.stop()


def test_ttl_expiry_tells_the_sender(tmp_path: Path, made: list[Peer], deployment: str,
                                     request: pytest.FixtureRequest) -> None:
    broker = start_on(deployment, tmp_path / "d", request, staging__ttl_days=1.5 / 86400, staging__sweep_s=0.2)
    try:
        alice = online(broker, made, "alice")
        send(alice, "bob", "old")
        alice.expect(receipt("sent", "old"))
        expired = alice.expect(receipt("expired", "old"), timeout=30)  # (an event: the bound only matters when slow)
        assert expired["peer"] == "bob"
        bob = online(broker, made, "bob")
        assert not any(i.get("kind") == "msg" for i in drain(bob, 0.5))
    finally:
        broker.stop()


def drain(peer: Peer, within: float) -> list[dict[str, Any]]:
    items = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            items.append(peer.items(timeout=0.1))
        except Exception:  # queue.Empty
            continue
    return items


def test_staged_items_survive_a_graceful_restart_and_seqs_keep_increasing(tmp_path: Path, made: list[Peer]) -> None:
    data = tmp_path / "d"
    broker = start(data, staging__flush_ms=60_000)  # everything stays in memory until shutdown flushes it
    alice = online(broker, made, "alice")
    bob = online(broker, made, "bob")
    send(alice, "bob", "seen-before")
    old_seq = bob.expect(is_msg("seen-before"))["seq"]  # not acked
    bob.close()
    send(alice, "bob", "while-offline")
    alice.close()
    made.clear()
    broker.stop()
    broker = start(data)
    try:
        bob = online(broker, made, "bob")
        items = [bob.expect(lambda i: i.get("kind") == "msg") for _ in range(2)]
        assert [i["id"] for i in items] == ["seen-before", "while-offline"]
        assert items[0]["seq"] == old_seq
        alice = online(broker, made, "alice")
        send(alice, "bob", "after-restart")
        new = bob.expect(is_msg("after-restart"))
        assert new["seq"] > items[1]["seq"] > old_seq
    finally:
        broker.stop()
