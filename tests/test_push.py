"""Push through the real broker (one process on SQLite) to a real UnifiedPush distributor on 127.0.0.1
(tests/push_distributor.py), docs/PUSH.md: one wake-up for a burst to an away phone and then
everything on ``fetch_pending()``; none for a connected phone that acks; one for a connection that
stopped acking; retries honouring Retry-After and backing off; dead endpoints dropped and the device
told; registrations per device, removed with it; a SIGKILL with a wake-up queued; fuzzed arguments."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from client_sdk import AsyncClient, Client
from client_sdk.events import Message
from providers.push.common import collapse_tag
from tests.helpers import WAIT_S, BrokerProcess, BrokerThread, Peer, eventually, online_peer, register_offline
from tests.push_distributor import Distributor, Received

GRACE_S = 1.0
PUSH = {"push.enabled": True, "push.allow_loopback_endpoints": True, "push.unifiedpush": {},
        "push.grace_s": GRACE_S, "push.min_interval_s": 60.0, "push.retry_min_s": 0.3, "push.retry_max_s": 2.0,
        "limits.send_rate_per_s": 1e6, "limits.send_burst": 1_000_000}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    running = BrokerThread(tmp_path / "data", PUSH).start()
    try:
        running.add_users({"alice": "alice-pw", "bob": "bob-pw"})
        yield running
    finally:
        running.stop()


@pytest.fixture
def made(broker: BrokerThread) -> Iterator[list[Peer]]:
    """Peers to close (before the broker stops)."""
    peers: list[Peer] = []
    yield peers
    for peer in peers:
        peer.close()


def register(port: int, distributor: Distributor, user: str = "bob", device: str = "phone") -> None:
    """``user.device`` registers the distributor's endpoint and goes away."""
    peer = Peer(port, user, f"{user}-pw", device=device)
    try:
        assert peer.connect() == 0 and peer.subscribe() == [1]
        res = peer.request("push.register", {"platform": "unifiedpush", "endpoint": distributor.endpoint(user)})
        assert res["ok"], res
    finally:
        peer.close()


def send(peer: Peer, msg_id: str, body: str = "hello", to: str = "bob") -> None:
    peer.publish(f"u/{peer.user}/out", {"id": msg_id, "to": to, "body": body})


def content_free(request: Received) -> None:
    """What a distributor may see: a POST to the endpoint with RFC 8030 headers, and "wake" only."""
    assert request.method == "POST" and request.path == "/up/bob"
    assert int(request.headers["ttl"]) > 0 and request.headers["urgency"] == "high"
    assert request.headers["topic"] == collapse_tag("wake")  # the same for every device
    assert json.loads(request.body) == {"wake": 1}
    assert b"alice" not in request.body and b"secret" not in request.body


def test_an_away_phone_gets_one_push_for_a_burst_then_everything_on_fetch_pending(
        broker: BrokerThread, made: list[Peer], distributor: Distributor) -> None:
    away_phone_gets_one_push_for_a_burst(broker.port, broker.port, made, distributor)
    assert broker.app.push is not None and broker.app.push.counters["unifiedpush"].sent == 1


def away_phone_gets_one_push_for_a_burst(phone_port: int, sender_port: int, made: list[Peer],
                                         distributor: Distributor) -> None:
    """bob.phone registers through ``phone_port`` and goes; alice sends 50 through ``sender_port``: one
    content-free push, then ``fetch_pending()`` through ``phone_port`` takes all 50."""
    register(phone_port, distributor)
    alice = online_peer(sender_port, made, "alice")
    for n in range(50):
        send(alice, f"m{n:02d}", f"secret body {n}")
    all_sent(alice, {f"m{n:02d}" for n in range(50)})  # all staged before the phone fetches (in cluster mode a
    [request] = distributor.wait(1)  # loaded machine left alice's last 33 behind the fetch)
    content_free(request)
    assert fetch(phone_port) == [f"m{n:02d}" for n in range(50)]
    assert len(distributor.requests) == 1  # the wake-up deferred by min_interval went when it connected


def all_sent(peer: Peer, ids: set[str]) -> None:
    """Waits for the ``sent`` receipts of ``ids``: each message staged."""
    left = set(ids)
    while left:
        left -= set(peer.expect(lambda i: i.get("kind") == "receipt" and i.get("status") == "sent")["ids"])


