"""Holds in cluster mode, through real broker nodes on the real Redis Cluster (ADMISSION rule 4,
PROTOCOL section 6 rule 9): after a refusal a device's later messages wait for the re-send of the
refused one. The refusals here are ``queue_full`` (``delivery.max_queue`` 2): the one a test can
cause and lift at will; the hold behaves the same whatever the code.

alice (node 0) sends to bob (node 1): everything goes through Redis."""

from __future__ import annotations

import queue
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.messaging import admission
from testkit.redis_cluster import RedisCluster
from tests.cluster_faults import no_message, outcome, remembered, send
from tests.deployment import ClusterDeployment
from tests.helpers import Peer, eventually, register_offline

MAX_QUEUE = 2

Deploy = Callable[[], ClusterDeployment]


@pytest.fixture
def deploy(tmp_path: Path, redis_cluster: RedisCluster) -> Iterator[Deploy]:
    """Starts the deployment when called: after the test's monkeypatching, which its nodes read."""
    started: list[ClusterDeployment] = []

    def start() -> ClusterDeployment:
        deployment = ClusterDeployment(tmp_path / "cluster", redis_cluster, {"delivery.max_queue": MAX_QUEUE},
                                       nodes=2).start()
        started.append(deployment)
        deployment.add_users({name: f"{name}-pw" for name in ("alice", "bob", "mallory")})
        return deployment

    yield start
    for deployment in started:
        deployment.stop()


def fill_bob(sender: Peer) -> None:
    """bob's queue full: ``MAX_QUEUE`` messages from ``sender`` staged."""
    for n in range(MAX_QUEUE):
        assert outcome(send(sender, f"fill-{sender.user}-{n}")) == "sent"


def leader(item: dict[str, Any]) -> str | None:
    """The message a refusal under a hold names as the one to re-send first."""
    found = re.match(r"message '([^']+)' was refused first", str(item.get("detail", "")))
    return found.group(1) if found else None


def take_messages(bob: Peer) -> list[dict[str, Any]]:
    """The messages that reached bob so far (acked, so his queue makes room)."""
    got = []
    while True:
        try:
            item = bob.items(timeout=0)
        except queue.Empty:
            break
        if item.get("kind") == "msg":
            got.append(item)
    if got:
        bob.publish("u/bob/ack", {"seqs": [item["seq"] for item in got]})
    return got


def acked(bob: Peer, sender: Peer) -> None:
    """bob acks the ``MAX_QUEUE`` messages in his queue; returns once the sender heard they were
    delivered (the acks reached Redis: his queue has room)."""
    items = [bob.expect(lambda i: i.get("kind") == "msg") for _ in range(MAX_QUEUE)]
    bob.publish("u/bob/ack", {"seqs": [item["seq"] for item in items]})
    waiting = {item["id"] for item in items}
    while waiting:
        receipt = sender.expect(lambda i: i.get("kind") == "receipt" and i.get("status") == "delivered")
        waiting -= set(receipt["ids"])


def test_a_device_flooding_new_ids_under_a_hold_is_remembered_up_to_the_cap(deploy: Deploy, made: list[Peer]) -> None:
    cluster = deploy()
    register_offline(cluster.nodes[1].port, "bob")
    mallory = cluster.peer(0, made, "mallory")
    fill_bob(mallory)
    assert outcome(send(mallory, "first")) == "queue_full"
    flood = [f"flood{n}" for n in range(admission.MAX_HELD_IDS + 100)]
    for ref in flood:
        mallory.publish("u/mallory/out", {"id": ref, "to": "bob", "body": "x"})
    last = mallory.expect(lambda i: i.get("ref") == flood[-1])  # answered in order: every one was handled
    assert (last["code"], leader(last)) == ("queue_full", "first")
    assert remembered(cluster.nodes[0], "mallory.phone") == admission.MAX_HELD_IDS


