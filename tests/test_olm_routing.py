"""End-to-end encrypted (olm) messages through the real broker, as raw MQTT clients see them:
each device receives only its own ciphertext with the sending device as ``dev``; the sender's
other devices get the history copy; ``delivered`` comes only from a recipient device; a wrong
device set is refused with the exact missing/extra devices and holds later messages; so is a
ciphertext whose stated identity key a reinstall replaced (``stale``); a recipient
without keys gets ``no_keys``; ``limits.require_encryption`` refuses plain bodies; staged
ciphertexts survive a broker restart; ``devices.remove`` changes the required set, drops the
device's staged items, revokes its token and closes its connection."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.helpers import BrokerProcess, BrokerThread, Peer, connack_code

DEPLOYMENTS = ("single", "cluster", "amqtt-path")  # tests/conftest.py: each broker test runs on each

PAHO_NOT_AUTHORIZED = 135  # CONNACK 0x05 as paho 2.x reports it
OLD_DEVICES = {"bob": ("phone", "laptop"), "alice": ("phone", "tab")}


def connect(port: int, peers: list[Peer], user: str, device: str = "phone", password: str | None = None,
            subscribe: bool = True) -> Peer:
    peer = Peer(port, user, password or f"{user}-pw", device=device)
    peers.append(peer)
    assert peer.connect() == 0
    if subscribe:
        assert peer.subscribe() == [1]
    return peer


def curve_of(cid: str, install: str = "") -> str:
    """The (fake) Curve25519 identity key ``publish_keys`` gives device ``cid``'s ``install``."""
    return f"Q1{cid.partition('.')[2]}{install}"


def publish_keys(peer: Peer, install: str = "") -> None:
    device = peer.client_id.partition(".")[2]
    keys = {"user": peer.user, "device": device, "curve25519": curve_of(peer.client_id, install),
            "ed25519": f"RU{device}{install}", "signature": "U0lH"}
    res = peer.request("keys.publish", {"device_keys": keys, "one_time_keys": {"k1": {"key": "a2V5",
                                                                                      "signature": "c2ln"}}})
    assert res["ok"] is True, res


def send_olm(peer: Peer, to: str, msg_id: str, bodies: dict[str, str], keys: dict[str, str] | None = None) -> None:
    message: dict[str, Any] = {"id": msg_id, "to": to, "type": "olm", "bodies": bodies}
    if keys is not None:
        message["keys"] = keys
    peer.publish(f"u/{peer.user}/out", message)


def is_msg(msg_id: str) -> Any:
    return lambda item: item.get("kind") == "msg" and item.get("id") == msg_id


def is_error(ref: str) -> Any:
    return lambda item: item.get("kind") == "error" and item.get("ref") == ref


def is_receipt(status: str, msg_id: str) -> Any:
    return lambda item: item.get("kind") == "receipt" and item["status"] == status and msg_id in item["ids"]


def until_fence(peer: Peer) -> list[dict[str, Any]]:
    """Everything ``peer`` receives before the answer to a ping it sends now (items already
    queued for it by the server arrive first: one connection, one order)."""
    rid = f"fence-{uuid.uuid4().hex[:8]}"
    peer.publish(f"u/{peer.user}/req", {"rid": rid, "op": "ping"})
    seen: list[dict[str, Any]] = []
    while True:
        item = peer.items()
        if item.get("rid") == rid:
            return seen
        seen.append(item)


def until_msg(peer: Peer, msg_id: str) -> list[dict[str, Any]]:
    """Everything ``peer`` receives up to and including the message ``msg_id`` (in cluster mode an
    item staged by another node can come after a fence: wait for the item itself)."""
    seen: list[dict[str, Any]] = []
    while not seen or not (seen[-1].get("kind") == "msg" and seen[-1].get("id") == msg_id):
        seen.append(peer.items())
    return seen


def ack(peer: Peer, seq: int) -> None:
    peer.publish(f"u/{peer.user}/ack", {"seqs": [seq]})
    until_fence(peer)  # the ack was handled


def everyone(port: int, peers: list[Peer]) -> dict[str, Peer]:
    """bob.phone, bob.laptop, alice.phone, alice.tab: connected, subscribed, keys published."""
    made = {}
    for user, devices in OLD_DEVICES.items():
        for device in devices:
            peer = made[f"{user}.{device}"] = connect(port, peers, user, device)
            publish_keys(peer)
    return made


