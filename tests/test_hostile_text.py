"""Text that cannot be UTF-8 (lone surrogates, valid as JSON escapes) is refused at the edge.

``{"id":"e1","to":"bob","body":"\\ud800"}`` to an offline bob once made the staging
commit raise ``UnicodeEncodeError``: the flush task died, no later message got ``sent``
and what was sent after it was gone after a restart. Every string field of every
uplink kind is tried here over a real socket: each gets ``bad_json`` (with ``ref`` where
the id is readable), nothing is staged, and a valid message right after is delivered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import BrokerThread, Peer, eventually, online_peer, register_offline

S = "\\ud800"  # a lone surrogate as the JSON escape a client sends (not encodable as UTF-8)
LOW = "\\udc80"

# (kind, payload, ref): every string field of every uplink, keys included.
CASES: list[tuple[str, str, str | None]] = [
    ("out", f'{{"id":"m1","to":"bob","body":"hi {S}"}}', "m1"),
    ("out", f'{{"id":"m1","to":"bob","body":"{LOW}"}}', "m1"),
    ("out", f'{{"id":"m{S}","to":"bob","body":"hi"}}', None),
    ("out", f'{{"id":"m1","to":"b{S}","body":"hi"}}', "m1"),
    ("out", f'{{"id":"m1","to":"bob","body":"hi","type":"t{S}"}}', "m1"),
    ("out", f'{{"id":"m1","to":"bob","body":"hi","{S}":1}}', "m1"),
    ("out", f'{{"id":"m1","to":"bob","type":"olm","bodies":{{"bob.phone":"c{S}"}}}}', "m1"),
    ("out", f'{{"id":"m1","to":"bob","type":"olm","bodies":{{"bob.{S}":"c"}}}}', "m1"),
    ("out", f'{{"id":"m1","to":"bob","type":"olm","bodies":{{"bob.phone":"c"}},"keys":{{"bob.phone":"{S}"}}}}',
     "m1"),
    ("seen", f'{{"to":"bob","ids":["m1","{S}"]}}', None),
    ("seen", f'{{"to":"{S}","ids":["m1"]}}', None),
    ("ack", f'{{"seqs":[1],"{S}":"x"}}', None),
    ("hb", f'{{"state":"{S}"}}', None),
    ("req", f'{{"rid":"r1","op":"p{S}"}}', "r1"),
    ("req", f'{{"rid":"r{S}","op":"ping"}}', None),
    ("req", f'{{"rid":"r1","op":"ping","args":{{"{S}":1}}}}', "r1"),
    ("req", f'{{"rid":"r1","op":"privacy.set","args":{{"last_seen":"every{S}"}}}}', "r1"),
    ("req", f'{{"rid":"r1","op":"presence.subscribe","args":{{"users":["bob{S}"]}}}}', "r1"),
    ("req", f'{{"rid":"r1","op":"contacts.add","args":{{"users":["{S}"]}}}}', "r1"),
    ("req", f'{{"rid":"r1","op":"keys.claim","args":{{"user":"bob","devices":["{S}"]}}}}', "r1"),
    ("req", '{"rid":"r1","op":"keys.publish","args":{"device_keys":{"user":"alice","device":"phone",'
            f'"curve25519":"Q","ed25519":"R","signature":"{S}"}}}}}}', "r1"),
]


def _staged(broker: BrokerThread) -> int:
    async def count() -> int:
        return broker.app.broker.bridge.messaging.staging.staged_count()
    return broker.call(count())




@pytest.mark.parametrize(("kind", "payload", "ref"), CASES)
def test_lone_surrogate_in_any_field_is_bad_json(broker: BrokerThread, peers: list[Peer], kind: str, payload: str,
                                                 ref: str | None) -> None:
    json.loads(payload)  # valid JSON: the test is about the text in it
    register_offline(broker.port, "bob")
    alice = online_peer(broker.port, peers, "alice")
    before = _staged(broker)
    alice.publish(f"u/alice/{kind}", payload.encode())
    item = alice.expect(lambda i: i.get("kind") in ("error", "res"))
    assert (item["kind"], item["code"], item.get("ref")) == ("error", "bad_json", ref), item
    assert "UTF-8" in item["detail"], item
    assert _staged(broker) == before, "nothing is staged for a refused uplink"
    # The next valid message goes through and is answered 'sent'.
    alice.publish("u/alice/out", {"id": "ok1", "to": "bob", "body": "fine"})
    sent = alice.expect(lambda i: i.get("kind") in ("error", "receipt"))
    assert (sent["kind"], sent.get("status"), sent.get("ids")) == ("receipt", "sent", ["ok1"]), sent


def test_the_issue_scenario_loses_nothing_across_a_restart(tmp_path: Path) -> None:
    """Lone-surrogate body to an offline bob, then normal messages: all get 'sent' and survive a restart."""
    data = tmp_path / "data"
    broker = BrokerThread(data).start()
    made: list[Peer] = []
    try:
        broker.add_users({"alice": "alice-pw", "bob": "bob-pw"})
        register_offline(broker.port, "bob")
        alice = online_peer(broker.port, made, "alice")
        alice.publish("u/alice/out", f'{{"id":"e1","to":"bob","body":"{S}"}}'.encode())
        refused = alice.expect(lambda i: i.get("kind") in ("error", "receipt"))
        assert (refused["kind"], refused.get("code"), refused.get("ref")) == ("error", "bad_json", "e1"), refused
        sent: list[str] = []
        for n in range(5):
            alice.publish("u/alice/out", {"id": f"n{n}", "to": "bob", "body": f"normal {n}"})
        while len(sent) < 5:
            item = alice.expect(lambda i: i.get("kind") in ("error", "receipt"))
            assert item.get("status") == "sent", item
            sent += item["ids"]
        assert sent == [f"n{n}" for n in range(5)]
    finally:
        for peer in made:
            peer.close()
        broker.stop()
    again = BrokerThread(data).start()
    try:
        bob = online_peer(again.port, made, "bob")
        got: list[dict[str, Any]] = []
        eventually(lambda: _drain(bob, got) >= 5, what="bob's five messages after the restart")
        assert [i["id"] for i in got if i.get("kind") == "msg"] == [f"n{n}" for n in range(5)]
    finally:
        bob.close()
        again.stop()


def _drain(peer: Peer, into: list[dict[str, Any]]) -> int:
    while not peer.messages.empty():
        into.append(json.loads(peer.messages.get()[1]))
    return sum(1 for i in into if i.get("kind") == "msg")
