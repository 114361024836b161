"""The broker SIGKILLed during membership changes of a group, with group messages flowing (issue #17, chaos).

A real broker process on SQLite. Two admins add and remove members back to back while two members stream
messages to the group; the broker is killed mid-way and restarted on the same data directory. Then, as
clients do: every request that got no answer is made again (the same op and args: requests are
idempotent), every message without ``sent`` is sent again (same id). A final rename marks the end.

Checked, from what each device received (redeliveries of the same ``seq`` dropped, as the SDK does):
- one order: a gseq is one item for every member, a message has one gseq, each device sees increasing gseqs;
- none twice: no two staged items (different seqs) for one gseq on a device;
- no miss and nothing extra: replaying the events in gseq order gives who was a member at each gseq, and each
  device got exactly the items of the gseqs it was a member at (a removed member gets its
  ``member_removed`` and nothing after it until it is added again; a message not its own);
- every answered change is in the stream at its answered gseq; the final membership is what the admins
  asked for, whether the unanswered requests were applied before the kill or by their retry.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.helpers import BrokerProcess, Peer, eventually

PATIENCE_S = 30.0  # for any one answer or arrival: generous, the machine may be loaded (waits end at once)
LIMITS = {"limits": {"send_burst": 100000, "send_rate_per_s": 100000.0}}
OWNER, ADMIN = "own", "adm"
STABLE = [f"s{i}" for i in range(4)]  # members all along; s0 and s1 also send
CHURN = {OWNER: ["c0", "c1", "c2"], ADMIN: ["c3", "c4", "c5"]}  # who each admin adds and removes
SENDERS = STABLE[:2]
USERS = [OWNER, ADMIN, *STABLE, *CHURN[OWNER], *CHURN[ADMIN]]


class Log:
    """What every device received, in arrival order, and the answers and 'sent' receipts."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.sent: dict[str, set[str]] = defaultdict(set)
        self.answers: dict[str, dict[str, Any]] = {}

    def count(self, kind: str) -> int:
        with self.cond:
            return sum(1 for item in self.items[OWNER] if item["kind"] == kind)


class Device:
    """One user's phone: acks every staged item and records it in the ``Log``."""

    def __init__(self, port: int, user: str, log: Log) -> None:
        self.user, self.log = user, log
        self.peer = Peer(port, user, f"{user}-pw")
        self.peer.client.on_message = self._on_message
        self.peer.client.on_disconnect = self._on_disconnect
        assert self.peer.connect() == 0 and self.peer.subscribe() == [1]

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        item = json.loads(msg.payload)
        if "seq" in item:
            client.publish(f"u/{self.user}/ack", json.dumps({"seqs": [item["seq"]]}), qos=1)
        with self.log.cond:
            if item.get("kind") in ("msg", "group"):
                self.log.items[self.user].append(item)
            elif item.get("kind") == "receipt" and item.get("status") == "sent":
                self.log.sent[self.user].update(item["ids"])
            elif item.get("kind") == "res":
                self.log.answers[item["rid"]] = item
            self.log.cond.notify_all()

    def _on_disconnect(self, *args: Any) -> None:
        with self.log.cond:
            self.peer.disconnected.set()  # a request waiting for its answer gives up now
            self.log.cond.notify_all()

    def publish(self, topic: str, body: dict[str, Any]) -> bool:
        """False if the connection is gone (the broker was killed)."""
        deadline = time.monotonic() + PATIENCE_S
        try:
            info = self.peer.client.publish(topic, json.dumps(body), qos=1)
            while not info.is_published():  # in slices: a PUBACK never comes from a killed broker
                if self.peer.disconnected.is_set():
                    return False
                assert time.monotonic() < deadline, f"{self.user}: no PUBACK within {PATIENCE_S}s"
                info.wait_for_publish(0.05)
        except (RuntimeError, ValueError):  # paho: not connected any more
            return False
        return True

    def request(self, rid: str, op: str, args: dict[str, Any]) -> dict[str, Any] | None:
        """The answer, or None when the connection went before it came."""
        if not self.publish(f"u/{self.user}/req", {"rid": rid, "op": op, "args": args}):
            return None
        with self.log.cond:
            self.log.cond.wait_for(lambda: rid in self.log.answers or self.peer.disconnected.is_set(), PATIENCE_S)
            answer = self.log.answers.get(rid)
        assert answer is not None or self.peer.disconnected.is_set(), f"no answer to {rid} within {PATIENCE_S}s"
        return answer

    def send(self, group: str, msg_id: str) -> bool:
        return self.publish(f"u/{self.user}/out", {"id": msg_id, "to": group, "body": f"body of {msg_id}"})

    def close(self) -> None:
        self.peer.close()