def test_an_honest_device_refused_past_the_cap_keeps_its_order(
        deploy: Deploy, made: list[Peer], monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused more times in a row than a hold remembers (3 here), a client re-sending its outbox
    oldest first, round after round, gets every message to bob once and in order -- also h12, a
    new message it publishes at once when h2 goes through (the hold has a free place then, but h12
    must not take it: h5 to h11, refused unremembered, come first)."""
    monkeypatch.setattr(admission, "MAX_HELD_IDS", 3)
    cluster = deploy()
    bob = cluster.peer(1, made, "bob")
    alice = cluster.peer(0, made, "alice")
    outbox = [f"h{n}" for n in range(12)]
    for ref in outbox:  # h0 and h1 fill bob's queue; h2 is refused, then the rest behind it
        alice.publish("u/alice/out", {"id": ref, "to": "bob", "body": ref})
    alice.expect(lambda i: i.get("ref") == outbox[-1])
    assert remembered(cluster.nodes[0], "alice.phone") == 3, "h2, h3, h4; the others refused unremembered"
    got: list[str] = []

    def round_trip() -> bool:
        got.extend(item["id"] for item in take_messages(bob))
        for ref in list(outbox):
            if outcome(send(alice, ref)) == "sent":
                outbox.remove(ref)
                if ref == "h2":
                    outbox.append("h12")
                    if outcome(send(alice, "h12")) == "sent":
                        outbox.remove("h12")
        return not outbox

    eventually(round_trip, timeout=60, what="alice's outbox through")
    while len(got) < 13:
        got.append(bob.expect(lambda i: i.get("kind") == "msg")["id"])
    assert got == [f"h{n}" for n in range(13)]
    assert no_message(bob, within=0.5), "each once"


def test_a_device_that_reconnects_is_not_held_by_refusals_of_its_old_connection(
        deploy: Deploy, made: list[Peer]) -> None:
    """device_online forgets the device's hold: its new connection re-sends what it still wants, in
    its order, and is not stuck behind a message it may never re-send."""
    cluster = deploy()
    bob = cluster.peer(1, made, "bob")
    alice = cluster.peer(0, made, "alice")
    fill_bob(alice)
    assert outcome(send(alice, "r1")) == "queue_full"
    refused = send(alice, "r2")
    assert (outcome(refused), leader(refused)) == ("queue_full", "r1")
    acked(bob, alice)
    assert leader(send(alice, "r2")) == "r1", "still held on its connection, bob's queue has room"
    alice.close()
    again = cluster.peer(0, made, "alice")
    assert outcome(send(again, "r2")) == "sent", "not held behind r1, refused on the old connection"
    assert bob.expect(lambda i: i.get("kind") == "msg")["id"] == "r2"


def test_a_held_device_that_never_resends_the_first_loses_only_that_place_per_hold_s(
        deploy: Deploy, made: list[Peer], monkeypatch: pytest.MonkeyPatch) -> None:
    """PROTOCOL rule 9: r1 never comes back; after HOLD_S (3 s here) r2 leads, r3 still waits for it."""
    monkeypatch.setattr(admission, "HOLD_S", 3.0)
    cluster = deploy()
    bob = cluster.peer(1, made, "bob")
    alice = cluster.peer(0, made, "alice")
    fill_bob(alice)
    assert outcome(send(alice, "r1")) == "queue_full"
    assert leader(send(alice, "r2")) == "r1"
    assert leader(send(alice, "r3")) == "r1"
    acked(bob, alice)

    def r2_leads() -> bool:
        reply = send(alice, "r3")
        assert outcome(reply) != "sent", "r3 overtook r2 when r1 lost its place"
        return leader(reply) == "r2"

    eventually(r2_leads, timeout=30, what="r1 lost its place")
    assert outcome(send(alice, "r2")) == "sent"
    assert outcome(send(alice, "r3")) == "sent"
    assert [bob.expect(lambda i: i.get("kind") == "msg")["id"] for _ in range(2)] == ["r2", "r3"]
