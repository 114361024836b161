"""Groups through the real broker (one process on SQLite), as raw MQTT clients see them: the ``group.*``
requests and their refusals, the events in gseq order for every member, group messages (the body
stored once, an item per member device, one order for all), a member offline for the whole exchange,
removal, and the broker killed during a fanout (docs/PROTOCOL.md section 11)."""

from __future__ import annotations

import functools
import json
import os
import queue
import signal
import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from chatproto import is_group_id
from tests.deployment import ClusterDeployment
from tests.helpers import WAIT_S, BrokerProcess, BrokerThread, Peer, eventually, online_peer, register_offline


def req(peer: Peer, op: str, **args: Any) -> dict[str, Any]:
    return peer.request(op, args)


def ok(peer: Peer, op: str, **args: Any) -> dict[str, Any]:
    res = req(peer, op, **args)
    assert res["ok"], res
    return dict(res["result"])


def refused(peer: Peer, op: str, **args: Any) -> str:
    res = req(peer, op, **args)
    assert not res["ok"], res
    return str(res["error"]["code"])


def send(peer: Peer, to: str, msg_id: str, body: str = "hi", **extra: Any) -> None:
    peer.publish(f"u/{peer.user}/out", {"id": msg_id, "to": to, "body": body, **extra})


def of_group(group: str | None) -> Any:
    """Items of ``group`` (None: of any group)."""
    if group is None:
        return lambda item: item.get("kind") == "group" or (item.get("kind") == "msg" and is_group_id(item.get("to")))
    return lambda item: item.get("group") == group or (item.get("kind") == "msg" and item.get("to") == group)


class Collector:
    """A member device (connected and subscribed) that acks every staged item and keeps those of one group
    (None: of every group), in arrival order."""

    def __init__(self, port: int, made: list[Peer], user: str, group: str | None, device: str = "phone") -> None:
        self.peer, self.group = Peer(port, user, "same-pw", device=device), group
        self.items: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.peer.client.on_message = self._on_message
        made.append(self.peer)
        assert self.peer.connect() == 0
        assert self.peer.subscribe() == [1]

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        item = json.loads(msg.payload)
        if "seq" in item:
            client.publish(f"u/{self.peer.user}/ack", json.dumps({"seqs": [item["seq"]]}), qos=1)
        with self.lock:
            if of_group(self.group)(item):
                self.items.append(item)
            else:
                self.peer.messages.put((msg.topic, msg.payload, False))

    def ids(self) -> list[str]:
        with self.lock:
            return [i["id"] for i in self.items if i["kind"] == "msg"]

    def stream(self) -> list[tuple[int, str]]:
        """(gseq, message id or event), repeats of a message (same from and id) dropped as a client does."""
        seen: set[tuple[str, str]] = set()
        out = []
        with self.lock:
            for item in self.items:
                if item["kind"] == "msg":
                    if (item["from"], item["id"]) in seen:
                        continue
                    seen.add((item["from"], item["id"]))
                out.append((item["gseq"], item.get("id") or item["event"]))
        return out


