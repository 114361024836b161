"""The topic ACL (PROTOCOL.md "Topics") through the real broker, with paho clients.

Proves: a device may subscribe to its own inbox only (granted QoS 1; anything
else, wildcards and ``$SYS`` included, gets SUBACK 0x80 and is not registered);
publishes on the five uplinks are taken, any other publish is answered with an
``error`` item ``forbidden`` to the publishing device and reaches nobody;
nothing is retained on any topic; a will is allowed only on one of the
user's own uplinks.

Ordering barrier used throughout: a device's publishes are handled in order, and
a refusal is answered at once, so when the answer to a later ``ping`` request
arrives every earlier item for that device has arrived too.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.helpers import BrokerThread, Peer, connack_code

SUBACK_FAILURE = 0x80
DEPLOYMENTS = ("single", "amqtt-path")  # tests/conftest.py: the lean path, and amqtt's
PAHO_NOT_AUTHORIZED = 135  # CONNACK 0x05 as paho 2.x reports it (see test_auth.py)
MARKER = "acl-marker-7f3a"  # in every payload that must not reach anyone

FORBIDDEN_FILTERS = [
    "u/bob/in", "#", "u/+/in", "u/alice/#", "$SYS/#", "u/alice/out", "other/topic",
    "u/alice/+", "+/alice/in", "u/#", "u/alice/in/#", "u/Alice/in", "$SYS/broker/uptime",
]
FORBIDDEN_TOPICS = [
    "u/bob/out", "u/bob/req", "u/alice/in", "u/bob/in", "u/alice/bogus", "u/alice/out/x", "u/alice",
    "u/alice/", "u//out", "other/x", "$SYS/x", "alice/out",
]


def connected(port: int, peers: list[Peer], user: str, device: str = "phone", subscribe: bool = True) -> Peer:
    peer = Peer(port, user, f"{user}-pw", device=device)
    peers.append(peer)
    assert peer.connect() == 0
    if subscribe:
        assert peer.subscribe() == [1]
    return peer


def items_until_ping(peer: Peer) -> list[dict[str, Any]]:
    """Everything that arrives for ``peer`` before the answer to a new ping (the barrier)."""
    rid = f"barrier-{uuid.uuid4().hex[:12]}"
    peer.publish(f"u/{peer.user}/req", {"rid": rid, "op": "ping"})
    seen: list[dict[str, Any]] = []
    while True:
        topic, payload, retained = peer.messages.get(timeout=10)
        assert topic == f"u/{peer.user}/in", f"{peer.client_id} got a message on {topic!r}"
        assert not retained, f"{peer.client_id} got a retained message: {payload!r}"
        item = json.loads(payload)
        if item.get("kind") == "res" and item.get("rid") == rid:
            assert item["ok"] is True
            return seen
        seen.append(item)


async def _subscription_filters(broker: BrokerThread) -> list[str]:
    chat = broker.app.broker  # amqtt's subscriptions, and the inboxes of lean sessions (broker/chat_session.py)
    lean = [session._inbox.decode() for session in chat.lean._live.values() if session._inbox] if chat.lean else []
    return sorted([*chat._subscriptions, *lean])


async def _retained_topics(broker: BrokerThread) -> list[str]:
    return sorted(broker.app.broker._retained_messages)


# --- subscribe ---------------------------------------------------------------------


def test_subscribe_own_inbox_is_granted_qos1(broker: BrokerThread, peers: list[Peer]) -> None:
    alice = connected(broker.port, peers, "alice", subscribe=False)
    assert alice.subscribe("u/alice/in") == [1]
    assert items_until_ping(alice) == []


def test_subscribe_anything_else_is_refused(broker: BrokerThread, peers: list[Peer]) -> None:
    alice = connected(broker.port, peers, "alice", subscribe=False)
    for topic_filter in FORBIDDEN_FILTERS:
        assert alice.subscribe(topic_filter) == [SUBACK_FAILURE], topic_filter
    # One SUBSCRIBE with several filters gets one code per filter, in order.
    alice.client.subscribe([("u/bob/in", 1), ("u/alice/in", 1), ("#", 1)])
    assert alice.subacks.get(timeout=10) == [SUBACK_FAILURE, 1, SUBACK_FAILURE]
    # Refused filters are not registered at all; the inbox works.
    assert broker.call(_subscription_filters(broker)) == ["u/alice/in"]
    assert items_until_ping(alice) == []


# --- publish -------------------------------------------------------------------------


def test_publishes_on_the_five_uplinks_are_taken(broker: BrokerThread, peers: list[Peer]) -> None:
    alice = connected(broker.port, peers, "alice")
    bob = connected(broker.port, peers, "bob")
    uplinks: dict[str, dict[str, Any]] = {
        "out": {"id": "acl-m1", "to": "bob", "body": "hello", "type": "text"},
        "ack": {"seqs": [1]},
        "seen": {"to": "bob", "ids": ["acl-m0"]},
        "hb": {},
        "req": {"rid": "acl-r1", "op": "ping"},
    }
    for kind, payload in uplinks.items():
        alice.publish(f"u/alice/{kind}", payload)
    answers = items_until_ping(alice)
    assert not [item for item in answers if item.get("code") == "forbidden"], answers
    pong = [item for item in answers if item.get("kind") == "res" and item.get("rid") == "acl-r1"]
    assert len(pong) == 1 and pong[0]["ok"] is True
    # Whatever bob gets (a message, later) it is nothing about forbidden topics.
    assert all(item.get("code") != "forbidden" for item in items_until_ping(bob))


def test_publish_elsewhere_is_answered_with_forbidden_and_reaches_nobody(
    broker: BrokerThread, peers: list[Peer]
) -> None:
    alice = connected(broker.port, peers, "alice")
    tablet = connected(broker.port, peers, "alice", device="tablet")
    bob = connected(broker.port, peers, "bob")
    for topic in FORBIDDEN_TOPICS:
        alice.publish(topic, {"id": "acl-x", "to": "bob", "body": MARKER})
        item = alice.items(timeout=10)  # the very next item for alice is the answer
        assert item["kind"] == "error" and item["code"] == "forbidden", (topic, item)
        assert topic in item["detail"], item
        assert MARKER not in json.dumps(item)
    assert items_until_ping(alice) == []
    assert items_until_ping(tablet) == [], "an error went to a device that did not publish"
    assert items_until_ping(bob) == [], "a forbidden publish reached bob"


def test_nothing_is_retained(broker: BrokerThread, peers: list[Peer]) -> None:
    alice = connected(broker.port, peers, "alice")
    alice.publish("u/alice/req", {"rid": "acl-retained", "op": "ping"}, retain=True)
    alice.publish("u/alice/hb", {}, retain=True)
    alice.publish("u/alice/in", {"kind": "msg", "body": MARKER}, retain=True)
    alice.publish("other/x", {"body": MARKER}, retain=True)
    answers = items_until_ping(alice)
    assert [item["rid"] for item in answers if item.get("kind") == "res"] == ["acl-retained"]
    assert len([item for item in answers if item.get("code") == "forbidden"]) == 2
    assert broker.call(_retained_topics(broker)) == []

    # Later subscribers of alice's inbox (and of bob's) get nothing retained.
    tablet = connected(broker.port, peers, "alice", device="tablet")
    bob = connected(broker.port, peers, "bob")
    assert items_until_ping(tablet) == []
    assert items_until_ping(bob) == []


# --- wills ---------------------------------------------------------------------------


def _refused_will_login(port: int, topic: str) -> int:
    """CONNECT as alice.willy with a will on ``topic``; returns paho's CONNACK code.

    paho's loop runs in this thread: a refused ``Peer`` would sit in paho's
    reconnect wait for up to a second when closed.
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="alice.willy")
    client.username_pw_set("alice", "alice-pw")
    client.will_set(topic, json.dumps({"body": MARKER}), qos=1)
    return connack_code(client, port)


@pytest.mark.parametrize("topic", ["u/bob/in", "u/bob/hb", "u/alice/in", "u/alice/bogus", "other/topic"])
def test_will_on_a_foreign_topic_is_refused(broker: BrokerThread, peers: list[Peer], topic: str) -> None:
    victim = connected(broker.port, peers, "alice", device="willy")  # same client id, already connected
    assert _refused_will_login(broker.port, topic) == PAHO_NOT_AUTHORIZED
    assert not victim.disconnected.is_set()
    assert items_until_ping(victim) == []


def test_will_on_an_own_uplink_is_accepted(broker: BrokerThread, peers: list[Peer]) -> None:
    peer = Peer(broker.port, "alice", "alice-pw", device="willy")
    peers.append(peer)
    peer.client.will_set("u/alice/hb", json.dumps({"state": "away"}), qos=1)
    assert peer.connect() == 0
    assert peer.subscribe() == [1]
    assert items_until_ping(peer) == []
