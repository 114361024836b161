"""Groups in cluster mode end to end (docs/PROTOCOL.md sections 10 and 11): broker nodes on a real Redis
Cluster, members connected to different nodes on purpose. One gseq order of messages and events for
every member, a removed member gets nothing after its removal, an offline member catches up, the body is
stored once in Redis, a node SIGKILLed mid-fanout loses, repeats and reorders nothing once another
node's sweep has taken its fanouts over, and one SIGKILLed while members ack loses and doubles no group
receipt (the rest of the receipts: tests/test_group_receipts.py, on both deployments)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bridge.cluster.group_store import GroupExpiry, Mark, MarkKind
from broker import credentials
from storage.redis.group_log import RedisGroupLog
from storage.redis.users import RedisUserStore
from testkit.redis_cluster import RedisCluster
from tests.deployment import ClusterDeployment
from tests.helpers import WAIT_S, BrokerProcess, Peer, eventually
from tests.test_groups import Collector, drain, ok, send

USERS = ("alice", "bob", "carol", "dave", "erin")


@pytest.fixture
def two(tmp_path: Path, redis_cluster: RedisCluster) -> Iterator[ClusterDeployment]:
    deployment = ClusterDeployment(tmp_path / "cluster", redis_cluster, {"limits.send_burst": 5000}, nodes=2).start()
    deployment.add_users({name: "same-pw" for name in USERS})
    yield deployment
    deployment.stop()


def redis_keys(redis_cluster: RedisCluster, prefix: str, pattern: str) -> dict[str, Any]:
    """Every key of ``prefix`` matching ``pattern`` with its value (hashes and sorted sets as Python values)."""
    host, port = redis_cluster.startup_nodes[0]
    client = redis.RedisCluster(host=host, port=port, decode_responses=True)
    try:
        out: dict[str, Any] = {}
        for key in client.scan_iter(match=prefix + pattern, count=1000, target_nodes=redis.RedisCluster.PRIMARIES):
            kind = client.type(key)
            out[key] = (client.hgetall(key) if kind == "hash" else client.zrange(key, 0, -1) if kind == "zset"
                        else client.get(key) if kind == "string" else kind)
        return out
    finally:
        client.close()


def wait_none_left(redis_cluster: RedisCluster, prefix: str, pattern: str, what: str = "nothing left") -> None:
    """Wait until no key of ``prefix`` matches ``pattern``; fail showing the keys still there."""
    left: dict[str, Any] = {}

    def none_left() -> bool:
        nonlocal left
        left = redis_keys(redis_cluster, prefix, pattern)
        return not left
    try:
        eventually(none_left, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}; left: {left}") from None


def check_one_order(streams: dict[str, list[tuple[int, str]]]) -> dict[int, str]:
    """Each member's stream is in gseq order without repeats, and a gseq is the same item for everyone."""
    order: dict[int, str] = {}
    for user, stream in streams.items():
        gseqs = [gseq for gseq, _ in stream]
        assert gseqs == sorted(set(gseqs)), f"{user}: out of gseq order or repeated: {stream}"
        for gseq, what in stream:
            assert order.setdefault(gseq, what) == what, f"gseq {gseq} is {order[gseq]} and {what}"
    return order


