"""Receipts on the wire (PROTOCOL.md delivery rules 5, 6 and 11): their order per message and sender device,
and what a `seen` flood costs the victim. Raw MQTT clients against the broker in its own process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import BrokerProcess, Peer
from tests.test_messaging import ack, drain, is_msg, online, send, start, start_on

DEPLOYMENTS = ("single", "cluster", "amqtt-path")  # tests/conftest.py: tests using `deployment` run on each


def statuses_until(peer: Peer, msg_id: str, last: str) -> list[str]:
    """The statuses of the receipts naming ``msg_id`` that reach ``peer``, up to the first ``last``."""
    got: list[str] = []
    while last not in got:
        item = peer.expect(lambda i: i.get("kind") == "receipt" and msg_id in i.get("ids", []))
        got.append(item["status"])
    return got


def later_statuses(peer: Peer, msg_id: str) -> list[str]:
    return [i["status"] for i in drain(peer, 0.5) if i.get("kind") == "receipt" and msg_id in i.get("ids", [])]


@pytest.fixture
def two_and_two(tmp_path: Path, made: list[Peer], deployment: str,
                request: pytest.FixtureRequest) -> Iterator[tuple[BrokerProcess, list[Peer]]]:
    """alice on two devices, bob with one device online and one known but offline. ``sent`` waits for the
    offline device's copy to be written: 1.5 s, so that bob can ack and report `seen` before it (one
    process; a cluster writes through, so there the order holds with no wait to bridge)."""
    broker = start_on(deployment, tmp_path / "d", request, staging__flush_ms=1500)
    try:
        online(broker, made, "bob", "laptop").close()  # known from now on, offline
        peers = [online(broker, made, "alice"), online(broker, made, "alice", "laptop"), online(broker, made, "bob")]
        yield broker, peers
    finally:
        broker.stop()


def publisher_gets(deployment: str) -> list[str]:
    """What the publishing device gets when 'sent', 'delivered' and 'seen' are due at once: one process
    folds 'sent' into the 'delivered' that goes out with it (rule 11); a cluster sends all three."""
    return ["sent", "delivered", "seen"] if deployment == "cluster" else ["delivered", "seen"]


def test_seen_never_overtakes_sent_or_delivered(two_and_two: tuple[BrokerProcess, list[Peer]], deployment: str) -> None:
    _broker, (alice, alice_laptop, bob) = two_and_two
    send(alice, "bob", "m1")
    ack(bob, bob.expect(is_msg("m1"))["seq"])
    bob.publish("u/bob/seen", {"to": "alice", "ids": ["m1"]})
    assert statuses_until(alice, "m1", "seen") == publisher_gets(deployment)
    assert statuses_until(alice_laptop, "m1", "seen") == ["delivered", "seen"]
    assert later_statuses(alice, "m1") == [] and later_statuses(alice_laptop, "m1") == []


def test_seen_before_the_ack_implies_delivered_once(two_and_two: tuple[BrokerProcess, list[Peer]],
                                                    deployment: str) -> None:
    _broker, (alice, alice_laptop, bob) = two_and_two
    send(alice, "bob", "m2")
    seq = bob.expect(is_msg("m2"))["seq"]
    bob.publish("u/bob/seen", {"to": "alice", "ids": ["m2"]})  # the app showed it before the SDK acked
    ack(bob, seq)
    assert statuses_until(alice, "m2", "seen") == publisher_gets(deployment)
    assert statuses_until(alice_laptop, "m2", "seen") == ["delivered", "seen"]
    assert later_statuses(alice, "m2") == [] and later_statuses(alice_laptop, "m2") == []


def receipt_for(status: str, msg_id: str) -> Any:
    return lambda i: i.get("kind") == "receipt" and i.get("status") == status and msg_id in i.get("ids", [])


def test_a_seen_flood_is_rate_limited_and_coalesced_and_real_receipts_still_arrive(
    tmp_path: Path, made: list[Peer]
) -> None:
    broker = start(tmp_path / "d", limits__send_burst=20, limits__send_rate_per_s=0.01)
    try:
        online(broker, made, "bob").close()  # the victim's device: known, offline
        alice, carol = online(broker, made, "alice"), online(broker, made, "carol")
        same = [f"x{i}" for i in range(1000)]
        for _ in range(10):  # the same report again and again: one receipt waits for bob
            carol.publish("u/carol/seen", {"to": "bob", "ids": same})
        for n in range(10):  # new ids each time: one receipt each, until the burst is spent
            carol.publish("u/carol/seen", {"to": "bob", "ids": [f"y{n}-{i}" for i in range(1000)]})
        for _ in range(10):
            carol.publish("u/carol/seen", {"to": "bob", "ids": same})
        for _ in range(10):
            carol.expect(lambda i: i.get("kind") == "error" and i.get("code") == "rate_limited")
        bob = online(broker, made, "bob")
        send(bob, "alice", "real")  # buckets are per user: bob and alice have theirs
        ack(alice, alice.expect(is_msg("real"))["seq"])
        alice.publish("u/alice/seen", {"to": "bob", "ids": ["real"]})
        flood: list[list[str]] = []
        while True:
            item = bob.expect(lambda i: i.get("kind") == "receipt" and i.get("status") != "sent")
            ack(bob, item["seq"])
            if item["peer"] == "carol":
                flood.append(item["ids"])
            elif item["status"] == "seen":
                assert item == {**item, "ids": ["real"], "peer": "alice"}
                break
        assert len(flood) == 11 and flood[0] == same
        assert [ids[0] for ids in flood[1:]] == [f"y{n}-0" for n in range(10)]
    finally:
        broker.stop()