def answered(answer: dict[str, Any] | None) -> dict[str, Any]:
    assert answer is not None and answer["ok"], answer
    return dict(answer["result"])


class Admin:
    """Adds and removes its churn users one after the other until its connection goes; keeps every request
    (op, user, answer or None) and the membership it asked for."""

    def __init__(self, device: Device, group: str, churn: list[str]) -> None:
        self.device, self.group, self.churn = device, group, churn
        self.wanted = {user: False for user in churn}  # a churn user starts outside the group
        self.requests: list[tuple[str, str, dict[str, Any] | None]] = []

    def change(self, user: str, tag: str) -> dict[str, Any] | None:
        op = "group.remove" if self.wanted[user] else "group.add"
        answer = self.device.request(f"{self.device.user}-{tag}", op, {"group": self.group, "members": [user]})
        self.requests.append((op, user, answer))
        if answer is not None:
            self.wanted[user] = op == "group.add"
        return answer

    def churn_until_gone(self) -> None:
        for n in range(10000):
            if self.change(self.churn[n % len(self.churn)], str(n)) is None:
                return

    def retry(self, device: Device) -> None:
        """After the restart: the request that got no answer, again (the same op and args)."""
        self.device = device
        op, user, answer = self.requests[-1]
        if answer is None:
            again = self.device.request(f"{device.user}-retry", op, {"group": self.group, "members": [user]})
            changed = answered(again)["added" if op == "group.add" else "removed"]
            assert changed in ([], [user]), again
            self.wanted[user] = op == "group.add"


def stream(device: Device, group: str, ids: list[str], attempted: list[str]) -> None:
    for msg_id in ids:
        attempted.append(msg_id)
        if not device.send(group, msg_id):
            return