def test_members_on_both_nodes_get_messages_and_events_in_one_order(two: ClusterDeployment,
                                                                   made: list[Any]) -> None:
    """Senders on both nodes stream to the group while an admin adds, renames and removes members: every
    member sees one gseq order of messages and events; carol nothing after her removal, dave nothing from
    before his addition."""
    nodes = [node.port for node in two.nodes]
    members = {user: Collector(nodes[n % 2], made, user, None)
               for n, user in enumerate(("alice", "bob", "carol", "dave"))}
    admin = Peer(nodes[0], "alice", "same-pw", device="admin")
    made.append(admin)
    assert admin.connect() == 0 and admin.subscribe() == [1]
    group = ok(admin, "group.create", name="g", members=["bob", "carol"])["group"]
    senders = {"alice": members["alice"].peer, "bob": members["bob"].peer}
    per_sender = 40

    def stream(user: str) -> None:
        for n in range(per_sender):
            send(senders[user], group, f"{user}-{n:03d}")

    threads = [threading.Thread(target=stream, args=(user,)) for user in senders]
    for thread in threads:
        thread.start()
    ok(admin, "group.add", group=group, members=["dave"])
    ok(admin, "group.rename", group=group, name="h")
    ok(admin, "group.remove", group=group, members=["carol"])
    for thread in threads:
        thread.join(WAIT_S)
    total = 2 * per_sender + 4  # created, member_added, renamed, member_removed
    for user in ("alice", "bob"):  # not their own messages (alice.phone sent alice's), everything else
        eventually(functools.partial(lambda u: len(members[u].stream()) == total - per_sender, user),
                   what=f"{user}'s items")
    order = check_one_order({user: members[user].stream() for user in ("alice", "bob")})
    assert len(order) == total and sorted(order) == list(range(1, total + 1))
    removed = next(g for g, what in order.items() if what == "member_removed")
    added = next(g for g, what in order.items() if what == "member_added")
    eventually(lambda: members["dave"].stream()[-1:] == [(total, order[total])], what="dave's items")
    eventually(lambda: members["carol"].stream()[-1:] == [(removed, "member_removed")], what="carol's removal")
    streams = {user: members[user].stream() for user in members}
    check_one_order(streams)
    assert streams["carol"][-1] == (removed, "member_removed"), "carol: nothing after her removal"
    assert [g for g, _ in streams["carol"]] == [g for g in range(1, removed + 1)
                                                if not order[g].startswith("carol")]
    assert [g for g, _ in streams["dave"]] == list(range(added, total + 1)), "dave: everything from his addition"
    assert not any(i.get("kind") == "msg" for i in drain(members["carol"].peer, 0.3))


def test_an_offline_member_catches_up_and_the_body_is_stored_once(two: ClusterDeployment, made: list[Any],
                                                                  redis_cluster: RedisCluster) -> None:
    alice = Collector(two.nodes[0].port, made, "alice", None)
    for user in ("bob", "carol", "dave", "erin"):  # two devices each, offline
        for device in ("phone", "laptop"):
            peer = Peer(two.nodes[1].port, user, "same-pw", device=device)
            assert peer.connect() == 0
            peer.close()
    group = ok(alice.peer, "group.create", name="g", members=["bob", "carol", "dave", "erin"])["group"]
    marker = "BODY-ONCE-" + "x" * 200
    for n in range(3):
        send(alice.peer, group, f"m{n}", f"{marker}{n}")
        assert alice.peer.expect(lambda i: i.get("kind") == "receipt")["status"] == "sent"
    prefix = two.nodes[0].app.settings.cluster.key_prefix

    def queued() -> int:
        return sum(len(v) for k, v in redis_keys(redis_cluster, prefix, "q:*").items())

    eventually(lambda: queued() == 8 * 4, what="every offline device's items")  # the created event and 3 messages
    everything = json.dumps(redis_keys(redis_cluster, prefix, "*"))
    assert everything.count(marker + "0") == 1, "the body is in Redis once, not per member or device"
    assert len(redis_keys(redis_cluster, prefix, "g:*:b:*")) == 3
    bob = Collector(two.nodes[0].port, made, "bob", None)  # catches up through the other node
    eventually(lambda: bob.stream() == [(1, "created"), (2, "m0"), (3, "m1"), (4, "m2")], what="bob's backlog")
    others = [Collector(two.nodes[1].port, made, user, None, device) for user in ("bob", "carol", "dave", "erin")
              for device in ("phone", "laptop") if (user, device) != ("bob", "phone")]
    for member in others:
        eventually(lambda m=member: len(m.stream()) == 4, what=f"{member.peer.client_id}'s backlog")
    wait_none_left(redis_cluster, prefix, "g:*:b:*", "the bodies gone after the last ack")


async def add_users(redis_cluster: RedisCluster, prefix: str, names: list[str]) -> None:
    users = await RedisUserStore.open(redis_cluster.startup_nodes, prefix)
    try:
        digest = credentials.hash_password("same-pw")
        for name in names:
            await users.add_user(name, digest)
    finally:
        await users.close()