def fetch(port: int) -> list[str]:
    """What bob.phone's ``fetch_pending()`` takes (ids, sorted); it leaves nothing."""
    phone = Client("bob", "bob-pw", device="phone", port=port, encryption=False)
    got: list[Message] = []
    phone.on_message = got.append
    assert phone.fetch_pending(timeout=WAIT_S) == 0
    return sorted(m.id for m in got)


def test_the_async_face_fetches_pending_too(broker: BrokerThread, made: list[Peer],
                                            distributor: Distributor) -> None:
    register(broker.port, distributor)
    alice = online_peer(broker.port, made, "alice")
    for n in range(5):
        send(alice, f"m{n}")
    distributor.wait(1)

    async def wake() -> tuple[int, list[str]]:
        phone = AsyncClient("bob", "bob-pw", device="phone", port=broker.port, encryption=False)
        got: list[str] = []

        async def read() -> None:
            async for event in phone.events():
                if isinstance(event, Message):
                    got.append(event.id)

        reader = asyncio.create_task(read())
        left = await phone.fetch_pending(timeout=WAIT_S)
        await reader
        return left, got

    left, got = asyncio.run(wake())
    assert left == 0 and sorted(got) == [f"m{n}" for n in range(5)]


def test_a_connected_phone_that_acks_gets_no_push(broker: BrokerThread, made: list[Peer],
                                                  distributor: Distributor) -> None:
    acking_phone_gets_none(broker.port, broker.port, made, distributor)


def acking_phone_gets_none(phone_port: int, sender_port: int, made: list[Peer], distributor: Distributor) -> None:
    """bob.phone registered and connected through ``phone_port`` acks 20 messages from alice: no push."""
    phone = Client("bob", "bob-pw", device="phone", port=phone_port, encryption=False)
    try:
        register(phone_port, distributor)
        got: list[Message] = []
        phone.on_message = got.append
        phone.connect()
        alice = online_peer(sender_port, made, "alice")
        for n in range(20):
            send(alice, f"m{n:02d}")
        eventually(lambda: len(got) == 20, what="20 messages")
        with pytest.raises(AssertionError):
            distributor.wait(1, timeout=3 * GRACE_S)
    finally:
        phone.close()


def test_a_connection_that_stops_acking_gets_one_push_after_the_grace(broker: BrokerThread, made: list[Peer],
                                                                      distributor: Distributor) -> None:
    silent_connection_gets_one(broker.port, broker.port, made, distributor)


def silent_connection_gets_one(phone_port: int, sender_port: int, made: list[Peer], distributor: Distributor) -> None:
    """bob.phone connected through ``phone_port`` never acks a message from alice: one push after the grace."""
    register(phone_port, distributor)
    silent = online_peer(phone_port, made, "bob")  # subscribed, never acks (a frozen app)
    send(online_peer(sender_port, made, "alice"), "m1")
    assert silent.expect(lambda item: item.get("kind") == "msg")["id"] == "m1"
    [request] = distributor.wait(1)
    content_free(request)


def test_429_and_5xx_are_retried_with_back_off_honouring_retry_after(broker: BrokerThread, made: list[Peer],
                                                                     distributor: Distributor) -> None:
    retried_with_back_off(broker.port, broker.port, made, distributor)
    push = broker.app.push
    assert push is not None
    eventually(lambda: push.counters["unifiedpush"].sent == 1, what="sent")
    assert push.counters["unifiedpush"].failed == {"retry": 3}
    assert push.core.queue == {}


def retried_with_back_off(phone_port: int, sender_port: int, made: list[Peer], distributor: Distributor) -> None:
    """The distributor answers 429 (Retry-After: 1), 503, 500, then 201: four requests, spaced so."""
    distributor.answer(429, Retry_After="1")
    distributor.answer(503)
    distributor.answer(500)
    register(phone_port, distributor)
    send(online_peer(sender_port, made, "alice"), "m1")
    first, second, third, fourth = distributor.wait(4)
    assert second.at - first.at >= 0.95  # Retry-After: 1
    assert third.at - second.at >= 0.25  # retry_min_s 0.3 (timer slack), then doubling
    assert fourth.at - third.at >= 0.55 and fourth.at - third.at > third.at - second.at