def first_delivery(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items of one device with redeliveries of the same seq dropped (what was not acked before the kill)."""
    seen: set[int] = set()
    out = []
    for item in items:
        if item["seq"] not in seen:
            seen.add(item["seq"])
            out.append(item)
    return out


def identity(item: dict[str, Any]) -> tuple[Any, ...]:
    if item["kind"] == "msg":
        return ("msg", item["from"], item["id"])
    return ("event", item["event"], tuple(item.get("users", ())), item["by"])


def expected_gseqs(stream_of: dict[int, dict[str, Any]]) -> dict[str, set[int]]:
    """Who is to get each gseq, replaying the events in gseq order: a message goes to the members at its
    gseq but its sender; an event to the members after it and those it removed."""
    members: list[str] = []
    wants: dict[str, set[int]] = defaultdict(set)
    for gseq in sorted(stream_of):
        item = stream_of[gseq]
        if item["kind"] == "msg":
            targets = set(members) - {item["from"]}
        else:
            users = item.get("users", [])
            if item["event"] == "created":
                members = list(users)
            elif item["event"] == "member_added":
                members += [u for u in users if u not in members]
            elif item["event"] in ("member_removed", "member_left"):
                members = [u for u in members if u not in users]
            targets = set(members) | (set(users) if item["event"] in ("member_removed", "member_left") else set())
        for user in targets:
            wants[user].add(gseq)
    return wants


def test_sigkill_during_membership_changes(tmp_path: Path) -> None:
    log = Log()
    proc = BrokerProcess(tmp_path / "data", LIMITS)
    proc.add_users({u: f"{u}-pw" for u in USERS})
    proc.start()
    devices: dict[str, Device] = {}
    try:
        devices = {u: Device(proc.port, u, log) for u in USERS}
        owner = devices[OWNER]
        group = answered(owner.request("create", "group.create", {"name": "chaos", "members": [ADMIN, *STABLE]}))[
            "group"]
        answered(owner.request("promote", "group.admins", {"group": group, "add": [ADMIN]}))
        admins = [Admin(devices[a], group, CHURN[a]) for a in (OWNER, ADMIN)]
        ids = {s: [f"{s}-{n:04d}" for n in range(3000)] for s in SENDERS}
        attempted: dict[str, list[str]] = {s: [] for s in SENDERS}
        threads = [threading.Thread(target=a.churn_until_gone) for a in admins]
        threads += [threading.Thread(target=stream, args=(devices[s], group, ids[s], attempted[s])) for s in SENDERS]
        for thread in threads:
            thread.start()
        # Kill once changes and messages are both under way (each keeps going until its connection goes).
        eventually(lambda: log.count("group") >= 20 and log.count("msg") >= 100, timeout=PATIENCE_S,
                   what="changes and messages flowing")
        assert proc.proc is not None
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(10)
        with log.cond:
            before_kill = max(item["gseq"] for items in log.items.values() for item in items)
        for thread in threads:
            thread.join(PATIENCE_S)
            assert not thread.is_alive()
        for device in devices.values():
            device.close()

        proc = BrokerProcess(tmp_path / "data", LIMITS).start()
        devices = {u: Device(proc.port, u, log) for u in USERS}
        for admin in admins:
            admin.retry(devices[admin.device.user])
        for sender in SENDERS:  # the outbox: everything attempted without 'sent', in order, same ids
            with log.cond:
                missing = [m for m in attempted[sender] if m not in log.sent[sender]]
            for msg_id in missing:
                assert devices[sender].send(group, msg_id)
        for sender in SENDERS:
            eventually(functools.partial(lambda s: set(attempted[s]) <= log.sent[s], sender), timeout=PATIENCE_S,
                       what=f"'sent' for all of {sender}'s messages")
        end = answered(devices[OWNER].request("end", "group.rename", {"group": group, "name": "end"}))["gseq"]
        final = answered(devices[OWNER].request("info", "group.info", {"group": group}))["members"]
        assert set(final) == {OWNER, ADMIN, *STABLE} | {u for a in admins for u, on in a.wanted.items() if on}
        # The owner is a member all along and sends no message: its stream is every gseq up to the end.
        eventually(lambda: any(i.get("gseq") == end for i in log.items[OWNER]), timeout=PATIENCE_S,
                   what="the owner got the end")
        with log.cond:
            wants = expected_gseqs({i["gseq"]: i for i in log.items[OWNER]})
        for user in USERS:
            eventually(functools.partial(lambda u: wants[u] <= {i["gseq"] for i in log.items[u]}, user),
                       timeout=PATIENCE_S, what=f"{user}'s items")
        check_streams(log, admins, attempted, end, final, before_kill)
    finally:
        for device in devices.values():
            device.close()
        if proc.proc is not None and proc.proc.poll() is None:  # not the one killed (a failure before the restart)
            proc.stop()


def check_streams(log: Log, admins: list[Admin], attempted: dict[str, list[str]], end: int,
                  final: list[str], before_kill: int) -> None:
    with log.cond:
        firsts = {user: first_delivery(items) for user, items in log.items.items()}
    stream_of: dict[int, dict[str, Any]] = {}
    gseq_of: dict[tuple[str, str], int] = {}
    for user, items in firsts.items():
        gseqs = [item["gseq"] for item in items]
        assert gseqs == sorted(set(gseqs)), f"{user}: a gseq twice or out of order: {gseqs}"
        for item in items:
            known = stream_of.setdefault(item["gseq"], item)
            assert identity(known) == identity(item), f"gseq {item['gseq']}: {known} and {item}"
            if item["kind"] == "msg":
                assert gseq_of.setdefault((item["from"], item["id"]), item["gseq"]) == item["gseq"], item
    # A gseq nobody got: one taken in memory by a message the kill lost before its staging commit (never
    # 'sent'; its re-send takes a new one). Only above every gseq delivered before the kill: what was
    # delivered was committed, and so was every gseq below it.
    unused = set(range(1, end + 1)) - set(stream_of)
    assert all(gseq > before_kill for gseq in unused), f"gseqs {sorted(unused)} missing, {before_kill} delivered"
    assert set(gseq_of) == {(s, m) for s, ids in attempted.items() for m in ids}
    wants = expected_gseqs(stream_of)
    for user, items in firsts.items():
        got = {item["gseq"] for item in items}
        assert got == wants[user], f"{user}: missed {sorted(wants[user] - got)}, extra {sorted(got - wants[user])}"
    members_at_end = [u for u, gseqs in wants.items() if end in gseqs]
    assert sorted(members_at_end) == sorted(final)
    for admin in admins:  # an answered change is at its answered gseq, done by that admin
        for op, user, answer in admin.requests:
            if answer is None:
                continue
            result = answered(answer)
            event = stream_of[result["gseq"]]
            assert result["added" if op == "group.add" else "removed"] == [user], answer
            assert (event["event"], event["users"], event["by"]) == (
                "member_added" if op == "group.add" else "member_removed", [user], admin.device.user)