class Traffic:
    """Member devices streaming to one group and receiving from it: each acks what it gets and records
    its messages and its ``sent`` receipts, as a client with an outbox would need."""

    def __init__(self) -> None:
        self.received: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.sent: dict[str, set[str]] = defaultdict(set)
        self.receipts: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)  # other receipts, by seq
        self.lock = threading.Lock()
        self.clients: list[Peer] = []

    def connect(self, user: str, port: int) -> Peer:
        peer = Peer(port, user, "same-pw")

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            item = json.loads(msg.payload)
            if "seq" in item:
                client.publish(f"u/{user}/ack", json.dumps({"seqs": [item["seq"]]}), qos=1)
            with self.lock:
                if item.get("kind") == "msg":
                    self.received[user].append(item)
                elif item.get("kind") == "receipt" and item.get("status") == "sent":
                    self.sent[user].update(item["ids"])
                elif item.get("kind") == "receipt":
                    self.receipts[user][item["seq"]] = item  # a redelivery keeps its seq
                elif item.get("kind") == "res":
                    peer.messages.put((msg.topic, msg.payload, False))

        peer.client.on_message = on_message
        self.clients.append(peer)
        assert peer.connect() == 0 and peer.subscribe() == [1]
        return peer

    def streaming(self, peer: Peer, group: str, ids: list[str]) -> threading.Thread:
        """A thread publishing ``ids`` to ``group`` until its connection goes."""
        def stream() -> None:
            for msg_id in ids:
                if peer.disconnected.is_set():
                    return
                try:
                    send(peer, group, msg_id, f"body of {msg_id}")
                except (RuntimeError, ValueError):
                    return

        thread = threading.Thread(target=stream)
        thread.start()
        return thread

    def count(self) -> int:
        with self.lock:
            return sum(len(items) for items in self.received.values())

    def resend(self, user: str, peer: Peer, group: str, ids: list[str]) -> None:
        """The outbox: everything without ``sent``, in order, same ids."""
        with self.lock:
            missing = [m for m in ids if m not in self.sent[user]]
        for msg_id in missing:
            send(peer, group, msg_id, f"body of {msg_id}")

    def check(self, users: list[str], everything: dict[str, list[str]]) -> None:
        """Every member gets every message of the others; each (from, id) staged once for it (one seq;
        a redelivery repeats the seq), and all members see one gseq order."""
        for user in users:
            want = {m for sender, ids in everything.items() if sender != user for m in ids}
            eventually(functools.partial(lambda u, w: {i["id"] for i in self.received[u]} >= w, user, want),
                       timeout=60, what=f"{user}'s messages")
        streams: dict[str, list[tuple[int, str]]] = {}
        for user in users:
            seqs: dict[tuple[str, str], set[int]] = defaultdict(set)
            by_seq: dict[int, tuple[int, str]] = {}
            with self.lock:
                for item in self.received[user]:
                    seqs[(item["from"], item["id"])].add(item["seq"])
                    by_seq[item["seq"]] = (item["gseq"], item["id"])
            repeated = {key: found for key, found in seqs.items() if len(found) > 1}
            assert not repeated, f"{user}: staged more than once: {list(repeated.items())[:3]}"
            streams[user] = [by_seq[seq] for seq in sorted(by_seq)]
        check_one_order(streams)

    def close(self) -> None:
        for peer in self.clients:
            peer.close()