@pytest.mark.parametrize("status", [404, 410])
def test_a_gone_endpoint_is_dropped_and_the_device_told(broker: BrokerThread, made: list[Peer],
                                                        distributor: Distributor, status: int) -> None:
    distributor.answer(status)
    register(broker.port, distributor)
    alice = online_peer(broker.port, made, "alice")
    send(alice, "m1")
    distributor.wait(1)
    push = broker.app.push
    assert push is not None
    eventually(lambda: not push.core.targets, what="registration dropped")
    with sqlite3.connect(broker.settings.data_path / "push.db") as db:
        eventually(lambda: db.execute("SELECT client_id FROM gone").fetchall() == [("bob.phone",)],
                   what="gone mark stored")
        assert db.execute("SELECT COUNT(*) FROM registrations").fetchone() == (0,)
    send(alice, "m2")
    phone = online_peer(broker.port, made, "bob")
    assert phone.expect(lambda item: item.get("kind") == "error")["code"] == "push_gone"
    assert len(distributor.requests) == 1


def test_registrations_are_per_device_and_removed_with_it(broker: BrokerThread, made: list[Peer],
                                                          distributor: Distributor) -> None:
    register(broker.port, distributor)
    push = broker.app.push
    assert push is not None and set(push.core.targets) == {"bob.phone"}
    tablet = online_peer(broker.port, made, "bob", "tablet")
    alice = online_peer(broker.port, made, "alice")
    for peer in (tablet, alice):
        assert peer.request("push.unregister")["result"] == {"removed": False}
    res = tablet.request("push.register", {"platform": "unifiedpush", "endpoint": distributor.endpoint("bob"),
                                           "device": "phone"})
    assert res["error"]["code"] == "bad_envelope"
    assert tablet.request("push.unregister", {"device": "phone"})["error"]["code"] == "bad_envelope"
    assert set(push.core.targets) == {"bob.phone"}
    assert tablet.request("devices.remove", {"device": "phone"})["ok"]
    eventually(lambda: not push.core.targets, what="registration removed with the device")
    with sqlite3.connect(broker.settings.data_path / "push.db") as db:
        eventually(lambda: db.execute("SELECT COUNT(*) FROM registrations").fetchone() == (0,),
                   what="registration row removed")


def test_the_sdk_registers_and_unregisters_its_own_device(broker: BrokerThread, distributor: Distributor) -> None:
    phone = Client("bob", "bob-pw", device="phone", port=broker.port, encryption=False)
    try:
        phone.connect()
        with pytest.raises(ValueError, match="endpoint"):
            phone.register_push("unifiedpush", endpoint="ftp://example.com/x")
        phone.register_push("unifiedpush", endpoint=distributor.endpoint("bob"))
        push = broker.app.push
        assert push is not None and push.core.targets["bob.phone"].token == distributor.endpoint("bob")
        assert phone.unregister_push() is True and phone.unregister_push() is False
        assert push.core.targets == {}
    finally:
        phone.close()


def test_a_wake_up_queued_at_a_sigkill_goes_out_after_the_restart(tmp_path: Path, distributor: Distributor) -> None:
    distributor.answer(503, Retry_After="1")
    config = {"push": {"enabled": True, "allow_loopback_endpoints": True, "unifiedpush": {}}}
    proc = BrokerProcess(tmp_path / "data", config)
    proc.add_users({"alice": "alice-pw", "bob": "bob-pw"})
    proc.start()
    made: list[Peer] = []
    try:
        register(proc.port, distributor)
        send(online_peer(proc.port, made, "alice"), "m1")
        distributor.wait(1)
        for peer in made:
            peer.close()
        assert proc.proc is not None
        proc.proc.kill()
        proc.proc.wait(WAIT_S)
        proc = BrokerProcess(tmp_path / "data", config).start()
        _, again = distributor.wait(2, timeout=30)
        assert again.path == "/up/bob" and json.loads(again.body) == {"wake": 1}
    finally:
        proc.stop()


def test_push_requests_are_unsupported_when_push_is_off(tmp_path: Path) -> None:
    broker = BrokerThread(tmp_path / "data").start()
    made: list[Peer] = []
    try:
        broker.add_users({"bob": "bob-pw"})
        register_offline(broker.port, "bob")
        phone = online_peer(broker.port, made, "bob")
        res = phone.request("push.register", {"platform": "unifiedpush", "endpoint": "https://ntfy.sh/up"})
        assert res["error"]["code"] == "unsupported"
    finally:
        for peer in made:
            peer.close()
        broker.stop()
