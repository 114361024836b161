"""Group receipts through the real broker over real sockets, on one process (SQLite) and on three cluster
nodes behind HAProxy (members on different nodes): ``delivered`` to all and ``seen`` by all for the sender,
the ``group.receipts`` detail and who may ask, ``groups.seen_receipts``, many members acking and reporting at
once; a restart and the TTL on one process (docs/PROTOCOL.md section 11, "Receipts"; a node killed mid-way:
tests/test_cluster_groups.py)."""

from __future__ import annotations

import random
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.deployment import ClusterDeployment, start_broker
from tests.helpers import BrokerThread, Peer, eventually, online_peer
from tests.test_cluster_groups import redis_keys
from tests.test_groups import Collector, _add_users, drain, ok, refused, send

DEPLOYMENTS = ("single", "cluster", "amqtt-path")  # tests/conftest.py: tests using `deployment` run on each


def receipt(status: str, msg_id: str) -> Any:
    return lambda i: i.get("kind") == "receipt" and i.get("status") == status and msg_id in i.get("ids", [])


def msg(msg_id: str) -> Any:
    return lambda i: i.get("kind") == "msg" and i.get("id") == msg_id


def ack(peer: Peer, item: dict[str, Any]) -> None:
    peer.publish(f"u/{peer.user}/ack", {"seqs": [item["seq"]]})


def seen(peer: Peer, group: str, *ids: str) -> None:
    peer.publish(f"u/{peer.user}/seen", {"to": group, "ids": list(ids)})


def statuses(peer: Peer, within: float = 0.5) -> list[str]:
    return [i["status"] for i in drain(peer, within) if i.get("kind") == "receipt" and i["status"] != "sent"]


def tracked_rows(data: Path) -> tuple[int, int]:
    with sqlite3.connect(data / "staging.db") as db:
        return (db.execute("SELECT COUNT(*) FROM group_receipts").fetchone()[0],
                db.execute("SELECT COUNT(*) FROM group_receipt_marks").fetchone()[0])


def start(data: Path, new: bool = True, **overrides: Any) -> BrokerThread:
    broker = BrokerThread(data, {"limits.send_burst": 5000, **overrides}).start()
    if new:
        broker.add_users({name: f"{name}-pw" for name in ("alice", "bob", "carol", "dave", "erin")})
    return broker


def start_on(deployment: str, root: Path, request: pytest.FixtureRequest, **overrides: Any) -> Any:
    broker = start_broker(deployment, root, request, {"limits.send_burst": 5000, **overrides})
    broker.add_users({name: f"{name}-pw" for name in ("alice", "bob", "carol", "dave", "erin")})
    return broker


def untracked(broker: Any, root: Path, request: pytest.FixtureRequest) -> bool:
    """Nothing tracked any more: no row in staging.db (one process), no tracking hash in Redis (cluster)."""
    if isinstance(broker, ClusterDeployment):
        return redis_keys(request.getfixturevalue("redis_cluster"), broker.prefix, "g:*:t:*") == {}
    return tracked_rows(root / "data") == (0, 0)


@pytest.fixture
def broker(tmp_path: Path, deployment: str, request: pytest.FixtureRequest) -> Any:
    broker = start_on(deployment, tmp_path, request)
    yield broker
    broker.stop()