def test_a_node_killed_mid_fanout_loses_repeats_and_reorders_nothing(tmp_path: Path,
                                                                     redis_cluster: RedisCluster) -> None:
    """Two nodes as processes; two senders on node 0 stream to a group of twelve spread over both; node 0
    is SIGKILLed mid-stream (with entries still in the log: its fanout is behind). Its clients reconnect
    to node 1 and re-send what got no ``sent``; node 1's sweep fans what node 0 left in the log."""
    prefix = f"k{uuid.uuid4().hex[:10]}:"
    users = [f"k{i:02d}" for i in range(12)]
    asyncio.run(add_users(redis_cluster, prefix, users))
    base = {"cluster.redis": [f"127.0.0.1:{port}" for _, port in redis_cluster.startup_nodes],
            "cluster.key_prefix": prefix, "cluster.lease_s": 2.0, "staging.sweep_s": 1.0,
            "limits.send_burst": 100000, "limits.send_rate_per_s": 100000.0}
    procs = [BrokerProcess(tmp_path / f"n{n}", {**base, "cluster.node_id": f"n{n}"}).start() for n in range(2)]
    traffic = Traffic()
    try:
        senders, per_sender = users[:2], 300
        online = {u: traffic.connect(u, procs[0 if u in senders else n % 2].port) for n, u in enumerate(users)}
        group = ok(online[users[0]], "group.create", name="chaos", members=users[1:])["group"]
        everything = {u: [f"{u}-{n:04d}" for n in range(per_sender)] for u in senders}
        threads = [traffic.streaming(online[u], group, everything[u]) for u in senders]
        eventually(lambda: traffic.count() > 600, what="the stream got going")
        killed = procs[0].proc
        assert killed is not None
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(10)
        procs[0].proc = None
        for thread in threads:
            thread.join(WAIT_S)
        for n, user in enumerate(users):  # node 0's clients come back through node 1
            if n % 2 == 0 or user in senders:
                online[user].close()
                online[user] = traffic.connect(user, procs[1].port)
        for user in senders:
            traffic.resend(user, online[user], group, everything[user])
        traffic.check(users, everything)
        assert redis_keys(redis_cluster, prefix, "g:*:log") == {}, "every entry fanned (and dropped from the log)"
    finally:
        traffic.close()
        for proc in procs:
            proc.stop()


def test_a_redis_failover_of_the_group_loses_repeats_and_reorders_nothing(tmp_path: Path,
                                                                          redis_cluster: RedisCluster) -> None:
    """The master of the group's slot is SIGKILLed while two members on two nodes stream to a group of
    six (``cluster.min_replicas_ack`` 1: what is ``sent`` is on a replica); it comes back as a replica.
    The senders re-send what got no ``sent``: every member gets everything once, in one order."""
    deployment = ClusterDeployment(tmp_path / "c", redis_cluster, {
        "limits.send_burst": 100000, "limits.send_rate_per_s": 100000.0, "cluster.min_replicas_ack": 1,
        "staging.sweep_s": 1.0}, nodes=2).start()
    users = [f"f{i:02d}" for i in range(6)]
    deployment.add_users({user: "same-pw" for user in users})
    traffic = Traffic()
    killed = None
    try:
        online = {u: traffic.connect(u, deployment.nodes[n % 2].port) for n, u in enumerate(users)}
        senders, per_sender = users[:2], 150
        group = ok(online[users[0]], "group.create", name="failover", members=users[1:])["group"]
        everything = {u: [f"{u}-{n:04d}" for n in range(per_sender)] for u in senders}
        threads = [traffic.streaming(online[u], group, everything[u]) for u in senders]
        eventually(lambda: traffic.count() > 100, what="the stream got going")
        tag = "{" + group.removeprefix("g:") + "}"
        killed = redis_cluster.kill_master(tag)
        redis_cluster.wait_promoted(tag, killed)
        redis_cluster.restart(killed)  # back as a replica: WAIT can be answered again
        killed = None
        for thread in threads:
            thread.join(60)
        for user in senders:
            traffic.resend(user, online[user], group, everything[user])
        traffic.check(users, everything)
    finally:
        if killed is not None:
            redis_cluster.restart(killed)
        traffic.close()
        deployment.stop()


