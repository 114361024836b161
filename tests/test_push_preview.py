"""Push previews through the real broker (docs/PROTOCOL.md section 12 "Previews"): with
``push.include_preview`` the wake-up a local UnifiedPush distributor receives carries the preview
the sender's SDK encrypted for the device, which the recipient's SDK opens to the sender's text,
and nothing in it is plaintext; a preview key whose signature does not verify is ignored by the
sender; with previews off no payload carries one and push.db keeps none; a preview too large or
for a device not in ``bodies`` is refused; Web Push carries it inside the browser's encryption."""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from chatproto import MAX_PREVIEW_CHARS, OP_PUSH_REGISTER, preview_key_object
from client_sdk import AsyncClient, Client, PushPreview
from client_sdk import preview as P
from client_sdk.crypto import Account
from client_sdk.events import Message
from providers.push import webpush
from testkit.https_server import HttpsServer, make_tls, pem
from testkit.push_servers import Clock as PushClock
from testkit.push_servers import FakeWebPush
from tests.helpers import WAIT_S, BrokerThread, Peer, eventually, online_peer
from tests.push_distributor import Distributor

PUSH = {"push.enabled": True, "push.allow_loopback_endpoints": True, "push.unifiedpush": {},
        "push.min_interval_s": 60.0}


@pytest.fixture
def distributor() -> Iterator[Distributor]:
    running = Distributor().start()
    yield running
    running.stop()


def start(tmp_path: Path, include_preview: bool) -> BrokerThread:
    broker = BrokerThread(tmp_path / "data", {**PUSH, "push.include_preview": include_preview}).start()
    broker.add_users({"alice": "alice-pw", "bob": "bob-pw"})
    return broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    running = start(tmp_path, include_preview=True)
    yield running
    running.stop()


def client(port: int, tmp_path: Path, user: str, device: str = "phone") -> Client:
    return Client(user, f"{user}-pw", device=device, port=port, store=str(tmp_path / f"{user}-{device}.db"))


def register_away(port: int, tmp_path: Path, distributor: Distributor, device: str = "phone") -> None:
    """bob's ``device`` publishes its keys, registers for push (with its preview key) and goes away."""
    phone = client(port, tmp_path, "bob", device)
    try:
        phone.connect()
        phone.register_push("unifiedpush", endpoint=distributor.endpoint(f"bob-{device}"))
    finally:
        phone.close()


def sent_by_alice(port: int, tmp_path: Path, *bodies: str, preview: str | None = None) -> list[str]:
    """The ids of ``bodies`` alice sent bob, each with ``preview`` (None: the SDK's default, the body)."""
    alice = client(port, tmp_path, "alice")
    try:
        alice.connect()
        sent = threading.Semaphore(0)
        alice.on_receipt = lambda receipt: sent.release() if receipt.status == "sent" else None
        ids = []
        for body in bodies:
            ids.append(alice.send("bob", body, preview=preview))
            assert sent.acquire(timeout=WAIT_S), "no 'sent' receipt"
        return ids
    finally:
        alice.close()


def test_the_recipient_opens_the_preview_the_sender_wrote_and_nothing_is_plaintext(
        broker: BrokerThread, tmp_path: Path, distributor: Distributor) -> None:
    recipient_opens_the_preview(broker.port, broker.port, tmp_path, distributor)