FOR_BOB = {"bob.phone": "Y3QtYnA", "bob.laptop": "Y3QtYmw", "alice.tab": "Y3QtYXQ"}


def test_each_device_receives_only_its_ciphertext(broker: BrokerThread, peers: list[Peer]) -> None:
    p = everyone(broker.port, peers)
    send_olm(p["alice.phone"], "bob", "m1", FOR_BOB)
    got = {cid: p[cid].expect(is_msg("m1")) for cid in FOR_BOB}
    for cid, item in got.items():
        assert item["body"] == FOR_BOB[cid], f"{cid} got someone else's ciphertext"
        assert (item["type"], item["dev"], item["from"], item["to"]) == ("olm", "phone", "alice", "bob")
    assert p["alice.phone"].expect(is_receipt("sent", "m1"))
    assert not [i for i in until_fence(p["alice.phone"]) if i.get("kind") == "msg"], "no copy to the sender"
    # The history copy acked by alice's own tablet is no delivery ...
    ack(p["alice.tab"], got["alice.tab"]["seq"])
    assert not [i for i in until_fence(p["alice.phone"]) if i.get("status") == "delivered"]
    # ... the first ack by a device of bob is.
    ack(p["bob.laptop"], got["bob.laptop"]["seq"])
    assert p["alice.phone"].expect(is_receipt("delivered", "m1"))["peer"] == "bob"


def test_plain_messages_carry_the_sending_device(broker: BrokerThread, peers: list[Peer]) -> None:
    bob = connect(broker.port, peers, "bob")
    alice = connect(broker.port, peers, "alice", "tab")
    alice.publish("u/alice/out", {"id": "p1", "to": "bob", "body": "hi"})
    assert bob.expect(is_msg("p1"))["dev"] == "tab"


def test_device_mismatch_is_exact_and_holds_later_messages(broker: BrokerThread, peers: list[Peer]) -> None:
    p = everyone(broker.port, peers)
    alice = p["alice.phone"]
    connect(broker.port, peers, "bob", "nokeys")  # a device of bob without keys: not required
    wrong = {"bob.phone": "x", "bob.nokeys": "y", "mallory.phone": "z"}
    send_olm(alice, "bob", "m1", wrong)
    error = alice.expect(is_error("m1"))
    assert error["code"] == "devices_mismatch"
    assert (error["missing"], error["extra"]) == (["alice.tab", "bob.laptop"], ["bob.nokeys", "mallory.phone"])
    send_olm(alice, "bob", "m2", FOR_BOB)
    assert alice.expect(is_error("m2"))["code"] == "devices_mismatch", "held behind m1"
    send_olm(alice, "bob", "m1", FOR_BOB)
    assert alice.expect(is_receipt("sent", "m1"))
    send_olm(alice, "bob", "m2", FOR_BOB)
    assert alice.expect(is_receipt("sent", "m2"))
    assert [p["bob.phone"].expect(is_msg(m))["id"] for m in ("m1", "m2")] == ["m1", "m2"]


def test_stale_identity_key_is_refused_and_holds_later_messages(broker: BrokerThread, peers: list[Peer]) -> None:
    p = everyone(broker.port, peers)
    alice, laptop = p["alice.phone"], p["bob.laptop"]
    old_keys = {cid: curve_of(cid) for cid in FOR_BOB}
    send_olm(alice, "bob", "m1", FOR_BOB, old_keys)
    assert alice.expect(is_receipt("sent", "m1")), "the keys alice states are the current ones"
    ack(laptop, laptop.expect(is_msg("m1"))["seq"])
    publish_keys(laptop, install="new")  # bob reinstalls the laptop: same device id, new identity keys
    send_olm(alice, "bob", "m2", FOR_BOB, old_keys)
    error = alice.expect(is_error("m2"))
    assert error["code"] == "devices_mismatch"
    assert (error["missing"], error["extra"], error["stale"]) == ([], [], ["bob.laptop"])
    new_keys = {**old_keys, "bob.laptop": curve_of("bob.laptop", "new")}
    send_olm(alice, "bob", "m3", FOR_BOB, new_keys)
    held = alice.expect(is_error("m3"))
    assert held["code"] == "devices_mismatch" and "m2" in held["detail"], "held behind m2"
    send_olm(alice, "bob", "m2", FOR_BOB, new_keys)  # re-encrypted for the new install, same id
    assert alice.expect(is_receipt("sent", "m2"))
    send_olm(alice, "bob", "m3", FOR_BOB)  # without 'keys': the device ids alone are checked
    assert alice.expect(is_receipt("sent", "m3"))
    got = [item["id"] for item in until_msg(laptop, "m3") if item.get("kind") == "msg"]
    assert got == ["m2", "m3"], "in order, and nothing of the refused attempt"