def test_a_node_killed_while_members_ack_loses_and_doubles_no_group_receipt(tmp_path: Path,
                                                                          redis_cluster: RedisCluster) -> None:
    """A sender on node 1 streams to eight members, half of them on node 0, all acking; node 0 is SIGKILLed
    once the first ``delivered`` receipts came. Its members come back through node 1 (their unacked items
    again). Then every member reports every message seen. The sender gets, per message, one ``delivered``
    then one ``seen``, and Redis keeps no tracking after."""
    prefix = f"r{uuid.uuid4().hex[:10]}:"
    sender, members = "rsender", [f"r{i:02d}" for i in range(8)]
    asyncio.run(add_users(redis_cluster, prefix, [sender, *members]))
    base = {"cluster.redis": [f"127.0.0.1:{port}" for _, port in redis_cluster.startup_nodes],
            "cluster.key_prefix": prefix, "cluster.lease_s": 2.0, "staging.sweep_s": 1.0,
            "limits.send_burst": 100000, "limits.send_rate_per_s": 100000.0}
    procs = [BrokerProcess(tmp_path / f"n{n}", {**base, "cluster.node_id": f"n{n}"}).start() for n in range(2)]
    traffic = Traffic()

    def statuses() -> dict[str, list[str]]:
        with traffic.lock:
            found = sorted(traffic.receipts[sender].items())
        out: dict[str, list[str]] = defaultdict(list)
        for _, item in found:
            assert item["peer"] == group
            for msg_id in item["ids"]:
                out[msg_id].append(item["status"])
        return out

    try:
        online = {sender: traffic.connect(sender, procs[1].port)}
        online.update({user: traffic.connect(user, procs[n % 2].port) for n, user in enumerate(members)})
        group = ok(online[sender], "group.create", name="receipts", members=members)["group"]
        ids = [f"m{n:03d}" for n in range(120)]
        thread = traffic.streaming(online[sender], group, ids)
        eventually(lambda: len(statuses()) >= 5, what="the first delivered receipts")
        killed = procs[0].proc
        assert killed is not None
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(10)
        procs[0].proc = None
        thread.join(WAIT_S)
        for user in members[::2]:  # node 0's members come back through node 1
            online[user].close()
            online[user] = traffic.connect(user, procs[1].port)
        traffic.resend(sender, online[sender], group, ids)
        eventually(lambda: set(statuses()) == set(ids), timeout=60, what="delivered to all, for every message")
        for user in members:
            for start in range(0, len(ids), 40):
                online[user].publish(f"u/{user}/seen", {"to": group, "ids": ids[start:start + 40]})
        eventually(lambda: all(s[-1:] == ["seen"] for s in statuses().values()), timeout=60, what="seen by all")
        drain(online[sender], 1.0)
        assert {msg_id: s for msg_id, s in statuses().items() if s != ["delivered", "seen"]} == {}, "once each"
        wait_none_left(redis_cluster, prefix, "g:*:t:*", "no tracking left")
    finally:
        traffic.close()
        for proc in procs:
            proc.stop()


async def mark_and_die(redis_cluster: RedisCluster, prefix: str, group: str, marks: list[Mark]) -> None:
    """What a node does before it stages the receipts of a seen report (the hint, the mark), and no more."""
    log = await RedisGroupLog.open(redis_cluster.startup_nodes, prefix)
    try:
        await log.hint(group, 0)
        await log.mark(group, marks, "died")
    finally:
        await log.close()


@contextlib.contextmanager
def m1_to_bob(tmp_path: Path, redis_cluster: RedisCluster,
              made: list[Any]) -> Iterator[tuple[ClusterDeployment, Peer, Peer, str, dict[str, Any]]]:
    """Two nodes (sweeping every 0.5 s): alice on one sent m1 to a group with bob, on the other, who has it."""
    deployment = ClusterDeployment(tmp_path / "c", redis_cluster, {"staging.sweep_s": 0.5}, nodes=2).start()
    try:
        deployment.add_users({user: f"{user}-pw" for user in ("alice", "bob")})
        alice, bob = deployment.peer(0, made, "alice"), deployment.peer(1, made, "bob")
        group = ok(alice, "group.create", name="g", members=["bob"])["group"]
        send(alice, group, "m1")
        alice.expect(lambda i: i.get("kind") == "receipt" and i["status"] == "sent")
        yield deployment, alice, bob, group, bob.expect(lambda i: i.get("kind") == "msg" and i["id"] == "m1")
    finally:
        deployment.stop()