def test_delivered_to_all_after_the_last_ack_and_seen_by_all_after_the_last_report(
        broker: BrokerThread, made: list[Peer], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    alice, tablet = online_peer(broker.port, made, "alice"), online_peer(broker.port, made, "alice", "tablet")
    bob, carol, dave, erin = (online_peer(broker.port, made, u) for u in ("bob", "carol", "dave", "erin"))
    group = ok(alice, "group.create", name="g", members=["bob", "carol", "dave"])["group"]
    send(alice, group, "m1")
    alice.expect(receipt("sent", "m1"))
    ack(tablet, tablet.expect(msg("m1")))  # the sender's own other device is no member to wait for
    ack(bob, bob.expect(msg("m1")))
    ack(carol, carol.expect(msg("m1")))
    dave_copy = dave.expect(msg("m1"))
    assert statuses(alice) == [] and statuses(tablet, 0.1) == []
    detail = ok(alice, "group.receipts", group=group, id="m1")
    assert detail["tracked"] is True and detail["seen_tracked"] is True
    assert list(detail["members"]) == ["bob", "carol", "dave"]
    assert detail["members"]["bob"]["delivered"] > 0 and detail["members"]["dave"] == {"delivered": None,
                                                                                        "seen": None}
    assert refused(bob, "group.receipts", group=group, id="m1") == "forbidden"  # not the sender
    assert refused(erin, "group.receipts", group=group, id="m1") == "not_member"
    ack(dave, dave_copy)
    for device in (alice, tablet):
        got = device.expect(receipt("delivered", "m1"))
        assert got["peer"] == group and got["ids"] == ["m1"]
    seen(bob, group, "m1")
    seen(carol, group, "m1")
    assert statuses(alice) == []
    assert ok(alice, "group.receipts", group=group, id="m1")["members"]["carol"]["seen"] > 0
    seen(dave, group, "m1", "unknown-id")
    for device in (alice, tablet):
        got = device.expect(receipt("seen", "m1"))
        assert got["peer"] == group and got["ids"] == ["m1"]
    assert statuses(alice) == [], "each once"
    assert ok(alice, "group.receipts", group=group, id="m1") == {"group": group, "id": "m1", "tracked": False}
    eventually(lambda: untracked(broker, tmp_path, request))  # nothing kept once complete


def test_a_seen_report_before_the_ack_implies_delivered(broker: BrokerThread, made: list[Peer]) -> None:
    alice = online_peer(broker.port, made, "alice")
    bob = online_peer(broker.port, made, "bob")
    group = ok(alice, "group.create", name="g", members=["bob"])["group"]
    send(alice, group, "m1")
    bob.expect(msg("m1"))
    seen(bob, group, "m1")  # the app showed it before the SDK acked
    alice.expect(receipt("sent", "m1"))
    assert statuses(alice, 1.0) == ["delivered", "seen"]


def test_seen_receipts_are_off_above_the_threshold(tmp_path: Path, made: list[Peer], deployment: str,
                                                    request: pytest.FixtureRequest) -> None:
    broker = start_on(deployment, tmp_path, request, **{"groups.seen_receipts": 2})
    try:
        alice, bob, carol = (online_peer(broker.port, made, u) for u in ("alice", "bob", "carol"))
        small = ok(alice, "group.create", name="two", members=["bob"])["group"]
        big = ok(alice, "group.create", name="three", members=["bob", "carol"])["group"]
        send(alice, big, "b1")
        copies = bob.expect(msg("b1")), carol.expect(msg("b1"))
        seen(bob, big, "b1")  # accepted, ignored: no delivered either
        seen(carol, big, "b1")
        assert not any(i.get("kind") == "error" for i in drain(bob, 0.3))
        assert statuses(alice) == []
        assert ok(alice, "group.receipts", group=big, id="b1")["seen_tracked"] is False
        ack(bob, copies[0])
        ack(carol, copies[1])
        alice.expect(receipt("delivered", "b1"))
        assert ok(alice, "group.receipts", group=big, id="b1")["tracked"] is False, "complete once delivered"
        send(alice, small, "s1")
        ack(bob, bob.expect(msg("s1")))
        seen(bob, small, "s1")
        assert statuses(alice, 1.0) == ["delivered", "seen"]
    finally:
        broker.stop()


def test_tracking_survives_a_restart(tmp_path: Path, made: list[Peer]) -> None:
    broker = start(tmp_path / "data")
    try:
        alice, bob, carol = (online_peer(broker.port, made, u) for u in ("alice", "bob", "carol"))
        group = ok(alice, "group.create", name="g", members=["bob", "carol"])["group"]
        send(alice, group, "m1")
        ack(bob, bob.expect(msg("m1")))
        seen(bob, group, "m1")
        eventually(lambda: ok(alice, "group.receipts", group=group, id="m1")["members"]["bob"]["seen"] is not None)
        before = ok(alice, "group.receipts", group=group, id="m1")
        carol_copy = carol.expect(msg("m1"))  # not acked before the restart
        for peer in (alice, bob, carol):
            peer.close()
    finally:
        broker.stop()
    assert tracked_rows(tmp_path / "data") == (1, 1)
    broker = start(tmp_path / "data", new=False)
    try:
        alice = online_peer(broker.port, made, "alice")
        assert ok(alice, "group.receipts", group=group, id="m1") == before
        carol = online_peer(broker.port, made, "carol")
        again = carol.expect(msg("m1"))  # redelivered from disk, under a new seq
        assert again["id"] == carol_copy["id"]
        ack(carol, again)
        alice.expect(receipt("delivered", "m1"))
        seen(carol, group, "m1")
        alice.expect(receipt("seen", "m1"))
        eventually(lambda: tracked_rows(tmp_path / "data") == (0, 0))
    finally:
        broker.stop()


def test_many_members_acking_and_reporting_at_once_complete_each_message_once(
        tmp_path: Path, made: list[Peer], deployment: str, request: pytest.FixtureRequest) -> None:
    users = [f"u{i:02d}" for i in range(24)]
    broker = start_broker(deployment, tmp_path, request, {"limits.send_burst": 100_000,
                                                          "limits.send_rate_per_s": 1e6})
    try:
        broker.call(_add_users(broker, ["alice", *users]))
        alice = Peer(broker.port, "alice", "same-pw")
        made.append(alice)
        assert alice.connect() == 0 and alice.subscribe() == [1]
        group = ok(alice, "group.create", name="g", members=users)["group"]
        members = [Collector(broker.port, made, user, group) for user in users]  # each acks what it gets
        ids = [f"m{n}" for n in range(20)]
        for msg_id in ids:
            send(alice, group, msg_id)
        for member in members:
            eventually(lambda m=member: set(m.ids()) == set(ids))  # type: ignore[misc]

        def report(member: Collector, seed: int) -> None:
            order = ids[:]
            random.Random(seed).shuffle(order)
            for n in range(0, len(order), 3):
                seen(member.peer, group, *order[n:n + 3])

        threads = [threading.Thread(target=report, args=(m, n)) for n, m in enumerate(members)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        got: dict[str, list[str]] = {msg_id: [] for msg_id in ids}
        while sum(map(len, got.values())) < 2 * len(ids):
            item = alice.expect(lambda i: i.get("kind") == "receipt" and i["status"] in ("delivered", "seen"))
            assert item["peer"] == group
            for msg_id in item["ids"]:
                got[msg_id].append(item["status"])
        assert {i: s for i, s in got.items() if s != ["delivered", "seen"]} == {}, "each once, in order"
        assert [i for i in drain(alice, 0.5) if i.get("kind") == "receipt" and i["status"] != "sent"] == []
        assert all(ok(alice, "group.receipts", group=group, id=i)["tracked"] is False for i in ids)
        eventually(lambda: untracked(broker, tmp_path, request))
    finally:
        broker.stop()


def test_tracking_ends_at_the_ttl(tmp_path: Path, made: list[Peer], deployment: str,
                                  request: pytest.FixtureRequest) -> None:
    broker = start_on(deployment, tmp_path, request, **{"staging.ttl_days": 1.5 / 86400, "staging.sweep_s": 0.2})
    try:
        alice, bob = online_peer(broker.port, made, "alice"), online_peer(broker.port, made, "bob")
        online_peer(broker.port, made, "carol").close()  # known, offline: never acks
        online_peer(broker.port, made, "carol", "laptop").close()  # both of her devices' copies expire
        group = ok(alice, "group.create", name="g", members=["bob", "carol"])["group"]
        send(alice, group, "m1")
        alice.expect(receipt("sent", "m1"))
        ack(bob, bob.expect(msg("m1")))
        got = alice.expect(receipt("expired", "m1"))  # carol's copies expired
        assert got["peer"] == group and got["ids"] == ["m1"]
        eventually(lambda: untracked(broker, tmp_path, request))
        assert ok(alice, "group.receipts", group=group, id="m1")["tracked"] is False
        seen(bob, group, "m1")  # too late: nothing is tracked
        assert statuses(alice, 1.0) == [], "expired once, no delivered or seen after it"
        if isinstance(broker, ClusterDeployment):  # the body and the expiring set are gone too
            redis_cluster = request.getfixturevalue("redis_cluster")
            eventually(lambda: {**redis_keys(redis_cluster, broker.prefix, "g:*:b:*"),
                                **redis_keys(redis_cluster, broker.prefix, "g:*:xp")} == {})
    finally:
        broker.stop()
