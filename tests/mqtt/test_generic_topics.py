"""Generic topics beside chat: the operator's ACL (``mqtt.acl`` for users,
``mqtt.anonymous_acl`` for clients without user name, ``mqtt.allow_anonymous``),
with ``%u``/``%c`` patterns as in mosquitto's ACL file; see docs/MQTT.md.

- By default both are off: a CONNECT without user name gets 0x05 (section 3.1.3.4/3.1.3.5
  let a server require one; section 3.2.2.3) and no generic topic may be used.
- SUBSCRIBE is granted only for a filter inside a read rule (a wider filter, such as
  ``dev/#`` for a ``dev/%u/#`` rule, is refused with 0x80, section 3.9.3); a PUBLISH is
  routed only to a topic a write rule matches, and a refused one reaches nobody.
- Anonymous clients get only ``anonymous_acl`` topics, never ``u/...``, never a
  ``%u`` rule; a client id of the form ``user.device`` is refused to them with 0x02
  (section 3.2.2.3), so they cannot take over a chat device's session [MQTT-3.1.4-2].
- Chat topics keep the PROTOCOL.md rules under ``config/open-mqtt.yaml``: only one's own
  inbox, and chat traffic never reaches a generic wildcard subscription.
- Retained messages work on generic topics [MQTT-3.3.1-5, MQTT-3.3.1-6, MQTT-3.3.1-8].

Stock amqtt (default plugins) lets anyone connect, subscribe and publish anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from testkit.packets import RawClient, connect_packet, publish_packet, subscribe_packet
from tests.mqtt.conftest import Target

pytestmark = pytest.mark.filterwarnings("ignore:.*psutil.*:DeprecationWarning")  # stock amqtt's $SYS plugin

REFUSED = 0x80
ACL_CONFIG: dict[str, Any] = {
    "allow_anonymous": True,
    "acl": [
        {"topic": "dev/%u/#", "access": "readwrite"},
        {"topic": "news/#", "access": "read"},
        {"topic": "cid/%c/+", "access": "write"},
        {"topic": "cid/+/+", "access": "read"},
    ],
    "anonymous_acl": [
        {"topic": "open/#", "access": "readwrite"},
        {"topic": "news/#", "access": "write"},
        {"topic": "anon/%u/#", "access": "readwrite"},  # %u: never an anonymous client's
        {"topic": "cid/%c/#", "access": "readwrite"},
    ],
}


def subscribe(client: RawClient, packet_id: int, *filters: str) -> list[int]:
    first, *more = filters
    client.send(subscribe_packet(packet_id, first, 1, *((f, 1) for f in more)))
    return client.suback(packet_id)


def test_generic_topics_and_anonymous_are_off_by_default(launch: Callable[..., Target]) -> None:
    target = launch(mqtt={})
    anonymous = target.raw()
    anonymous.send(connect_packet("anon-1"))
    assert anonymous.connack() == 0x05
    assert anonymous.closed()  # [MQTT-3.2.2-5]
    alice = target.client("alice.phone", "alice")
    assert subscribe(alice, 1, "dev/alice/x", "#", "open/x") == [REFUSED] * 3


def test_acl_rules_with_user_and_client_patterns(launch: Callable[..., Target]) -> None:
    target = launch(mqtt=ACL_CONFIG)
    alice = target.client("alice.phone", "alice")
    assert subscribe(alice, 1, "dev/alice/#", "dev/alice/+/x", "news/+", "cid/+/+") == [1, 1, 1, 1]
    assert subscribe(alice, 2, "dev/bob/#", "dev/#", "dev/+/x", "#", "+/alice/#", "$SYS/#") == [REFUSED] * 6

    tablet = target.client("alice.tab", "alice")
    bob = target.client("bob.phone", "bob")
    anon = target.client("anon-news")

    # Each publisher's refused PUBLISH comes before an allowed one: a refused message
    # that got through would reach alice first (one publisher's messages keep their order).
    tablet.send_publish("cid/alice.phone/y", b"not the tablet's %c", qos=1)
    tablet.send_publish("dev/alice/t", b"tablet to dev/alice", qos=1, packet_id=2)
    got = alice.receive(1)[0]
    assert (got.topic, got.payload) == ("dev/alice/t", b"tablet to dev/alice")

    bob.send_publish("dev/alice/t", b"bob may not write dev/alice", qos=1)
    bob.send_publish("cid/bob.phone/x", b"bob's own %c", qos=1, packet_id=2)
    got = alice.receive(1)[0]
    assert (got.topic, got.payload) == ("cid/bob.phone/x", b"bob's own %c")

    alice.send(publish_packet("news/x", b"alice only reads news", qos=0))
    alice.send(publish_packet("cid/alice.phone/x", b"alice's own %c", qos=0))
    got = alice.receive(1)[0]
    assert (got.topic, got.payload) == ("cid/alice.phone/x", b"alice's own %c")

    anon.send_publish("news/today", b"anonymous may write news", qos=1)
    got = alice.receive(1)[0]
    assert (got.topic, got.payload) == ("news/today", b"anonymous may write news")


def test_anonymous_clients_get_generic_topics_only(launch: Callable[..., Target]) -> None:
    target = launch(mqtt=ACL_CONFIG)
    alice = target.client("alice.phone", "alice")
    assert subscribe(alice, 1, "u/alice/in") == [1]

    anon = target.client("anon-1")
    assert subscribe(anon, 1, "open/#", "cid/anon-1/#") == [1, 1]
    assert subscribe(anon, 2, "u/alice/in", "u/+/in", "u/#", "#", "dev/alice/#", "anon/#", "news/#") == [REFUSED] * 7

    # A chat device's client id, of a real user or not: 0x02, and alice keeps her session.
    for client_id in ("alice.phone", "nobody.phone"):
        thief = target.raw()
        thief.send(connect_packet(client_id, clean_session=False))
        assert thief.connack() == 0x02, client_id
        assert thief.closed()
    alice.ping()
    # A will anonymous clients could not publish themselves is refused at CONNECT.
    target.connect("anon-will", will=("u/alice/out", b"{}", 1, False), code=0x05)
    target.connect("anon-will", will=("open/will", b"{}", 1, False), code=0x00)

    # Retained messages on generic topics: kept, and sent to a new subscription.
    anon.send_publish("open/retained", b"kept for later", qos=1, retain=True)
    assert [(m.topic, m.retain) for m in anon.receive(1)] == [("open/retained", False)]  # [MQTT-3.3.1-9]
    late = target.client("anon-late")
    assert subscribe(late, 1, "open/+") == [1]
    got = late.receive(1)[0]
    assert (got.topic, got.payload, got.retain) == ("open/retained", b"kept for later", True)


def test_chat_topics_keep_their_rules_under_the_open_config(target: Target) -> None:
    alice = target.client("alice.phone", "alice")
    assert subscribe(alice, 1, "u/alice/in", "#", "+/bob/out") == [1, 1, 1]  # generic filters, open config
    assert subscribe(alice, 2, "u/bob/in", "u/+/in", "u/alice/out", "u/#") == [REFUSED] * 4
    bob = target.client("bob.phone", "bob")
    assert subscribe(bob, 1, "u/bob/in") == [1]

    message = {"id": "m1", "to": "alice", "body": "through the bridge only"}
    bob.send_publish("u/bob/out", json.dumps(message).encode(), qos=1)
    bob.send_publish("g/after", b"a generic message after it", qos=1, packet_id=2)
    seen: dict[str, bytes] = {}
    while not {"u/alice/in", "g/after"} <= seen.keys():
        got = alice.receive(1)[0]
        assert got.topic in ("u/alice/in", "g/after"), f"chat traffic on {got.topic!r} reached a generic filter"
        if got.topic == "u/alice/in" and json.loads(got.payload).get("kind") != "msg":
            continue
        seen[got.topic] = got.payload
    item = json.loads(seen["u/alice/in"])
    assert (item["from"], item["id"], item["body"]) == ("bob", "m1", "through the bridge only")
