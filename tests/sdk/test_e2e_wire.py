"""The Olm ratchet as the SDK uses it, over the real broker: messages encrypted with the
SDK's crypto layer and published in shuffled order with some omitted are all decrypted by
bob's SDK in the order they arrive; a ciphertext whose inner envelope names another message
or recipient becomes an ``Undecryptable`` event (acked, not a crash); bob's device added
later gets what is sent after it published keys."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from chatproto import OLM_TYPE
from client_sdk.crypto import Account, Ciphertext, Session
from client_sdk.events import Message, Undecryptable
from tests.helpers import BrokerThread, Peer
from tests.sdk.conftest import Collector, Factory
from tests.sdk.test_e2e import online, publish, raw_device


def session_to(sender: Peer, account: Account, user: str, device: str) -> tuple[Session, dict[str, Any]]:
    """An outbound Olm session from a raw device to ``user.device``, from its listed and claimed keys."""
    listed = sender.request("keys.list", {"user": user})["result"]["devices"][device]
    claimed = sender.request("keys.claim", {"user": user, "devices": [device]})["result"]["devices"][device]
    return account.outbound(listed["curve25519"], claimed["key"]), listed


@dataclass
class RawAlice:
    """alice's raw MQTT device ``raw``, keys published, with an Olm session to bob's phone."""

    sender: Peer
    account: Account
    session: Session
    keys: dict[str, Any]

    def publish(self, item: dict[str, Any]) -> None:
        self.sender.publish("u/alice/out", item)

    def envelope(self, msg_id: str, body: str, **override: Any) -> dict[str, Any]:
        """An olm message as the SDK would seal it; ``override`` changes fields of the inner envelope."""
        keys = self.keys
        inner = {"v": 1, "id": msg_id, "to": keys["user"], "type": "text", "body": body, "sender": "alice",
                 "sender_device": "raw", "sender_ed25519": self.account.ed25519,
                 "recipient": keys["user"], "recipient_ed25519": keys["ed25519"], **override}
        ciphertext = self.session.encrypt(json.dumps(inner).encode(), self.account.curve25519).to_wire()
        target = f"{keys['user']}.{keys['device']}"
        return {"id": msg_id, "to": keys["user"], "type": OLM_TYPE, "bodies": {target: ciphertext}}


def raw_alice(broker: BrokerThread, peers: list[Peer]) -> RawAlice:
    sender, account = raw_device(broker, peers, "alice", "raw")
    publish(sender, {"device_keys": account.device_keys("alice", "raw")})
    return RawAlice(sender, account, *session_to(sender, account, "bob", "phone"))


def test_ratchet_recovers_from_reordered_and_dropped_messages(
    make_client: Factory, peers: list[Peer], broker: BrokerThread,
) -> None:
    bob = online(make_client, "bob", "phone")
    alice = raw_alice(broker, peers)
    envelopes = [alice.envelope(f"m{i}", f"body {i}") for i in range(12)]
    rng = random.Random(7)
    rng.shuffle(envelopes)
    kept = envelopes[:8]  # four are lost on the way
    for item in kept:
        alice.publish(item)
    got = [bob.next(Message) for _ in kept]
    assert [m.id for m in got] == [e["id"] for e in kept]  # in arrival order, each decrypted
    assert all(m.body == f"body {m.id[1:]}" and m.encrypted and m.device == "raw" for m in got)
    # The ratchet turns: bob replies, alice's raw device decrypts with the same session.
    reply = bob.client.send("alice", "got them", "text")
    item = alice.sender.expect(lambda i: i.get("kind") == "msg" and i.get("id") == reply)
    assert json.loads(alice.session.decrypt(Ciphertext.from_wire(item["body"])))["body"] == "got them"


def test_a_ciphertext_relabelled_by_the_server_is_undecryptable_not_a_crash(
    make_client: Factory, peers: list[Peer], broker: BrokerThread,
) -> None:
    bob = online(make_client, "bob", "phone")
    alice = raw_alice(broker, peers)
    alice.publish(alice.envelope("real", "ok"))
    alice.publish(alice.envelope("swapped", "x", id="other"))
    alice.publish(alice.envelope("other-rcpt", "x", recipient="carol"))
    alice.publish({"id": "garbage", "to": "bob", "type": OLM_TYPE, "bodies": {"bob.phone": "1.1..!!"}})
    alice.publish(alice.envelope("after", "still fine"))
    assert bob.next(Message).id == "real"
    bad = [bob.next(Undecryptable) for _ in range(3)]
    assert [(u.id, u.sender, u.device) for u in bad] == \
        [("swapped", "alice", "raw"), ("other-rcpt", "alice", "raw"), ("garbage", "alice", "raw")]
    assert "id" in bad[0].reason and "recipient" in bad[1].reason
    assert bob.next(Message).body == "still fine"


def test_a_new_device_receives_what_is_sent_after_it_published_keys(make_client: Factory) -> None:
    alice = online(make_client, "alice", "phone")
    bob = online(make_client, "bob", "phone")
    alice.client.send("bob", "before the laptop", "text")
    assert bob.next(Message).body == "before the laptop"
    laptop: Collector = online(make_client, "bob", "laptop")  # connect() returns once its keys are published
    for n in range(3):
        alice.client.send("bob", f"after {n}", "text")
    assert [m.body for m in laptop.messages(3)] == ["after 0", "after 1", "after 2"]
    assert [m.body for m in bob.messages(3)] == ["after 0", "after 1", "after 2"]
    assert not [m for m in laptop.all_now() if isinstance(m, Message) and m.body == "before the laptop"]
