"""The key directory through the real broker, as raw MQTT clients see it (docs/PROTOCOL.md,
"End-to-end encryption"): keys.publish/count/list/claim round trips, one-time keys handed out
once (also to many clients claiming at the same moment), the fallback key when they run out,
the publish limits, that nobody can publish keys as another user or device, and that one user
cannot drain another's one-time keys (claims per peer are rate limited)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.helpers import BrokerThread, Peer

DEPLOYMENTS = ("single", "cluster", "amqtt-path")  # tests/conftest.py: each broker test runs on each


def device_keys(user: str, device: str, curve: str = "Q1VSVkU") -> dict[str, Any]:
    return {"user": user, "device": device, "curve25519": curve, "ed25519": f"RUQ{device}", "signature": "U0lH"}


def otks(first: int, count: int, device: str = "phone") -> dict[str, Any]:
    return {f"{device}{n}": {"key": f"a2V5{n}", "signature": "c2ln"} for n in range(first, first + count)}


FALLBACK = {"id": "FB", "key": "ZmFsbGJhY2s", "signature": "c2ln"}


def connect(broker: BrokerThread, peers: list[Peer], user: str, device: str = "phone") -> Peer:
    peer = Peer(broker.port, user, f"{user}-pw", device=device)
    peers.append(peer)
    assert peer.connect() == 0
    assert peer.subscribe() == [1]
    return peer


def ok(peer: Peer, op: str, args: dict[str, Any]) -> Any:
    res = peer.request(op, args)
    assert res["ok"] is True, res
    return res["result"]


def failed(peer: Peer, op: str, args: dict[str, Any]) -> str:
    res = peer.request(op, args)
    assert res["ok"] is False, res
    return str(res["error"]["code"])


def test_publish_list_claim_count_round_trip(broker: BrokerThread, peers: list[Peer]) -> None:
    bob = connect(broker, peers, "bob")
    alice = connect(broker, peers, "alice")
    assert ok(alice, "keys.list", {"user": "bob"}) == {"user": "bob", "devices": {}}
    assert ok(alice, "keys.claim", {"user": "bob"}) == {"user": "bob", "devices": {}}
    published = ok(bob, "keys.publish", {"device_keys": device_keys("bob", "phone"), "one_time_keys": otks(0, 2),
                                         "fallback_key": FALLBACK})
    assert published == {"one_time_keys": 2}
    assert ok(bob, "keys.count", {}) == {"one_time_keys": 2, "fallback_key": True}
    assert ok(alice, "keys.list", {"user": "bob"}) == {"user": "bob",
                                                       "devices": {"phone": device_keys("bob", "phone")}}
    claims = [ok(alice, "keys.claim", {"user": "bob"})["devices"]["phone"] for _ in range(3)]
    assert [(c["id"], c["fallback"]) for c in claims] == [("phone0", False), ("phone1", False), ("FB", True)]
    assert claims[0]["key"] == "a2V50" and claims[0]["signature"] == "c2ln"
    assert ok(bob, "keys.count", {}) == {"one_time_keys": 0, "fallback_key": True}
    assert ok(bob, "keys.publish", {"one_time_keys": otks(0, 2)}) == {"one_time_keys": 0}, \
        "a claimed key published again (a retried request) is never offered again"


def test_publish_limits_and_identity_rules(broker: BrokerThread, peers: list[Peer]) -> None:
    bob = connect(broker, peers, "bob")
    assert failed(bob, "keys.publish", {"device_keys": device_keys("alice", "phone")}) == "forbidden"
    assert failed(bob, "keys.publish", {"device_keys": device_keys("bob", "laptop")}) == "forbidden"
    assert failed(bob, "keys.publish", {"one_time_keys": otks(0, 1)}) == "bad_envelope", "device_keys first"
    assert failed(bob, "keys.publish", {"device_keys": device_keys("bob", "phone"),
                                        "one_time_keys": otks(0, 101)}) == "bad_envelope"
    ok(bob, "keys.publish", {"device_keys": device_keys("bob", "phone"), "one_time_keys": otks(0, 100)})
    ok(bob, "keys.publish", {"one_time_keys": otks(100, 100)})
    assert failed(bob, "keys.publish", {"one_time_keys": otks(200, 1)}) == "bad_envelope", "200 stored at most"
    assert ok(bob, "keys.count", {}) == {"one_time_keys": 200, "fallback_key": False}
    # A reinstall: new identity keys drop the old one-time keys.
    assert ok(bob, "keys.publish", {"device_keys": device_keys("bob", "phone", curve="TkVX")}) == {"one_time_keys": 0}
    assert failed(bob, "keys.list", {"user": "nobody"}) == "unknown_recipient"
    assert failed(bob, "keys.claim", {"user": "nobody"}) == "unknown_recipient"
    assert failed(bob, "keys.claim", {"user": "bob", "devices": "phone"}) == "bad_envelope"
    assert failed(bob, "keys.count", {"x": 1}) == "bad_envelope"


@pytest.mark.broker_config({"limits.claims_per_peer_burst": 1000})
def test_concurrent_claims_never_share_a_one_time_key(broker: BrokerThread, peers: list[Peer]) -> None:
    """Many connections claim at the same moment: each key goes to exactly one of them."""
    bob = connect(broker, peers, "bob")
    phone_keys = otks(0, 100)
    ok(bob, "keys.publish", {"device_keys": device_keys("bob", "phone"), "one_time_keys": phone_keys,
                             "fallback_key": FALLBACK})
    clients, per_client = 12, 10  # 120 claims for 100 one-time keys
    claimers = [connect(broker, peers, "alice", device=f"c{n}") for n in range(clients)]
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def claim_all(peer: Peer) -> None:
        rids = [f"{peer.client_id}-{n}" for n in range(per_client)]
        start.wait()
        for rid in rids:  # all published before any answer is awaited
            peer.publish("u/alice/req", {"rid": rid, "op": "keys.claim", "args": {"user": "bob"}})
        for _ in rids:
            res = peer.expect(lambda item: item.get("kind") == "res")
            with lock:
                results.append(res)

    threads = [threading.Thread(target=claim_all, args=(peer,)) for peer in claimers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == clients * per_client and all(r["ok"] for r in results)
    handed = [r["result"]["devices"]["phone"] for r in results]
    one_time = [c["id"] for c in handed if not c["fallback"]]
    assert sorted(one_time) == sorted(phone_keys), "every one-time key exactly once"
    assert [c["id"] for c in handed if c["fallback"]] == ["FB"] * (clients * per_client - len(phone_keys))
    assert ok(bob, "keys.count", {}) == {"one_time_keys": 0, "fallback_key": True}


def test_claim_for_chosen_devices(broker: BrokerThread, peers: list[Peer]) -> None:
    for device in ("phone", "laptop", "tab"):
        peer = connect(broker, peers, "bob", device=device)
        ok(peer, "keys.publish", {"device_keys": device_keys("bob", device), "one_time_keys": otks(0, 1, device)})
    alice = connect(broker, peers, "alice")
    claimed = ok(alice, "keys.claim", {"user": "bob", "devices": ["laptop", "tab", "nope"]})["devices"]
    assert {d: c["id"] for d, c in claimed.items()} == {"laptop": "laptop0", "tab": "tab0"}
    assert set(ok(alice, "keys.claim", {"user": "bob"})["devices"]) == {"phone"}, "no fallback for the others"


@pytest.mark.broker_config({"limits.claims_per_peer_burst": 3, "limits.claims_per_peer_per_min": 0.001})
def test_claims_per_peer_are_rate_limited(broker: BrokerThread, peers: list[Peer]) -> None:
    """Each claim deletes one of the peer's one-time keys: past the burst, mallory gets
    `rate_limited` and bob keeps the rest; other claimers and other peers are not affected."""
    bob = connect(broker, peers, "bob")
    ok(bob, "keys.publish", {"device_keys": device_keys("bob", "phone"), "one_time_keys": otks(0, 10)})
    mallory = connect(broker, peers, "mallory")
    mallory_tablet = connect(broker, peers, "mallory", device="tablet")
    handed = [ok(mallory, "keys.claim", {"user": "bob"})["devices"]["phone"]["id"] for _ in range(3)]
    assert failed(mallory, "keys.claim", {"user": "bob"}) == "rate_limited"
    assert failed(mallory_tablet, "keys.claim", {"user": "bob"}) == "rate_limited", "per user, not per device"
    assert ok(bob, "keys.count", {})["one_time_keys"] == 10 - len(handed)
    alice = connect(broker, peers, "alice")
    assert not ok(alice, "keys.claim", {"user": "bob"})["devices"]["phone"]["fallback"]
    assert ok(mallory, "keys.claim", {"user": "alice"})["devices"] == {}, "other peers: not limited"


@pytest.mark.broker_config({"limits.claims_per_peer_burst": 3, "limits.claims_per_peer_per_min": 0.001,
                            "limits.max_rate_keys": 50})
def test_claims_for_users_that_do_not_exist_cannot_reset_a_limit(broker: BrokerThread, peers: list[Peer]) -> None:
    """The issue's attack, with the limiter's table lowered from 100,000 to 50: once mallory is
    rate limited on bob, claims for many users that do not exist neither use a bucket nor push
    bob's out of the table, so the next claims on bob are still refused."""
    ok(connect(broker, peers, "bob"), "keys.publish", {"device_keys": device_keys("bob", "phone"),
                                                       "one_time_keys": otks(0, 10)})
    mallory = connect(broker, peers, "mallory")
    for _ in range(3):
        ok(mallory, "keys.claim", {"user": "bob"})
    assert failed(mallory, "keys.claim", {"user": "bob"}) == "rate_limited"
    for n in range(200):
        assert failed(mallory, "keys.claim", {"user": f"ghost{n}"}) == "unknown_recipient"
    assert [failed(mallory, "keys.claim", {"user": "bob"}) for _ in range(5)] == ["rate_limited"] * 5
    assert ok(connect(broker, peers, "alice"), "keys.claim", {"user": "bob"})["devices"], "other claimers unaffected"