def test_a_completion_whose_node_died_before_its_receipt_is_staged_by_a_sweep(
        tmp_path: Path, redis_cluster: RedisCluster, made: list[Any]) -> None:
    """A node marked bob's seen report (completing m1) and died before staging its receipts: a sweep stages
    ``delivered`` then ``seen`` for alice, once; bob's own ack and report after change nothing."""
    with m1_to_bob(tmp_path, redis_cluster, made) as (deployment, alice, bob, group, copy):
        asyncio.run(mark_and_die(redis_cluster, deployment.prefix, group,
                                 [Mark(MarkKind.SEEN, "bob", msg_id="m1")]))
        got = [alice.expect(lambda i: i.get("kind") == "receipt", timeout=15)["status"] for _ in range(2)]
        assert got == ["delivered", "seen"]
        bob.publish("u/bob/ack", {"seqs": [copy["seq"]]})
        bob.publish("u/bob/seen", {"to": group, "ids": ["m1"]})
        assert [i for i in drain(alice, 1.0) if i.get("kind") == "receipt"] == [], "staged once"
        wait_none_left(redis_cluster, deployment.prefix, "g:*:[tp]*", "nothing left")


async def expire_and_die(redis_cluster: RedisCluster, prefix: str, group: str, gseq: int) -> None:
    """What a node does when a member's copy of ``gseq`` expires, before it stages the receipts (the hint, the
    report to the group's slot), and no more."""
    log = await RedisGroupLog.open(redis_cluster.startup_nodes, prefix)
    try:
        await log.hint(group, 0)
        await log.expire(group, [GroupExpiry(group, gseq, False)], "died expiring")
    finally:
        await log.close()


def test_an_expiry_whose_node_died_before_its_receipt_is_staged_by_a_sweep(
        tmp_path: Path, redis_cluster: RedisCluster, made: list[Any]) -> None:
    """Bob's ack completed m1 on a node that died before staging ``delivered``; then a device's copy expired on
    a node that died before staging ``expired``. A sweep stages ``delivered`` then ``expired`` for alice,
    once; bob's seen report after changes nothing, and nothing of m1 is left in Redis."""
    with m1_to_bob(tmp_path, redis_cluster, made) as (deployment, alice, bob, group, copy):
        acked = Mark(MarkKind.DELIVERED, "bob", copy["gseq"])
        asyncio.run(mark_and_die(redis_cluster, deployment.prefix, group, [acked]))
        asyncio.run(expire_and_die(redis_cluster, deployment.prefix, group, copy["gseq"]))
        got = [alice.expect(lambda i: i.get("kind") == "receipt", timeout=15) for _ in range(2)]
        assert [(i["status"], i["ids"], i["peer"]) for i in got] == [("delivered", ["m1"], group),
                                                                      ("expired", ["m1"], group)]
        bob.publish("u/bob/seen", {"to": group, "ids": ["m1"]})
        bob.publish("u/bob/ack", {"seqs": [copy["seq"]]})
        assert [i for i in drain(alice, 1.0) if i.get("kind") == "receipt"] == [], "once, and nothing after"
        assert ok(alice, "group.receipts", group=group, id="m1")["tracked"] is False
        wait_none_left(redis_cluster, deployment.prefix, "g:*:[tpbx]*", "nothing left")