@pytest.fixture(params=["single", "cluster"])
def many(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """One process on SQLite, or two cluster nodes behind HAProxy (consecutive connections on different nodes)."""
    marker = request.node.get_closest_marker("broker_config")
    overrides = {"limits.send_burst": 5000, **(marker.args[0] if marker else {})}
    broker: Any
    if request.param == "cluster":
        broker = ClusterDeployment(tmp_path / "cluster", request.getfixturevalue("redis_cluster"), overrides,
                                   nodes=2).start()
    else:
        broker = BrokerThread(tmp_path / "data", overrides).start()
    broker.add_users({name: f"{name}-pw" for name in ("alice", "bob", "carol", "dave", "erin")})
    yield broker
    broker.stop()


def test_requests_events_and_refusals(many: BrokerThread, made: list[Any]) -> None:
    alice, bob, carol = (online_peer(many.port, made, u) for u in ("alice", "bob", "carol"))
    dave = online_peer(many.port, made, "dave")
    # Devices that make no requests (a request's answer is awaited by dropping other items): they watch.
    watch = {u: online_peer(many.port, made, u, "watch") for u in ("bob", "carol", "dave")}
    created = ok(alice, "group.create", name="trip", members=["bob", "carol", "alice"])
    group = created["group"]
    assert created == {"group": group, "name": "trip", "members": ["alice", "bob", "carol"], "gseq": 1}
    assert refused(alice, "group.create", name="x", members=["bob", "nobody"]) == "unknown_recipient"
    assert refused(alice, "group.create", name="\n", members=[]) == "bad_envelope"
    # Only members see a group; a group that does not exist looks the same.
    assert refused(dave, "group.info", group=group) == "not_member"
    assert refused(dave, "group.info", group="g:nosuchgroup") == "not_member"
    assert refused(bob, "group.add", group=group, members=["dave"]) == "forbidden"
    assert refused(alice, "group.add", group=group, members=["nobody"]) == "unknown_recipient"
    assert ok(alice, "group.add", group=group, members=["dave", "bob"]) == {"added": ["dave"], "gseq": 2}
    assert ok(alice, "group.add", group=group, members=["dave"]) == {"added": [], "gseq": 2}  # idempotent
    assert ok(alice, "group.rename", group=group, name="ski") == {"name": "ski", "gseq": 3}
    assert ok(alice, "group.admins", group=group, add=["bob"]) == {"admins": ["alice", "bob"], "gseq": 4}
    assert refused(alice, "group.admins", group=group, add=["erin"]) == "bad_envelope"
    assert refused(alice, "group.remove", group=group, members=["alice"]) == "bad_envelope"
    assert ok(bob, "group.remove", group=group, members=["carol"]) == {"removed": ["carol"], "gseq": 5}
    assert refused(carol, "group.info", group=group) == "not_member"
    assert ok(alice, "group.leave", group=group) == {"gseq": 6}
    info = ok(bob, "group.info", group=group)
    assert info["members"] == ["bob", "dave"] and info["admins"] == ["bob"] and info["name"] == "ski"
    assert ok(dave, "group.list")["groups"] == [{"group": group, "name": "ski", "gseq": 6, "members": 2,
                                                 "admin": False}]
    assert ok(carol, "group.list") == {"groups": []}
    # Events: each member (and the removed one, up to its removal) in gseq order.
    expected = {
        "bob": ["created", "member_added", "renamed", "admins_changed", "member_removed", "member_left"],
        "carol": ["created", "member_added", "renamed", "admins_changed", "member_removed"],
        "dave": ["member_added", "renamed", "admins_changed", "member_removed", "member_left"],
    }
    for user, peer in watch.items():
        events = [peer.expect(lambda i: i.get("kind") == "group") for _ in expected[user]]
        assert [e["event"] for e in events] == expected[user]
        assert [e["gseq"] for e in events] == sorted(e["gseq"] for e in events)
        assert all(e["group"] == group for e in events)
    assert watch["carol"].nothing_arrives(0.5)  # nothing after her removal


@pytest.mark.broker_config({"limits.max_group_members": 3, "limits.max_groups_per_user": 1})
def test_limits_are_refused_clearly(many: BrokerThread, made: list[Any]) -> None:
    alice = online_peer(many.port, made, "alice")
    bob = online_peer(many.port, made, "bob")
    assert refused(alice, "group.create", name="big", members=["bob", "carol", "dave"]) == "group_full"
    group = ok(alice, "group.create", name="g", members=["bob"])["group"]
    res = req(bob, "group.create", name="another")
    assert res["error"]["code"] == "too_many_groups" and "bob" in res["error"]["detail"]
    assert ok(alice, "group.add", group=group, members=["carol"])["added"] == ["carol"]
    assert refused(alice, "group.add", group=group, members=["dave"]) == "group_full"
    assert ok(alice, "group.info", group=group)["members"] == ["alice", "bob", "carol"]


@pytest.mark.broker_config({"limits.send_burst": 2, "limits.send_rate_per_s": 0.001})
def test_a_change_costs_a_send_token(many: BrokerThread, made: list[Any]) -> None:
    alice = online_peer(many.port, made, "alice")
    group = ok(alice, "group.create", name="g", members=["bob"])["group"]
    ok(alice, "group.rename", group=group, name="h")
    assert ok(alice, "group.rename", group=group, name="h") == {"name": "h", "gseq": 2}  # no change: free
    assert refused(alice, "group.rename", group=group, name="i") == "rate_limited"
    assert ok(alice, "group.info", group=group)["name"] == "h"


def test_group_messages_fan_out_once_per_member_device(many: BrokerThread, made: list[Any]) -> None:
    alice = online_peer(many.port, made, "alice")
    tablet = online_peer(many.port, made, "alice", "tablet")
    bob, carol, erin = (online_peer(many.port, made, u) for u in ("bob", "carol", "erin"))
    group = ok(alice, "group.create", name="g", members=["bob", "carol"])["group"]
    send(alice, group, "m1", "hello all")
    sent = alice.expect(lambda i: i.get("kind") == "receipt")
    assert sent["status"] == "sent" and sent["ids"] == ["m1"] and sent["peer"] == group
    for peer in (tablet, bob, carol):  # the sender's other device gets the history copy
        item = peer.expect(lambda i: i.get("kind") == "msg")
        assert (item["from"], item["to"], item["body"], item["gseq"], item["dev"]) == ("alice", group, "hello all",
                                                                                         2, "phone")
    assert not any(i.get("kind") == "msg" for i in drain(alice, 0.3))  # not its own message back
    send(erin, group, "x1")  # a non-member
    assert erin.expect(lambda i: i.get("kind") == "error") == {
        "kind": "error", "code": "forbidden", "detail": "you are not a member of this group", "ref": "x1"}
    send(erin, "g:nosuchgroup", "x2")
    assert erin.expect(lambda i: i.get("kind") == "error")["code"] == "forbidden"
    erin.publish("u/erin/out", {"id": "x3", "to": group, "bodies": {"bob.phone": "c"}, "type": "olm"})
    assert erin.expect(lambda i: i.get("kind") == "error")["code"] == "bad_envelope"
    # Removed: nothing of the group after its own removal, and its messages are refused.
    ok(alice, "group.remove", group=group, members=["carol"])
    assert carol.expect(lambda i: i.get("kind") == "group")["event"] == "member_removed"
    send(alice, group, "m2")
    assert bob.expect(lambda i: i.get("kind") == "msg")["id"] == "m2"
    send(carol, group, "c1")
    assert carol.expect(lambda i: i.get("kind") == "error")["code"] == "forbidden"
    assert not any(i.get("kind") == "msg" for i in drain(carol))


def drain(peer: Peer, within: float = 0.5) -> list[dict[str, Any]]:
    items = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            items.append(peer.items(timeout=0.05))
        except queue.Empty:
            continue
    return items


@pytest.mark.broker_config({"limits.require_encryption": True})
def test_encryption_required_takes_megolm_only(many: BrokerThread, made: list[Any]) -> None:
    alice, bob = online_peer(many.port, made, "alice"), online_peer(many.port, made, "bob")
    group = ok(alice, "group.create", name="g", members=["bob"])["group"]
    send(alice, group, "p1", "plain")
    assert alice.expect(lambda i: i.get("kind") == "error")["code"] == "encryption_required"
    send(alice, group, "e1", "AwgAEi...", type="megolm")
    assert bob.expect(lambda i: i.get("kind") == "msg")["type"] == "megolm"


def test_body_is_stored_once_for_every_member(many: Any, made: list[Any], tmp_path: Path) -> None:
    if isinstance(many, ClusterDeployment):
        pytest.skip("SQLite's tables; cluster mode: tests/test_cluster_groups.py")
    alice = online_peer(many.port, made, "alice")
    for user in ("bob", "carol", "dave", "erin"):
        register_offline(many.port, user)
        register_offline(many.port, user, "laptop")
    group = ok(alice, "group.create", name="g", members=["bob", "carol", "dave", "erin"])["group"]
    marker = "BODY-ONCE-" + "x" * 200
    send(alice, group, "once", marker)
    assert alice.expect(lambda i: i.get("kind") == "receipt")["status"] == "sent"  # on disk: offline members
    with sqlite3.connect(tmp_path / "data" / "staging.db") as db:
        (mid, count), = db.execute("SELECT mid, COUNT(*) FROM bodies WHERE body = ? GROUP BY mid", (marker,))
        assert count == 1
        assert db.execute("SELECT COUNT(*) FROM items WHERE mid = ?", (mid,)).fetchone() == (8,)
        assert db.execute("SELECT gseq FROM bodies WHERE mid = ?", (mid,)).fetchone() == (2,)


def test_a_hundred_members_get_every_message_once_in_one_order(tmp_path: Path, made: list[Any]) -> None:
    users = [f"u{i:03d}" for i in range(100)]
    broker = BrokerThread(tmp_path / "data", {"limits.send_burst": 5000, "limits.max_group_members": 100})
    broker.start()
    try:
        broker.call(_add_users(broker, users), timeout=120)
        owner = Peer(broker.port, users[0], "same-pw")
        made.append(owner)
        assert owner.connect() == 0 and owner.subscribe() == [1]
        absent = users[99]  # offline for the whole exchange
        lurker = Peer(broker.port, absent, "same-pw")
        assert lurker.connect() == 0
        lurker.close()
        group = ok(owner, "group.create", name="hundred", members=users[1:])["group"]
        members = {u: Collector(broker.port, made, u, group) for u in users[1:99]}
        senders = [members[u] for u in users[1:6]]
        per_sender = 8

        def stream(collector: Collector) -> None:
            for n in range(per_sender):
                send(collector.peer, group, f"{collector.peer.user}-{n}")

        threads = [threading.Thread(target=stream, args=(s,)) for s in senders]
        for thread in threads:
            thread.start()
        ok(owner, "group.rename", group=group, name="renamed mid-stream")
        for thread in threads:
            thread.join(WAIT_S)
        everything = {f"{s.peer.user}-{n}" for s in senders for n in range(per_sender)}
        for user, collector in members.items():
            own = {i for i in everything if i.startswith(f"{user}-")}
            eventually(functools.partial(lambda c, want: set(c.ids()) >= want, collector, everything - own),
                       what=f"{user}'s messages")
        streams = {u: c.stream() for u, c in members.items()}
        gseqs = {g: name for s in streams.values() for g, name in s}
        for user, stream_of in streams.items():
            assert [g for g, _ in stream_of] == sorted({g for g, _ in stream_of}), f"{user}: repeats or disorder"
            assert all(gseqs[g] == name for g, name in stream_of), "one gseq, one item for all"
        late = Collector(broker.port, made, absent, group)
        want = [(g, name) for g, name in sorted(gseqs.items()) if g > 1]
        eventually(lambda: late.stream()[1:] == want, what="the offline member's catch-up")
        assert late.stream()[0] == (1, "created")
    finally:
        for peer in made:  # before the broker goes: a client closed after it waits to reconnect
            peer.close()
        made.clear()
        broker.stop()


async def _add_users(broker: BrokerThread, users: list[str]) -> None:
    from broker import credentials  # noqa: PLC0415

    digest = credentials.hash_password("same-pw")  # one hash for all: scrypt is slow on purpose
    for user in users:
        await broker.app.users.add_user(user, digest)


def test_logged_events_are_staged_after_a_crash_before_their_staging(tmp_path: Path, made: list[Any]) -> None:
    """A change committed (with its events logged) but killed before the staging commit: the next start
    stages its events."""
    broker = BrokerThread(tmp_path / "data").start()
    try:
        broker.add_users({"alice": "alice-pw", "bob": "bob-pw"})
        register_offline(broker.port, "bob")
        alice = online_peer(broker.port, made, "alice")
        group = ok(alice, "group.create", name="g", members=["bob"])["group"]
        alice.expect(lambda i: i.get("kind") == "group")
    finally:
        broker.stop()
    with sqlite3.connect(tmp_path / "data" / "staging.db") as db:  # as if the staging commit never happened
        db.execute("DELETE FROM items WHERE event IS NOT NULL")
        db.execute("DELETE FROM group_gseqs")
    with sqlite3.connect(tmp_path / "data" / "groups.db") as db:
        db.execute("INSERT OR REPLACE INTO group_log SELECT gid, 1, ?, ? FROM groups",
                   (json.dumps({"group": group, "gseq": 1, "event": "created", "by": "alice", "ts": 1,
                                "users": ["alice", "bob"], "name": "g", "promoted": [], "demoted": []}),
                    json.dumps(["alice", "bob"])))
    broker = BrokerThread(tmp_path / "data").start()
    try:
        bob = online_peer(broker.port, made, "bob")
        event = bob.expect(lambda i: i.get("kind") == "group")
        assert (event["group"], event["gseq"], event["event"]) == (group, 1, "created")
        assert bob.nothing_arrives(0.5)  # once
    finally:
        broker.stop()


def test_sigkill_during_fanout_loses_reorders_and_repeats_nothing(tmp_path: Path) -> None:
    """The broker is killed while two members stream to a group of twelve; restarted on the same data. The
    senders re-send what got no ``sent`` (same ids), as a client's outbox does; every member gets every
    message once (repeats dropped by from and id) and all see them in one gseq order."""
    users = [f"k{i:02d}" for i in range(12)]
    proc = BrokerProcess(tmp_path / "data", {"limits": {"send_burst": 100000, "send_rate_per_s": 100000.0}})
    proc.add_users({u: f"{u}-pw" for u in users})
    proc.start()
    clients: list[Peer] = []
    received: dict[str, list[dict[str, Any]]] = defaultdict(list)
    sent: dict[str, set[str]] = defaultdict(set)
    lock = threading.Lock()

    def connect(user: str) -> Peer:
        peer = Peer(proc.port, user, f"{user}-pw")

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            item = json.loads(msg.payload)
            if "seq" in item:
                client.publish(f"u/{user}/ack", json.dumps({"seqs": [item["seq"]]}), qos=1)
            with lock:
                if item.get("kind") == "msg":
                    received[user].append(item)
                elif item.get("kind") == "receipt" and item.get("status") == "sent":
                    sent[user].update(item["ids"])
                elif item.get("kind") == "res":
                    peer.messages.put((msg.topic, msg.payload, False))

        peer.client.on_message = on_message
        clients.append(peer)
        assert peer.connect() == 0 and peer.subscribe() == [1]
        return peer

    try:
        online = {u: connect(u) for u in users}
        group = ok(online[users[0]], "group.create", name="chaos", members=users[1:])["group"]
        senders, per_sender = users[:2], 300
        everything = {u: [f"{u}-{n:04d}" for n in range(per_sender)] for u in senders}

        def stream(user: str) -> None:
            peer = online[user]
            for msg_id in everything[user]:
                if peer.disconnected.is_set():  # the connection went with the broker
                    return
                try:
                    send(peer, group, msg_id, f"body of {msg_id}")
                except (RuntimeError, ValueError):
                    return

        threads = [threading.Thread(target=stream, args=(u,)) for u in senders]
        for thread in threads:
            thread.start()
        eventually(lambda: sum(len(v) for v in received.values()) > 600, what="the stream got going")
        assert proc.proc is not None
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(10)
        for thread in threads:
            thread.join(WAIT_S)
        for peer in clients:
            peer.close()
        proc = BrokerProcess(tmp_path / "data", {"limits": {"send_burst": 100000, "send_rate_per_s": 100000.0}})
        proc.start()
        online = {u: connect(u) for u in users}
        for user in senders:  # the outbox: everything without 'sent', in order, same ids
            with lock:
                missing = [m for m in everything[user] if m not in sent[user]]
            for msg_id in missing:
                send(online[user], group, msg_id, f"body of {msg_id}")
        for user in users:
            want = {m for s in senders if s != user for m in everything[s]}
            eventually(functools.partial(lambda u, w: {i["id"] for i in received[u]} >= w, user, want), timeout=60,
                       what=f"{user}'s messages after the restart")
        order: dict[str, int] = {}
        for user in users:
            kept: list[tuple[int, str]] = []
            ids: set[str] = set()
            for item in received[user]:
                if item["id"] not in ids:
                    ids.add(item["id"])
                    kept.append((item["gseq"], item["id"]))
            assert [g for g, _ in kept] == sorted(g for g, _ in kept), f"{user} saw messages out of gseq order"
            for gseq, msg_id in kept:
                assert order.setdefault(msg_id, gseq) == gseq, f"{msg_id} has two gseqs"
        assert len(set(order.values())) == len(order)
    finally:
        for peer in clients:
            peer.close()
        proc.stop()