def test_recipient_without_keys_gets_no_keys(broker: BrokerThread, peers: list[Peer]) -> None:
    alice = connect(broker.port, peers, "alice")
    publish_keys(alice)
    connect(broker.port, peers, "mallory")
    send_olm(alice, "mallory", "m1", {"mallory.phone": "x"})
    assert alice.expect(is_error("m1"))["code"] == "no_keys"
    alice.publish("u/alice/out", {"id": "m2", "to": "mallory", "body": "plain still works"})
    assert alice.expect(is_receipt("sent", "m2")), "no_keys holds nothing"


def test_require_encryption_refuses_plain_bodies(tmp_path: Path) -> None:
    broker = BrokerThread(tmp_path / "data", {"limits.require_encryption": True}).start()
    peers: list[Peer] = []
    try:
        broker.add_users({"alice": "alice-pw", "bob": "bob-pw"})
        bob = connect(broker.port, peers, "bob")
        publish_keys(bob)
        alice = connect(broker.port, peers, "alice")
        alice.publish("u/alice/out", {"id": "m1", "to": "bob", "body": "in clear"})
        assert alice.expect(is_error("m1"))["code"] == "encryption_required"
        send_olm(alice, "bob", "m2", {"bob.phone": "Y3Q"})
        assert bob.expect(is_msg("m2"))["body"] == "Y3Q"
    finally:
        for peer in peers:
            peer.close()
        broker.stop()


def test_staged_ciphertexts_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    peers: list[Peer] = []
    broker = BrokerProcess(data)
    broker.add_users({"alice": "alice-pw", "bob": "bob-pw"})
    broker.start()
    try:
        p = everyone(broker.port, peers)
        for cid in ("bob.phone", "bob.laptop", "alice.tab"):
            p[cid].close()
        send_olm(p["alice.phone"], "bob", "m1", FOR_BOB)
        assert p["alice.phone"].expect(is_receipt("sent", "m1")), "sent: it is on disk"
        p["alice.phone"].close()
    finally:
        broker.stop()
    broker = BrokerProcess(data).start()
    try:
        for cid, body in FOR_BOB.items():
            user, _, device = cid.partition(".")
            item = connect(broker.port, peers, user, device).expect(is_msg("m1"))
            assert (item["body"], item["dev"]) == (body, "phone")
    finally:
        for peer in peers:
            peer.close()
        broker.stop()


def test_devices_remove(broker: BrokerThread, peers: list[Peer]) -> None:
    p = everyone(broker.port, peers)
    laptop = p["bob.laptop"]
    token = laptop.request("auth.token")["result"]["token"]
    send_olm(p["alice.phone"], "bob", "m1", FOR_BOB)
    assert laptop.expect(is_msg("m1")), "delivered, never acked: it stays staged for the laptop"
    assert p["bob.phone"].request("devices.remove", {"device": "phone"})["error"]["code"] == "forbidden"
    assert p["bob.phone"].request("devices.remove", {"device": "laptop"})["result"] == {}
    assert laptop.disconnected.wait(10), "the removed device's connection is closed"
    # The required set no longer has the laptop ...
    send_olm(p["alice.phone"], "bob", "m2", FOR_BOB)
    error = p["alice.phone"].expect(is_error("m2"))
    assert (error["code"], error["extra"], error["missing"]) == ("devices_mismatch", ["bob.laptop"], [])
    assert "laptop" not in p["alice.phone"].request("keys.list", {"user": "bob"})["result"]["devices"]
    # ... its token is gone, and a new login of it (with the password) finds nothing staged.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bob.laptop")
    client.username_pw_set("bob", token)
    assert connack_code(client, broker.port) == PAHO_NOT_AUTHORIZED
    again = connect(broker.port, peers, "bob", "laptop")
    assert not [i for i in until_fence(again) if i.get("kind") == "msg"]
    send_olm(p["alice.phone"], "bob", "m2", {k: v for k, v in FOR_BOB.items() if k != "bob.laptop"})
    assert p["alice.phone"].expect(is_receipt("sent", "m2"))