def test_a_member_s_high_water_mark_goes_after_leaving_and_a_rejoin_gets_only_new_items(
        tmp_path: Path, redis_cluster: RedisCluster, made: list[Any]) -> None:
    """Bob leaves a group: his high-water mark of it stays for the grace (a fanout run again must find it),
    then a later fanout to him drops it; rejoined, he gets the group from his ``member_added`` on, nothing
    of before again (docs/SCALING.md)."""
    deployment = ClusterDeployment(tmp_path / "c", redis_cluster, {"limits.send_burst": 5000}, nodes=2).start()
    try:
        deployment.add_users({"alice": "alice-pw", "bob": "same-pw"})  # (Collector logs in with same-pw)
        alice = deployment.peer(0, made, "alice")
        bob = Collector(deployment.nodes[1].port, made, "bob", None)
        left, other = (ok(alice, "group.create", name=name, members=["bob"])["group"] for name in ("left", "other"))
        send(alice, left, "m1")
        eventually(lambda: bob.ids() == ["m1"], what="m1")
        bob.peer.request("group.leave", {"group": left})
        eventually(lambda: (3, "member_left") in bob.stream(), what="bob's own member_left")
        prefix, host, port = deployment.prefix, *redis_cluster.startup_nodes[0]
        marks = f"{prefix}gw:{{bob}}"
        assert list(redis_keys(redis_cluster, prefix, "gwx:*").values()) == [[left]]
        assert redis_keys(redis_cluster, prefix, "gw:{bob}") == {marks: {left: "3", other: "1"}}, "kept for now"
        client = redis.RedisCluster(host=host, port=port, decode_responses=True)
        try:
            client.zadd(f"{prefix}gwx:{{bob}}", {left: 0})  # the grace has passed
        finally:
            client.close()
        send(alice, other, "o1")  # a fanout to bob, of any group, drops it
        eventually(lambda: redis_keys(redis_cluster, prefix, "gw:{bob}") == {marks: {other: "2"}},
                   what="the mark of the group left dropped")
        assert redis_keys(redis_cluster, prefix, "gwx:*") == {}
        ok(alice, "group.add", group=left, members=["bob"])
        send(alice, left, "m2")
        eventually(lambda: bob.ids() == ["m1", "o1", "m2"], what="m2")
        with bob.lock:  # every item bob got of the group, repeats included
            got = [(i["gseq"], i.get("id") or i["event"]) for i in bob.items if left in (i.get("group"), i.get("to"))]
        assert got == [(1, "created"), (2, "m1"), (3, "member_left"), (4, "member_added"), (5, "m2")]
        assert redis_keys(redis_cluster, prefix, "gw:{bob}") == {marks: {other: "2", left: "5"}}
    finally:
        deployment.stop()


def test_expiries_through_a_redis_failover_of_the_group_tell_the_sender_and_nothing_after(
        tmp_path: Path, redis_cluster: RedisCluster) -> None:
    """A sender's 60 messages to four members whose devices never ack expire (TTL 3 s); the master of the
    group's slot is SIGKILLed once the first ``expired`` came. The sender gets ``expired`` for every
    message (a second copy only if a failover lost the reply of its stage, which clients drop as a status
    they have) and no ``delivered`` or ``seen``; nothing of the tracking or the expiries stays in Redis."""
    deployment = ClusterDeployment(tmp_path / "c", redis_cluster, {
        "limits.send_burst": 100000, "limits.send_rate_per_s": 100000.0, "cluster.min_replicas_ack": 1,
        "staging.ttl_days": 3 / 86400, "staging.sweep_s": 0.2}, nodes=2).start()
    sender, members = "xs", [f"x{i}" for i in range(4)]
    deployment.add_users({user: "same-pw" for user in (sender, *members)})
    traffic = Traffic()
    killed = None
    try:
        for n, user in enumerate(members):  # a device each, offline from now on: its copies expire
            peer = Peer(deployment.nodes[n % 2].port, user, "same-pw")
            assert peer.connect() == 0
            peer.close()
        online = traffic.connect(sender, deployment.nodes[0].port)
        group = ok(online, "group.create", name="expiring", members=members)["group"]
        ids = [f"e{n:03d}" for n in range(60)]
        traffic.streaming(online, group, ids).join(WAIT_S)
        eventually(lambda: traffic.sent[sender] >= set(ids), what="sent for every message")

        def statuses() -> dict[str, list[str]]:
            with traffic.lock:
                found = sorted(traffic.receipts[sender].items())
            out: dict[str, list[str]] = defaultdict(list)
            for _, item in found:
                for msg_id in item["ids"]:
                    out[msg_id].append(item["status"])
            return out

        eventually(lambda: len(statuses()) > 0, what="the first expired receipt")
        tag = "{" + group.removeprefix("g:") + "}"
        killed = redis_cluster.kill_master(tag)
        redis_cluster.wait_promoted(tag, killed)
        redis_cluster.restart(killed)
        killed = None
        eventually(lambda: set(statuses()) == set(ids), timeout=60, what="expired for every message")
        drain(online, 1.0)
        assert {msg_id: s for msg_id, s in statuses().items() if set(s) != {"expired"}} == {}
        wait_none_left(redis_cluster, deployment.prefix, "g:*:[tpx]*", "nothing left")
    finally:
        if killed is not None:
            redis_cluster.restart(killed)
        traffic.close()
        deployment.stop()