def recipient_opens_the_preview(phone_port: int, sender_port: int, tmp_path: Path, distributor: Distributor) -> None:
    """bob's phone registers through ``phone_port`` and goes away; alice sends through ``sender_port``."""
    register_away(phone_port, tmp_path, distributor)
    [mid] = sent_by_alice(sender_port, tmp_path, "the secret body", preview="Alice: see you at 8")
    [request] = distributor.wait(1)
    payload = json.loads(request.body)
    assert set(payload) == {"wake", "preview"} and len(payload["preview"]) <= MAX_PREVIEW_CHARS
    for plain in (b"secret", b"see you", b"alice", b"Alice", mid.encode()):
        assert plain not in request.body
    phone = client(phone_port, tmp_path, "bob")
    try:
        first = phone.decrypt_preview(request.body)  # bob's phone does not know alice's device yet
        assert first is not None and (first.text, first.message_id, first.sender, first.sender_device,
                                      first.verified) == ("Alice: see you at 8", mid, "alice", "phone", False)
        got: list[Message] = []
        phone.on_message = got.append
        assert phone.fetch_pending(timeout=WAIT_S) == 0  # (closes the client)
        assert [(m.id, m.body) for m in got] == [(mid, "the secret body")]
    finally:
        phone.close()
    phone = client(phone_port, tmp_path, "bob")
    try:
        again = phone.decrypt_preview(request.body)  # now it knows alice's device: the signature is checked
        assert again is not None and again.verified and again.text == "Alice: see you at 8"
    finally:
        phone.close()
    laptop = client(phone_port, tmp_path, "bob", "laptop")  # another device of bob's: not its preview
    try:
        assert laptop.decrypt_preview(request.body) is None
    finally:
        laptop.close()


def test_a_preview_key_with_a_forged_signature_is_ignored_by_the_sender(
        broker: BrokerThread, tmp_path: Path, distributor: Distributor) -> None:
    register_away(broker.port, tmp_path, distributor, "laptop")  # honest: the default preview (the body)
    phone = client(broker.port, tmp_path, "bob")
    try:
        phone.connect()
        key = P.public_key(X25519PrivateKey.generate())
        forged = Account().sign(preview_key_object("bob", "phone", key))["signature"]  # not the phone's key
        phone.request(OP_PUSH_REGISTER, {"platform": "unifiedpush", "endpoint": distributor.endpoint("bob-phone"),
                                         "preview_key": key, "preview_sig": forged})
    finally:
        phone.close()
    sent_by_alice(broker.port, tmp_path, "hello bob")
    requests = {r.path: json.loads(r.body) for r in distributor.wait(2)}
    assert requests["/up/bob-phone"] == {"wake": 1}
    laptop = client(broker.port, tmp_path, "bob", "laptop")
    try:
        opened = laptop.decrypt_preview(requests["/up/bob-laptop"])
        assert opened is not None and opened.text == "hello bob"
    finally:
        laptop.close()


def test_with_previews_off_no_payload_carries_one_and_push_db_keeps_none(
        tmp_path: Path, distributor: Distributor) -> None:
    broker = start(tmp_path, include_preview=False)
    made: list[Peer] = []
    try:
        register_away(broker.port, tmp_path, distributor)
        mark = sent_with_a_preview_to_drop(broker.port, made)
        [request] = distributor.wait(1)
        assert json.loads(request.body) == {"wake": 1}
        assert broker.app.push is not None
        assert all(w.preview is None for w in broker.app.push.core.queue.values())
        lister = online_peer(broker.port, made, "alice", "tablet")
        assert "previews" not in lister.request("keys.list", {"user": "bob"})["result"]
        with sqlite3.connect(broker.settings.data_path / "push.db") as db:
            assert db.execute("SELECT COUNT(*) FROM wakes WHERE preview IS NOT NULL").fetchone() == (0,)
        for name in ("push.db", "push.db-wal", "staging.db", "staging.db-wal"):
            path = broker.settings.data_path / name
            assert not path.exists() or mark.encode() not in path.read_bytes()
    finally:
        for peer in made:
            peer.close()
        broker.stop()


def sent_with_a_preview_to_drop(port: int, made: list[Peer]) -> str:
    """alice, a raw client (an SDK would not write a preview for a device without a preview key),
    sends bob's phone a message with a preview the server must drop; returns the preview."""
    mark = "PREVIEWMARK" + secrets.token_hex(20)
    alice = online_peer(port, made, "alice")
    alice.publish("u/alice/out", {"id": "m1", "to": "bob", "type": "olm", "bodies": {"bob.phone": "Zm9v"},
                                  "previews": {"bob.phone": mark}})
    alice.expect(lambda item: item.get("kind") == "receipt" and item.get("status") == "sent")
    return mark


