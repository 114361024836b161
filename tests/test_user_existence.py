"""Which users exist is not secret from logged-in users, and every request says so the same
way (issue 14, item 9; docs/PROTOCOL.md "Which users exist"): each op that addresses a user
(``out``, ``seen``, ``keys.list``, ``keys.claim``) answers ``unknown_recipient`` for a user id
that does not exist, and never for a user who exists but has never logged in. Presence requests
answer about presence only: an unknown user looks exactly like a user who hides it."""

from __future__ import annotations

import json
import uuid
from typing import Any

from tests.helpers import WAIT_S, BrokerThread, Peer, online_peer

DEPLOYMENTS = ("single", "cluster", "amqtt-path")  # tests/conftest.py: each broker test runs on each

GHOST, NEWCOMER = "ghost", "carol"  # carol exists but has no device and no keys



def out(peer: Peer, to: str) -> list[dict[str, Any]]:
    """Send a message; the items up to its answer (``sent`` or an error naming it). Uplinks of one
    device to ``out`` and ``seen`` are handled in order, so this is also a barrier for a ``seen``."""
    msg_id = uuid.uuid4().hex[:8]
    peer.publish(f"u/{peer.user}/out", {"id": msg_id, "to": to, "body": "hi"})
    got: list[dict[str, Any]] = []
    while True:
        _topic, payload, _ = peer.messages.get(timeout=WAIT_S)
        item = json.loads(payload)
        got.append(item)
        if item.get("ref") == msg_id or (item.get("status") == "sent" and msg_id in item.get("ids", [])):
            return got


def answer(peer: Peer, op: str, user: str) -> str:
    """The error code the op gets for ``user``, or ``ok``."""
    if op in ("keys.list", "keys.claim"):
        res = peer.request(op, {"user": user})
        return "ok" if res["ok"] else str(res["error"]["code"])
    if op == "seen":
        peer.publish(f"u/{peer.user}/seen", {"to": user, "ids": ["m1"]})
        got = out(peer, NEWCOMER)[:-1]  # the barrier's own 'sent' is not the answer
    else:
        got = out(peer, user)
    errors = [i for i in got if i.get("kind") == "error"]
    return str(errors[0]["code"]) if errors else "ok"


def test_every_op_that_addresses_a_user_says_the_same_thing(broker: BrokerThread, peers: list[Peer]) -> None:
    broker.add_user(NEWCOMER, "carol-pw")
    alice = online_peer(broker.port, peers, "alice")
    ops = ("out", "seen", "keys.list", "keys.claim")
    assert {op: answer(alice, op, GHOST) for op in ops} == dict.fromkeys(ops, "unknown_recipient")
    assert {op: answer(alice, op, NEWCOMER) for op in ops} == dict.fromkeys(ops, "ok")
    # Past the claim limit (20 at once) too: a user who does not exist is never 'rate_limited'.
    assert {answer(alice, "keys.claim", GHOST) for _ in range(25)} == {"unknown_recipient"}


def test_presence_answers_do_not_tell_whether_a_user_exists(broker: BrokerThread, peers: list[Peer]) -> None:
    broker.add_user(NEWCOMER, "carol-pw")
    alice = online_peer(broker.port, peers, "alice")
    for op in ("contacts.add", "contacts.remove"):
        assert alice.request(op, {"users": [GHOST, NEWCOMER]})["ok"] is True
    hidden = {"online": None, "last_seen": None}
    for op in ("presence.get", "presence.subscribe"):
        res = alice.request(op, {"users": [GHOST, NEWCOMER]})
        assert res["result"]["users"] == {GHOST: hidden, NEWCOMER: hidden}, res
