"""Presence through the real broker, as raw MQTT clients see it (PROTOCOL.md, "Presence").

Proves, over real sockets: a heartbeat makes a user online; away, the window
running out, a clean disconnect and a silently dropped connection (keepalive
timeout, with a late will) each end it with ``last_seen`` = the last heartbeat;
a background connection shows offline; ``last_seen``, privacy settings and
contacts survive a broker restart (written on shutdown, and in batches while
running); the privacy rules hold for every combination; nothing a user can
request reveals a hidden ``last_seen`` or whether a user exists; watchers get
coalesced items only while connected; bad requests and limits are refused.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.packets import RawClient, connect_packet, subscribe_packet
from tests.helpers import WAIT_S, BrokerThread, Peer, eventually

DEPLOYMENTS = ("single", "cluster", "amqtt-path")  # tests/conftest.py: each broker test runs on each

USERS = ("alice", "bob", "carol", "mallory")
FAST = {"presence.coalesce_ms": 100}  # most tests look at two changes in a row


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., BrokerThread]]:
    """start(**overrides) -> a running broker (users alice, bob, carol, mallory); stopped afterwards."""
    running: list[BrokerThread] = []

    def factory(add_users: bool = True, **overrides: Any) -> BrokerThread:
        broker = BrokerThread(tmp_path / "data", {**FAST, **overrides}).start()
        running.append(broker)
        if add_users:
            broker.add_users({name: f"{name}-pw" for name in USERS})
        return broker

    yield factory
    for broker in running:
        if broker.loop.is_running():
            broker.stop()



def online(broker: BrokerThread, made: list[Any], user: str, device: str = "phone") -> Peer:
    peer = Peer(broker.port, user, f"{user}-pw", device=device)
    made.append(peer)
    assert peer.connect() == 0
    assert peer.subscribe() == [1]
    return peer


def ok(peer: Peer, op: str, args: dict[str, Any] | None = None) -> Any:
    res = peer.request(op, args)
    assert res["ok"] is True, res
    return res["result"]


def failed(peer: Peer, op: str, args: dict[str, Any] | None = None) -> str:
    res = peer.request(op, args)
    assert res["ok"] is False, res
    return str(res["error"]["code"])


def beat(peer: Peer, away: bool = False) -> None:
    """A heartbeat, and a ping behind it on the same connection: when this returns, the server has handled it."""
    peer.publish(f"u/{peer.user}/hb", {"state": "away"} if away else {})
    ok(peer, "ping")


def view(peer: Peer, user: str) -> dict[str, Any]:
    return dict(ok(peer, "presence.get", {"users": [user]})["users"][user])


def presence(user: str, online: bool | None) -> Callable[[dict[str, Any]], bool]:
    return lambda i: i.get("kind") == "presence" and i.get("user") == user and i.get("online") is online


def watch(peer: Peer, *users: str) -> dict[str, Any]:
    return dict(ok(peer, "presence.subscribe", {"users": list(users)})["users"])


def items_until_ping(peer: Peer) -> list[dict[str, Any]]:
    """Everything that arrives for ``peer`` before the answer to a new ping (a barrier)."""
    rid = f"barrier-{uuid.uuid4().hex[:12]}"
    peer.publish(f"u/{peer.user}/req", {"rid": rid, "op": "ping"})
    seen: list[dict[str, Any]] = []
    while True:
        _topic, payload, _ = peer.messages.get(timeout=WAIT_S)
        item = json.loads(payload)
        if item.get("kind") == "res" and item.get("rid") == rid:
            return seen
        seen.append(item)


def everyone(*peers: Peer) -> None:
    for peer in peers:
        ok(peer, "privacy.set", {"last_seen": "everyone"})



# --- online and offline ----------------------------------------------------------------------


def test_online_after_a_heartbeat_offline_after_away(start: Callable[..., BrokerThread], made: list[Any]) -> None:
    broker = start()
    alice, bob = online(broker, made, "alice"), online(broker, made, "bob")
    everyone(alice, bob)
    assert watch(bob, "alice") == {"alice": {"online": False, "last_seen": None}}
    before = int(time.time() * 1000)
    beat(alice)
    item = bob.expect(presence("alice", True))
    assert before - 50 <= item["last_seen"] <= int(time.time() * 1000) + 50
    assert view(bob, "alice") == {"online": True, "last_seen": item["last_seen"]}
    assert view(alice, "alice") == {"online": True, "last_seen": item["last_seen"]}, "her own view"
    beat(alice, away=True)
    gone = bob.expect(presence("alice", False))
    assert gone["last_seen"] >= item["last_seen"], "away is a heartbeat: last_seen is its time"
    assert view(bob, "alice") == {"online": False, "last_seen": gone["last_seen"]}


def test_offline_when_the_window_runs_out(start: Callable[..., BrokerThread], made: list[Any]) -> None:
    broker = start(**{"presence.online_window_s": 1})
    alice, bob = online(broker, made, "alice"), online(broker, made, "bob")
    everyone(alice, bob)
    watch(bob, "alice")
    sent = time.monotonic()
    beat(alice)
    came = bob.expect(presence("alice", True))
    gone = bob.expect(presence("alice", False), timeout=5)
    assert time.monotonic() - sent >= 0.99, "not before the window of 1 s"
    assert gone["last_seen"] == came["last_seen"], "last_seen is the heartbeat, not the expiry"


def test_offline_after_a_clean_disconnect(start: Callable[..., BrokerThread], made: list[Any]) -> None:
    broker = start()  # window 30 s: only the disconnect can end it within the test
    alice, bob = online(broker, made, "alice"), online(broker, made, "bob")
    everyone(alice, bob)
    watch(bob, "alice")
    beat(alice)
    came = bob.expect(presence("alice", True))
    alice.close()
    gone = bob.expect(presence("alice", False), timeout=5)
    assert gone["last_seen"] == came["last_seen"]


def test_offline_after_a_silently_dropped_connection(start: Callable[..., BrokerThread], made: list[Any]) -> None:
    """A half-open connection: the phone stops sending (no FIN), the broker's keepalive check
    drops it after 1.5 x keepalive and publishes its will ``{"state":"away"}``; alice goes
    offline then, with last_seen = her heartbeat (the late will does not move it)."""
    broker = start()  # window 30 s: only the keepalive can end it within the test
    alice, bob = online(broker, made, "alice"), online(broker, made, "bob")
    everyone(alice, bob)
    alice.close()
    watch(bob, "alice")
    raw = RawClient(broker.port)
    made.append(raw)
    raw.send(connect_packet("alice.raw", "alice", "alice-pw", keepalive=1,
                            will=("u/alice/hb", b'{"state":"away"}', 1, False)))
    assert raw.connack() == 0
    raw.send(subscribe_packet(1, "u/alice/in"))
    assert raw.suback(1) == [1]
    raw.send_publish("u/alice/hb", b"{}", 1, packet_id=2)
    silent = time.monotonic()  # from here on the raw client sends nothing, and reads nothing
    came = bob.expect(presence("alice", True))
    gone = bob.expect(presence("alice", False), timeout=10)
    assert time.monotonic() - silent >= 1.0, "dropped before 1.5 x keepalive"
    assert gone["last_seen"] == came["last_seen"]
    assert raw.closed_within(5.0)
    assert view(bob, "alice") == {"online": False, "last_seen": came["last_seen"]}


def test_a_background_connection_alone_shows_offline(start: Callable[..., BrokerThread], made: list[Any]) -> None:
    broker = start()
    alice, bob = online(broker, made, "alice"), online(broker, made, "bob")
    laptop = online(broker, made, "alice", "laptop")
    everyone(alice, bob)
    watch(bob, "alice")
    beat(laptop, away=True)  # an app going to the background without ever being in the foreground
    assert view(bob, "alice") == {"online": False, "last_seen": None}
    assert [i for i in items_until_ping(bob) if i["kind"] == "presence"] == []


def test_online_until_the_last_foreground_device_goes(start: Callable[..., BrokerThread], made: list[Any]) -> None:
    broker = start()
    phone, bob = online(broker, made, "alice"), online(broker, made, "bob")
    laptop = online(broker, made, "alice", "laptop")
    tablet = online(broker, made, "alice", "tablet")  # connected, in the background
    everyone(phone, bob)
    watch(bob, "alice")
    beat(phone)
    bob.expect(presence("alice", True))
    beat(laptop)
    phone.close()
    eventually(lambda: not linked(broker, "alice.phone"), what="the phone's disconnect handled")
    assert view(bob, "alice")["online"] is True, "the laptop is still in the foreground"
    laptop.close()
    gone = bob.expect(presence("alice", False), timeout=5)
    assert tablet.request("ping")["ok"] is True
    assert view(bob, "alice") == {"online": False, "last_seen": gone["last_seen"]}


# --- persistence ---------------------------------------------------------------------------------


def test_last_seen_privacy_and_contacts_survive_a_restart(start: Callable[..., BrokerThread],
                                                          made: list[Any]) -> None:
    first = start(**{"presence.persist_s": 3600})  # only the shutdown writes last_seen
    alice, bob = online(first, made, "alice"), online(first, made, "bob")
    ok(alice, "contacts.add", {"users": ["bob"]})
    ok(bob, "contacts.add", {"users": ["alice"]})
    ok(carol := online(first, made, "carol"), "privacy.set", {"last_seen": "nobody"})
    beat(alice)
    seen = view(bob, "alice")
    assert seen["online"] is True
    for peer in (alice, bob, carol):
        peer.close()
    first.stop()

    second = start(add_users=False)
    bob = online(second, made, "bob")
    assert view(bob, "alice") == {"online": False, "last_seen": seen["last_seen"]}
    assert ok(bob, "privacy.get") == {"last_seen": "contacts", "contacts": ["alice"]}
    carol = online(second, made, "carol")
    assert ok(carol, "privacy.get") == {"last_seen": "nobody", "contacts": []}


def test_last_seen_is_written_in_batches_while_running(start: Callable[..., BrokerThread], made: list[Any],
                                                       tmp_path: Path) -> None:
    broker = start(**{"presence.persist_s": 0.2})
    alice = online(broker, made, "alice")
    for _ in range(20):
        alice.publish("u/alice/hb", {})
    beat(alice)
    stamp = view(alice, "alice")["last_seen"]

    def stored() -> int | None:
        db = sqlite3.connect(f"file:{tmp_path / 'data' / 'presence.db'}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT ms FROM last_seen WHERE user = 'alice'").fetchone()
        finally:
            db.close()
        return None if row is None else int(row[0])

    eventually(lambda: stored() == stamp, what="alice's last_seen on disk")
    stats = broker.call(_stats(broker))
    assert stats["rows_written"] <= stats["batches_written"], "one row per user and batch, not per heartbeat"


async def _stats(broker: BrokerThread) -> dict[str, int]:
    return broker.app.presence.stats()


async def _linked(broker: BrokerThread, client_id: str) -> bool:
    return broker.app.broker.bridge.links.get(client_id) is not None


def linked(broker: BrokerThread, client_id: str) -> bool:
    return broker.call(_linked(broker, client_id))


# --- privacy -----------------------------------------------------------------------------------------

# (owner olga's rule for viewer vic, vic's rule for olga) -> what vic is shown of online olga.
# "in": the other user is in the list; "out": not. Written out from PROTOCOL.md, not computed.
WIRE_TABLE = [
    (("everyone", "out"), ("everyone", "out"), "full"),
    (("everyone", "out"), ("contacts", "in"), "full"),
    (("everyone", "out"), ("contacts", "out"), "online only"),
    (("everyone", "in"), ("nobody", "in"), "online only"),
    (("contacts", "in"), ("everyone", "out"), "full"),
    (("contacts", "in"), ("contacts", "in"), "full"),
    (("contacts", "in"), ("contacts", "out"), "online only"),
    (("contacts", "in"), ("nobody", "out"), "online only"),
    (("contacts", "out"), ("everyone", "in"), "hidden"),
    (("contacts", "out"), ("contacts", "in"), "hidden"),
    (("nobody", "in"), ("everyone", "in"), "hidden"),
    (("nobody", "out"), ("nobody", "out"), "hidden"),
]


def _rule(peer: Peer, other: str, setting: str, listed: str) -> None:
    ok(peer, "privacy.set", {"last_seen": setting})
    ok(peer, "contacts.add" if listed == "in" else "contacts.remove", {"users": [other]})


def test_every_privacy_combination_over_the_wire(start: Callable[..., BrokerThread], made: list[Any]) -> None:
    broker = start()
    olga, vic = online(broker, made, "alice"), online(broker, made, "bob")  # olga = alice, vic = bob
    beat(olga)
    stamp = view(olga, "alice")["last_seen"]
    shown = {"full": {"online": True, "last_seen": stamp}, "online only": {"online": True, "last_seen": None},
             "hidden": {"online": None, "last_seen": None}}
    for owner_rule, viewer_rule, expected in WIRE_TABLE:
        _rule(olga, "bob", *owner_rule)
        _rule(vic, "alice", *viewer_rule)
        case = f"owner {owner_rule}, viewer {viewer_rule}"
        assert view(vic, "alice") == shown[expected], case
        assert watch(vic, "alice") == {"alice": shown[expected]}, case
    assert view(olga, "alice") == shown["full"], "a user always sees themself"


def test_a_hidden_last_seen_cannot_be_learned_by_any_request(start: Callable[..., BrokerThread],
                                                             made: list[Any]) -> None:
    broker = start()
    alice, mallory = online(broker, made, "alice"), online(broker, made, "mallory")
    ok(alice, "privacy.set", {"last_seen": "nobody"})
    ok(alice, "contacts.add", {"users": ["mallory"]})  # "nobody" means nobody, contacts or not
    beat(alice)
    hidden = {"online": None, "last_seen": None}
    unknown = ["zoe", "nosuchuser"]
    # Whatever mallory does to her own side, alice stays hidden, exactly like users that do not exist.
    for setting in ("everyone", "contacts", "nobody"):
        ok(mallory, "privacy.set", {"last_seen": setting})
        ok(mallory, "contacts.add", {"users": ["alice", *unknown]})
        got = ok(mallory, "presence.get", {"users": ["alice", *unknown]})["users"]
        assert got == {"alice": hidden, "zoe": hidden, "nosuchuser": hidden}
        assert watch(mallory, "alice", *unknown) == got
    assert ok(mallory, "privacy.get")["contacts"] == ["alice", "nosuchuser", "zoe"], "only her own list"
    beat(alice, away=True)
    beat(alice)
    alice.close()
    assert [i for i in items_until_ping(mallory) if i["kind"] == "presence"] == [], "no items for a hidden user"
    assert view(mallory, "alice") == hidden


def test_reciprocity_hides_last_seen_in_answers_and_items(start: Callable[..., BrokerThread],
                                                          made: list[Any]) -> None:
    broker = start()
    alice, mallory = online(broker, made, "alice"), online(broker, made, "mallory")
    ok(alice, "privacy.set", {"last_seen": "everyone"})
    ok(mallory, "privacy.set", {"last_seen": "nobody"})  # mallory hides hers, so she gets none
    assert watch(mallory, "alice") == {"alice": {"online": False, "last_seen": None}}
    beat(alice)
    assert mallory.expect(presence("alice", True))["last_seen"] is None
    beat(alice, away=True)
    assert mallory.expect(presence("alice", False))["last_seen"] is None
    assert view(mallory, "alice") == {"online": False, "last_seen": None}
    ok(mallory, "privacy.set", {"last_seen": "everyone"})  # she shows hers again: she sees alice's
    item = mallory.expect(lambda i: i.get("kind") == "presence")
    assert item["online"] is False and isinstance(item["last_seen"], int)


def test_a_privacy_change_reaches_a_watcher(start: Callable[..., BrokerThread], made: list[Any]) -> None:
    broker = start()
    alice, bob = online(broker, made, "alice"), online(broker, made, "bob")
    everyone(alice, bob)
    watch(bob, "alice")
    beat(alice)
    bob.expect(presence("alice", True))
    ok(alice, "privacy.set", {"last_seen": "nobody"})
    assert bob.expect(lambda i: i.get("kind") == "presence") == {
        "kind": "presence", "user": "alice", "online": None, "last_seen": None}
    beat(alice, away=True)
    assert [i for i in items_until_ping(bob) if i["kind"] == "presence"] == []


# --- watchers --------------------------------------------------------------------------------


def test_flapping_is_coalesced(start: Callable[..., BrokerThread], made: list[Any]) -> None:
    broker = start(**{"presence.coalesce_ms": 1000})
    alice, bob = online(broker, made, "alice"), online(broker, made, "bob")
    everyone(alice, bob)
    watch(bob, "alice")
    began = time.monotonic()
    for i in range(10):  # online, away, online, ... ending away
        alice.publish("u/alice/hb", {"state": "away"} if i % 2 else {})
    ok(alice, "ping")
    took = time.monotonic() - began
    final = view(alice, "alice")
    assert final["online"] is False
    got: list[dict[str, Any]] = []
    while not got or {k: got[-1][k] for k in ("online", "last_seen")} != final:
        item = bob.items(timeout=5)  # the final state arrives within the coalescing time
        if item["kind"] == "presence":
            got.append(item)
    got += [i for i in items_until_ping(bob) if i["kind"] == "presence"]
    assert got[0]["online"] is True, "the first change goes at once"
    assert len(got) <= 1 + math.ceil(took) + 1, f"{len(got)} items for 10 changes in {took:.2f}s"


def test_a_watch_list_ends_with_the_connection(start: Callable[..., BrokerThread], made: list[Any]) -> None:
    broker = start()
    alice, bob = online(broker, made, "alice"), online(broker, made, "bob")
    everyone(alice, bob)
    watch(bob, "alice")
    bob.close()
    eventually(lambda: not linked(broker, "bob.phone"), what="bob's disconnect handled")
    bob = online(broker, made, "bob")  # the same device again: a new connection
    beat(alice)
    assert [i for i in items_until_ping(bob) if i["kind"] == "presence"] == []
    assert watch(bob, "alice") == {"alice": {"online": True, "last_seen": view(alice, "alice")["last_seen"]}}
    ok(bob, "presence.unsubscribe", {"users": ["alice"]})
    beat(alice, away=True)
    assert [i for i in items_until_ping(bob) if i["kind"] == "presence"] == []


def test_a_watch_list_ends_with_a_connection_taken_over(start: Callable[..., BrokerThread],
                                                        made: list[Any]) -> None:
    """The same device connects again while its old connection is still open (a phone that
    switched networks): the new connection takes over and starts with no watch list."""
    broker = start()
    alice, bob = online(broker, made, "alice"), online(broker, made, "bob")
    everyone(alice, bob)
    watch(bob, "alice")
    again = online(broker, made, "bob")  # takes over bob.phone; the old connection is closed by the broker
    beat(alice)
    assert [i for i in items_until_ping(again) if i["kind"] == "presence"] == []


def test_bad_presence_requests_and_limits(start: Callable[..., BrokerThread], made: list[Any]) -> None:
    broker = start(**{"presence.max_watched": 2, "presence.max_contacts": 2})
    alice = online(broker, made, "alice")
    for op in ("presence.get", "presence.subscribe", "presence.unsubscribe", "contacts.add", "contacts.remove"):
        assert failed(alice, op, {}) == "bad_envelope"
        assert failed(alice, op, {"users": []}) == "bad_envelope"
        assert failed(alice, op, {"users": ["Bob"]}) == "bad_envelope"
        assert failed(alice, op, {"users": [f"u{i}" for i in range(257)]}) == "bad_envelope"
        assert failed(alice, op, {"users": ["bob"], "more": 1}) == "bad_envelope"
    assert failed(alice, "privacy.set", {"last_seen": "friends"}) == "bad_envelope"
    assert failed(alice, "privacy.get", {"x": 1}) == "bad_envelope"
    assert ok(alice, "presence.get", {"users": [f"u{i}" for i in range(256)]})["users"]["u255"] == {
        "online": None, "last_seen": None}
    watch(alice, "bob", "carol", "bob")
    assert failed(alice, "presence.subscribe", {"users": ["mallory"]}) == "too_large"
    assert ok(alice, "contacts.add", {"users": ["bob", "carol", "alice"]}) == {"contacts": 2}
    assert failed(alice, "contacts.add", {"users": ["mallory"]}) == "too_large"
    assert ok(alice, "contacts.remove", {"users": ["carol", "zoe"]}) == {"contacts": 1}
    for payload in (b'{"state":"gone"}', b'{"away":true}', b"[]", b"not json"):
        alice.publish("u/alice/hb", payload)
        assert alice.expect(lambda i: i.get("kind") == "error")["code"] in {"bad_envelope", "bad_json"}
    assert [i for i in items_until_ping(alice) if i["kind"] == "error"] == []


def test_a_repeated_subscribe_changes_nothing_but_its_suback(start: Callable[..., BrokerThread],
                                                             made: list[Any]) -> None:
    """Paho (Android, clean session off) subscribes again in ``connectComplete`` after every connect,
    and apps when they come to the foreground: on a resumed session, with items unacked and a watch
    list, each repeat on the same connection gets its SUBACK and changes nothing else (no item sent
    again, the watch list and the foreground kept)."""
    broker = start()
    bob = online(broker, made, "bob")
    alice = Peer(broker.port, "alice", "alice-pw", clean_session=False)
    made.append(alice)
    assert alice.connect() == 0
    assert alice.subscribe() == [1]
    everyone(alice, bob)
    alice.close()
    eventually(lambda: not linked(broker, "alice.phone"), what="alice's disconnect handled")
    alice = Peer(broker.port, "alice", "alice-pw", clean_session=False)  # the session resumes, inbox and all
    made.append(alice)
    assert alice.connect() == 0
    eventually(lambda: linked(broker, "alice.phone"), what="the resumed session linked")
    for index in range(3):  # staged for alice, left unacked by her
        bob.publish("u/bob/out", {"id": f"m{index}", "to": "alice", "body": "hi"})
    assert sorted(alice.expect(lambda i: i.get("kind") == "msg")["id"] for _ in range(3)) == ["m0", "m1", "m2"]
    watch(alice, "bob")
    beat(alice)
    watch(bob, "alice")
    assert view(bob, "alice")["online"] is True
    for _ in range(2):
        assert alice.subscribe() == [1]
        assert [i for i in items_until_ping(alice) if i["kind"] == "msg"] == [], "unacked items sent again"
    assert view(bob, "alice")["online"] is True, "a repeated SUBSCRIBE took alice out of the foreground"
    beat(bob)
    alice.expect(presence("bob", True))  # her watch list still holds