@pytest.mark.parametrize(("previews", "code"), [
    ({"bob.phone": "A" * (MAX_PREVIEW_CHARS + 1)}, "too_large"),
    ({"bob.laptop": "AAAA"}, "bad_envelope"),  # not a device of 'bodies'
    ({"bob.phone": "not base64url!"}, "bad_envelope"),
    ({"bob.phone": ""}, "bad_envelope"),
])
def test_a_preview_too_large_or_for_a_device_not_in_bodies_is_refused(
        broker: BrokerThread, tmp_path: Path, distributor: Distributor, previews: dict[str, str], code: str) -> None:
    register_away(broker.port, tmp_path, distributor)
    made: list[Peer] = []
    try:
        alice = online_peer(broker.port, made, "alice")
        alice.publish("u/alice/out", {"id": "m1", "to": "bob", "type": "olm", "bodies": {"bob.phone": "Zm9v"},
                                      "previews": previews})
        error = alice.expect(lambda item: item.get("kind") == "error")
        assert (error["code"], error.get("ref")) == (code, "m1")
    finally:
        for peer in made:
            peer.close()


def test_the_async_face_registers_its_preview_key_and_opens_previews(
        broker: BrokerThread, tmp_path: Path, distributor: Distributor) -> None:
    async def register() -> None:
        phone = AsyncClient("bob", "bob-pw", device="phone", port=broker.port, store=str(tmp_path / "bob-phone.db"))
        try:
            await phone.connect()
            await phone.register_push("unifiedpush", endpoint=distributor.endpoint("bob-phone"))
        finally:
            await phone.close()

    async def opened(body: bytes) -> PushPreview | None:
        phone = AsyncClient("bob", "bob-pw", device="phone", port=broker.port, store=str(tmp_path / "bob-phone.db"))
        try:
            return await phone.decrypt_preview(body)
        finally:
            await phone.close()

    asyncio.run(register())
    [mid] = sent_by_alice(broker.port, tmp_path, "hi from the async test")
    [request] = distributor.wait(1)
    shown = asyncio.run(opened(request.body))
    assert shown is not None and (shown.text, shown.message_id) == ("hi from the async test", mid)


def test_web_push_carries_the_preview_inside_the_browser_s_encryption(tmp_path: Path) -> None:
    """Through the broker to a local Web Push service that checks VAPID and decrypts each body with
    the subscription's key (as the browser would). The endpoint names ``localhost``: the broker
    resolves it, connects to the address it checked, and TLS still verifies the name."""
    vapid, tls = ec.generate_private_key(ec.SECP256R1()), make_tls(tmp_path)
    (tmp_path / "vapid.pem").write_bytes(pem(vapid))
    fake = FakeWebPush(PushClock(), webpush.public_point(vapid))
    broker = BrokerThread(tmp_path / "data", {
        **PUSH, "push.include_preview": True,
        "push.webpush": {"vapid_private_key_file": str(tmp_path / "vapid.pem"), "subject": "mailto:ops@example.org",
                         "verify": str(tls.ca_file)}}).start()
    loop = asyncio.new_event_loop()  # the service's own: it closes after the broker's connections to it
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(HttpsServer(fake.handle, tls).start(), loop).result(WAIT_S)
    try:
        broker.add_users({"alice": "alice-pw", "bob": "bob-pw"})
        fake.origin = f"https://localhost:{server.port}"
        browser = fake.subscribe("bob")
        phone = client(broker.port, tmp_path, "bob")
        try:
            phone.connect()
            phone.register_push("webpush", subscription=json.loads(browser.subscription()))
        finally:
            phone.close()
        [mid] = sent_by_alice(broker.port, tmp_path, "the secret body", preview="Alice: web")
        eventually(lambda: len(fake.received) == 1, what="a Web Push")
        [(_headers, plaintext)] = fake.received
        assert b"secret" not in server.requests[0].body and b"secret" not in plaintext
        phone = client(broker.port, tmp_path, "bob")
        try:
            shown = phone.decrypt_preview(plaintext)  # what the service worker hands the app
            assert shown is not None and (shown.text, shown.message_id) == ("Alice: web", mid)
        finally:
            phone.close()
        assert fake.faults == []
    finally:
        broker.stop()
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)
        loop.close()
