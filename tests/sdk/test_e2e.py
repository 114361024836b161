"""End-to-end encryption through the real broker with SDK clients: alice and bob (two
devices) chat encrypted both ways and history copies reach the sender's other device; a
stale device list is healed by one automatic re-send; a new device gets what is sent after
it published keys; a reinstall raises an identity-change warning, and what alice sends after it
is re-encrypted for the new install (one automatic re-send) while a message staged for the wiped
install is lost to the new one; keys whose signatures do
not verify are refused; the server only ever carries ciphertext."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chatproto import OLM_TYPE
from client_sdk import AsyncClient, StoreError
from client_sdk.crypto import Account, Ciphertext
from client_sdk.events import ErrorEvent, IdentityChanged, Message, Receipt, Undecryptable
from tests.helpers import BrokerThread, Peer, eventually
from tests.sdk.conftest import Collector, Factory, LogWatch

DEPLOYMENTS = ("single", "cluster")  # tests/conftest.py: each broker test runs on both


def online(make_client: Factory, user: str, device: str, **options: Any) -> Collector:
    """A connected client (its keys published) with its events collected."""
    client = make_client(user, device=device, **options)
    collector = Collector(client)
    collector.client.on_warning = collector.events.put
    client.connect()
    return collector


def test_alice_and_bob_with_two_devices_chat_encrypted_both_ways(make_client: Factory) -> None:
    alice = online(make_client, "alice", "phone", store="alice.db")
    alice_laptop = online(make_client, "alice", "laptop", store="alice-laptop.db")
    bob_phone = online(make_client, "bob", "phone", store="bob-phone.db")
    bob_laptop = online(make_client, "bob", "laptop", store="bob-laptop.db")

    mid = alice.client.send("bob", "hello bob", "text")
    for bob in (bob_phone, bob_laptop):
        got = bob.next(Message)
        assert (got.id, got.sender, got.device, got.body, got.type, got.encrypted) == \
            (mid, "alice", "phone", "hello bob", "text", True)
    copy = alice_laptop.next(Message)  # history: alice's other device sees what she sent
    assert (copy.id, copy.sender, copy.to, copy.body, copy.encrypted) == (mid, "alice", "bob", "hello bob", True)
    assert alice.next(Receipt, where=lambda r: r.status == "sent").ids == (mid,)

    reply = bob_laptop.client.send("alice", "hi alice", "text")
    for device in (alice, alice_laptop):
        got = device.next(Message)
        assert (got.id, got.sender, got.device, got.body) == (reply, "bob", "laptop", "hi alice")
    assert bob_phone.next(Message).id == reply  # bob's phone gets the history copy
    alice.client.send("bob", "second", "text")  # now over the established sessions
    assert [bob.next(Message).body for bob in (bob_phone, bob_laptop)] == ["second", "second"]
    assert not [e for c in (alice, alice_laptop, bob_phone, bob_laptop) for e in c.all_now()
                if not isinstance(e, Receipt | Message)]


def test_stale_device_list_is_healed_by_one_automatic_resend(make_client: Factory) -> None:
    alice = online(make_client, "alice", "phone")
    bob = online(make_client, "bob", "phone")
    alice.client.send("bob", "first", "text")
    assert bob.next(Message).body == "first"  # alice has cached bob's one-device list
    laptop = online(make_client, "bob", "laptop")  # publishes keys; alice does not know it yet
    with LogWatch("client_sdk.engine", "devices changed") as watch:
        mid = alice.client.send("bob", "second", "text")
        assert laptop.next(Message).body == "second"
        assert bob.next(Message).id == mid
        assert watch.count == 1  # one devices_mismatch, one re-send of the same id
    assert alice.next(Receipt, where=lambda r: r.status == "sent" and mid in r.ids)
    assert not [e for e in alice.all_now() if isinstance(e, ErrorEvent)]


def test_identity_change_warns_and_messages_still_flow(make_client: Factory) -> None:
    alice = online(make_client, "alice", "phone")
    bob = online(make_client, "bob", "phone", store="bob-old.db")
    alice.client.send("bob", "before", "text")
    assert bob.next(Message).body == "before"
    old = alice.client.fingerprint("bob", "phone")
    assert old == bob.client.fingerprint()
    bob.client.close()
    reinstalled = online(make_client, "bob", "phone", store="bob-new.db")  # same device id, new keys
    reinstalled.client.send("alice", "new phone, who dis", "text")
    assert alice.next(Message).body == "new phone, who dis"
    warning = alice.next(IdentityChanged)
    assert (warning.user, warning.device, warning.old_fingerprint) == ("bob", "phone", old)
    assert warning.new_fingerprint == reinstalled.client.fingerprint() != old
    assert alice.client.fingerprint("bob", "phone") == warning.new_fingerprint
    alice.client.send("bob", "after", "text")  # over the new session, not the old install's
    assert reinstalled.next(Message).body == "after"


def test_reinstall_is_healed_by_one_automatic_resend(make_client: Factory) -> None:
    alice = online(make_client, "alice", "phone")
    bob = online(make_client, "bob", "phone", store="bob-old.db")
    first = alice.client.send("bob", "before", "text")
    assert bob.next(Message).body == "before"  # alice now has a session with bob's old install
    assert alice.next(Receipt, where=lambda r: r.status == "delivered" and first in r.ids), "acked: nothing in flight"
    old = alice.client.fingerprint("bob", "phone")
    bob.client.close()
    reinstalled = online(make_client, "bob", "phone", store="bob-new.db")  # same device id, new keys published
    assert reinstalled.client.request("keys.count") == {"one_time_keys": 50, "fallback_key": True}, \
        "the new install's own keys, not a count of the old install's"
    with LogWatch("client_sdk.engine", "stale ('bob.phone',)") as watch:
        sent = {alice.client.send("bob", f"after {n}", "text"): f"after {n}" for n in range(3)}
        got = reinstalled.messages(len(sent))
        assert {m.id: m.body for m in got} == sent, "every one decrypted by the new install"
        # The first refusal re-seals the whole queue; a message already being sealed at that moment
        # (the sending thread) may still go out once with the old key and be refused in turn.
        assert 1 <= watch.count <= len(sent), "each message re-sent at most once, for the new install"
    warning = alice.next(IdentityChanged)
    assert (warning.user, warning.device, warning.old_fingerprint) == ("bob", "phone", old)
    assert warning.new_fingerprint == reinstalled.client.fingerprint()
    confirmed: set[str] = set()  # one 'sent' per message, or one for all that a 'delivered' named (rule 11)
    while not confirmed >= set(sent):
        confirmed.update(alice.next(Receipt, where=lambda r: r.status == "sent").ids)
    assert not [e for e in reinstalled.all_now() if isinstance(e, Undecryptable | Message)], "each exactly once"
    assert not [e for e in alice.all_now() if isinstance(e, ErrorEvent | IdentityChanged)], "one warning, no error"


def test_message_staged_for_a_wiped_install_is_lost_to_the_new_one(make_client: Factory) -> None:
    """What the stale check cannot cover (docs/SECURITY.md): a message accepted while bob's old
    install was current, and still staged when it was wiped, reaches the new install as
    ``Undecryptable``; what alice sends after the reinstall is readable."""
    alice = online(make_client, "alice", "phone")
    bob = online(make_client, "bob", "phone", store="bob-old.db")
    alice.client.send("bob", "before", "text")
    assert bob.next(Message).body == "before"
    bob.client.close()
    lost = alice.client.send("bob", "while bob was away", "text")
    assert alice.next(Receipt, where=lambda r: r.status == "sent" and lost in r.ids)
    reinstalled = online(make_client, "bob", "phone", store="bob-new.db")
    assert reinstalled.next(Undecryptable, where=lambda u: u.id == lost).sender == "alice"
    later = alice.client.send("bob", "after", "text")
    assert reinstalled.next(Message, where=lambda m: m.id == later).body == "after"


def raw_device(broker: BrokerThread, peers: list[Peer], user: str, device: str,
               one_time_keys: int = 2) -> tuple[Peer, Account]:
    """A raw MQTT device with an Olm account of its own; its keys are not published yet."""
    peer = Peer(broker.port, user, f"{user}-pw", device=device)
    peers.append(peer)
    assert peer.connect() == 0
    peer.subscribe()
    account = Account()
    account.generate_one_time_keys(one_time_keys)
    return peer, account


def publish(peer: Peer, args: dict[str, Any]) -> None:
    answer = peer.request("keys.publish", args)
    assert answer["ok"], answer


@pytest.mark.parametrize("tamper", ["device_keys", "one_time_key"])
def test_keys_whose_signature_does_not_verify_are_refused(
    make_client: Factory, peers: list[Peer], broker: BrokerThread, tamper: str,
) -> None:
    alice = online(make_client, "alice", "phone")
    peer, account = raw_device(broker, peers, "bob", "phone")
    device_keys = account.device_keys("bob", "phone")
    one_time = account.unpublished_one_time_keys()
    if tamper == "device_keys":  # the server swaps in an identity key it holds the secret of
        device_keys = {**device_keys, "curve25519": Account().curve25519}
    else:  # the server hands out its own one-time keys under bob's ids
        forger = Account()
        one_time = {key_id: {k: v for k, v in forger.sign({"id": key_id, "key": key["key"]}).items() if k != "id"}
                    for key_id, key in one_time.items()}
    publish(peer, {"device_keys": device_keys, "one_time_keys": one_time})
    mid = alice.client.send("bob", "for bob only", "text")
    refused = alice.next(ErrorEvent)
    assert (refused.code, refused.ref) == ("bad_keys", mid)
    assert "do not verify" in refused.detail or "does not verify" in refused.detail
    assert peer.nothing_arrives(0.3)  # nothing was sent to bob at all
    assert alice.client.outbox() == []


def test_server_only_carries_ciphertext_each_device_its_own(
    make_client: Factory, peers: list[Peer], broker: BrokerThread,
) -> None:
    bob = online(make_client, "bob", "phone")
    spy, account = raw_device(broker, peers, "bob", "spy")  # a raw device of bob, to see the wire
    publish(spy, {"device_keys": account.device_keys("bob", "spy"),
                  "one_time_keys": account.unpublished_one_time_keys()})
    account.mark_published()
    alice = online(make_client, "alice", "phone")
    mid = alice.client.send("bob", "secret words", "text")
    assert bob.next(Message).body == "secret words"
    item = spy.expect(lambda i: i.get("kind") == "msg")
    assert (item["id"], item["from"], item["dev"], item["type"]) == (mid, "alice", "phone", OLM_TYPE)
    assert "secret words" not in json.dumps(item)
    _session, plaintext = account.inbound(Ciphertext.from_wire(item["body"]))  # it is real Olm, for this device
    inner = json.loads(plaintext)
    assert (inner["body"], inner["recipient"], inner["recipient_ed25519"], inner["sender_device"]) == \
        ("secret words", "bob", account.ed25519, "phone")


@pytest.mark.broker_config({"limits.claims_per_peer_burst": 100})
def test_one_time_keys_are_topped_up_after_peers_use_them(
    make_client: Factory, peers: list[Peer], broker: BrokerThread,
) -> None:
    bob = online(make_client, "bob", "phone")
    assert bob.client.request("keys.count") == {"one_time_keys": 50, "fallback_key": True}
    claimer = Peer(broker.port, "mallory", "mallory-pw", device="x")
    peers.append(claimer)
    assert claimer.connect() == 0
    claimer.subscribe()
    for _ in range(30):  # someone drains bob's one-time keys
        assert claimer.request("keys.claim", {"user": "bob"})["ok"]
    assert bob.client.request("keys.count")["one_time_keys"] == 20
    alice = online(make_client, "alice", "phone")
    alice.client.send("bob", "uses one more", "text")
    assert bob.next(Message).body == "uses one more"  # an inbound session used a key: bob tops up
    eventually(lambda: bob.client.request("keys.count")["one_time_keys"] == 50, what="one-time keys topped up")


async def test_async_client_encrypts_and_both_sides_agree_on_the_safety_number(
    make_client: Factory, broker: BrokerThread, tmp_path: Path,
) -> None:
    bob = online(make_client, "bob", "phone")
    async with AsyncClient("alice", "alice-pw", device="tablet", port=broker.port,
                           store=tmp_path / "alice.db", store_secret="correct horse") as alice:
        mid = await alice.send("bob", "from asyncio", "text")
        assert bob.next(Message).id == mid
        bob.client.send("alice", "back to asyncio", "text")
        async for event in alice.events():
            if isinstance(event, Message):
                assert (event.body, event.encrypted, event.device) == ("back to asyncio", True, "phone")
                break
        assert await alice.fingerprint("bob", "phone") == bob.client.fingerprint()
        number = await alice.safety_number("bob")
        assert number == bob.client.safety_number("alice")
        assert len(number.split()) == 12
    with pytest.raises(StoreError, match="another key"):
        AsyncClient("alice", "alice-pw", device="tablet", port=broker.port, store=tmp_path / "alice.db",
                    store_secret="wrong")
