"""The SDK against the real broker (connection, auth and requests, no messaging):
password login, clear errors instead of retry loops for bad credentials and bad
ids, requests and their errors, device tokens (obtained, used on the next connect,
fallback to the password when refused), reconnect after a drop, a reconnect refused
for good (stops and reports), and the asyncio face."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import client_sdk.engine
from broker import credentials
from client_sdk import (
    AsyncClient,
    AuthError,
    ClientClosed,
    ConnectTimeout,
    ErrorEvent,
    IdentifierRejected,
    NotConnected,
    RequestError,
)
from client_sdk.localstore import LocalStore
from tests.helpers import BrokerThread, Peer, free_port
from tests.sdk.conftest import Collector, Factory, LogWatch


def stored_token(path: Path, identity: tuple[str, str] = ("alice", "phone")) -> str | None:
    """The device token in a closed client's store (sealed at rest: opened with the store's key file)."""
    store = LocalStore(path, *identity)
    try:
        store.unlock(None)
        return store.token()
    finally:
        store.close()


def net_thread(cid: str) -> threading.Thread | None:
    return next((t for t in threading.enumerate() if t.name == f"chat-net-{cid}"), None)


def test_connect_with_password_and_ping(make_client: Factory) -> None:
    alice = make_client("alice")
    assert not alice.connected
    alice.connect(timeout=10)
    assert alice.connected
    rtt = alice.ping()
    assert 0 < rtt < 5
    alice.close()
    assert not alice.connected
    alice.close()  # idempotent


def test_wrong_password_raises_auth_error_without_retrying(make_client: Factory) -> None:
    alice = make_client("alice", "not-the-password")
    with LogWatch("broker.auth", "login failed: user 'alice'") as failures:
        start = time.monotonic()
        with pytest.raises(AuthError) as caught:
            alice.connect(timeout=10)
        assert time.monotonic() - start < 3
        assert caught.value.code == 5
        thread = net_thread("alice.phone")
        if thread is not None:  # the network thread ends instead of retrying
            thread.join(5)
            assert not thread.is_alive()
        assert failures.count == 1
    assert not alice.connected


def test_bad_device_id_raises_before_connecting(make_client: Factory) -> None:
    with pytest.raises(IdentifierRejected):
        make_client("alice", device="ph.one")
    with pytest.raises(ValueError, match="user id"):
        make_client("Alice")


def test_server_refusing_the_client_id_raises_identifier_rejected(
    make_client: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An SDK without the local check: the server's CONNACK 2 must map to the same error.
    monkeypatch.setattr(client_sdk.engine, "validate_identity", lambda user, device: None)
    client = make_client("alice", device="ph.one")
    with pytest.raises(IdentifierRejected) as caught:
        client.connect(timeout=10)
    assert caught.value.code == 2


def test_unreachable_server_gives_connect_timeout() -> None:
    client = client_sdk.Client("alice", "alice-pw", device="phone", port=free_port(), reconnect_delay=(0.1, 0.2))
    try:
        with pytest.raises(ConnectTimeout) as caught:
            client.connect(timeout=1.0)
        assert isinstance(caught.value, TimeoutError)
        assert isinstance(caught.value.__cause__, OSError)
        thread = net_thread("alice.phone")
        if thread is not None:  # connect() gave up: nothing keeps trying in the background
            thread.join(5)
            assert not thread.is_alive()
    finally:
        client.close()


def test_requests_and_their_errors(make_client: Factory) -> None:
    alice = make_client("alice")
    with pytest.raises(NotConnected):
        alice.request("ping")
    alice.connect(timeout=10)
    assert isinstance(alice.request("ping")["pong"], int)
    with pytest.raises(RequestError) as caught:
        alice.request("no.such.op")
    assert caught.value.code == "unknown_op"
    with pytest.raises(RequestError) as caught:
        alice.request("ping", {"unexpected": 1})
    assert caught.value.code == "bad_envelope"
    alice.close()
    with pytest.raises(ClientClosed):
        alice.request("ping")
    with pytest.raises(ClientClosed):
        alice.send("bob", "hi")


def test_device_token_is_obtained_and_used_next_time(make_client: Factory, tmp_path: Path) -> None:
    first = make_client("alice", store="alice-phone.db")
    with LogWatch("broker.auth", "login ok: alice.phone by password") as by_password:
        first.connect(timeout=10)
        assert by_password.count == 1
    first.close()
    token = stored_token(tmp_path / "alice-phone.db")
    assert token is not None and token.startswith("dt1.")

    with LogWatch("broker.auth", "login ok: alice.phone by device token") as by_token:
        second = make_client("alice", "wrong-password-is-not-needed", store="alice-phone.db")
        second.connect(timeout=10)
        assert by_token.count == 1
        second.ping()
    second.close()
    assert stored_token(tmp_path / "alice-phone.db") == token  # a token login keeps the token


def test_refused_token_falls_back_to_password_once_then_renews(make_client: Factory, tmp_path: Path) -> None:
    path = tmp_path / "alice-phone.db"
    first = make_client("alice", store="alice-phone.db")
    first.connect(timeout=10)
    old = stored_token(path)
    assert first.request("auth.revoke") == {"revoked": 1}
    first.close()

    with LogWatch("broker.auth", "login failed: user 'alice'") as failed, \
            LogWatch("broker.auth", "login ok: alice.phone by password") as by_password:
        second = make_client("alice", store="alice-phone.db")
        second.connect(timeout=10)
        assert (failed.count, by_password.count) == (1, 1)
    second.close()
    new = stored_token(path)
    assert new is not None and new != old

    with LogWatch("broker.auth", "login ok: alice.phone by device token") as by_token:
        make_client("alice", store="alice-phone.db").connect(timeout=10)
        assert by_token.count == 1


def test_refused_token_and_wrong_password_is_an_auth_error(make_client: Factory, tmp_path: Path) -> None:
    first = make_client("alice", store="a.db")
    first.connect(timeout=10)
    first.request("auth.revoke")
    first.close()
    with pytest.raises(AuthError):
        make_client("alice", "wrong", store="a.db").connect(timeout=10)
    assert stored_token(tmp_path / "a.db") is None  # the refused token is forgotten


def test_reconnects_after_the_connection_is_taken_over(make_client: Factory, peers: list[Peer],
                                                       broker: BrokerThread) -> None:
    alice = make_client("alice", store="a.db")
    alice.connect(timeout=10)
    with LogWatch("broker.auth", "login ok: alice.phone by device token") as back, \
            LogWatch("client_sdk.connection", "alice.phone: disconnected") as dropped:
        intruder = Peer(broker.port, "alice", "alice-pw", device="phone")
        peers.append(intruder)
        assert intruder.connect() == 0  # the server closes the SDK's connection ...
        dropped.wait()
        back.wait()  # ... and the SDK comes back by itself, with its token
    assert alice.ping() < 5
    assert alice.connected


async def test_async_client_ping_and_errors(broker: BrokerThread) -> None:
    async with AsyncClient("alice", "alice-pw", device="laptop", port=broker.port) as alice:
        assert alice.connected
        assert 0 < await alice.ping() < 5
        assert isinstance((await alice.request("ping"))["pong"], int)
        with pytest.raises(RequestError):
            await alice.request("no.such.op")
        assert alice._pending == {}  # every pending future is removed, answered or not
    assert not alice.connected
    with pytest.raises(ClientClosed):
        await alice.send("bob", "hi")
    bad = AsyncClient("alice", "wrong", device="laptop", port=broker.port)
    with pytest.raises(AuthError):
        await bad.connect(timeout=10)
    await bad.close()


def test_reconnect_refused_for_good_stops_and_reports(make_client: Factory, peers: list[Peer],
                                                      broker: BrokerThread) -> None:
    alice = make_client("alice")
    events = Collector(alice)
    alice.connect(timeout=10)
    # The password changes (which revokes the device token), then the connection drops.
    broker.call(broker.app.users.set_password("alice", credentials.hash_password("new-pw")))
    with LogWatch("broker.auth", "login failed: user 'alice'") as failures:
        intruder = Peer(broker.port, "alice", "new-pw", device="phone")
        peers.append(intruder)
        assert intruder.connect() == 0
        stopped = events.next(ErrorEvent)
        assert stopped.code == "auth_failed" and stopped.ref is None
        assert failures.count == 2  # the token once, then the password once: no retry loop
    thread = net_thread("alice.phone")
    if thread is not None:
        thread.join(5)
        assert not thread.is_alive()
    assert not alice.connected
