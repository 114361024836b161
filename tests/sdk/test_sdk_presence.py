"""Presence through the SDK and the real broker (online window 30 s, or 1 s where a test needs it to run out).

Proves: ``set_foreground(True)`` makes a user online and its heartbeats keep her
online across several windows; ``set_foreground(False)`` ends it; watchers get
``Presence`` events at ``on_presence`` (``Client``) and from ``events()``
(``AsyncClient``); the watch list is sent again after a reconnect and a
foreground client heartbeats at once after its reconnect; privacy, contacts and
presence requests work through the API, long user lists are split into several
requests, and a refused watch is not kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client_sdk import AsyncClient, Client, Presence, Privacy, RequestError
from testkit.proxy import MqttProxy
from tests.deployment import start_broker
from tests.helpers import BrokerThread, eventually
from tests.sdk.conftest import Collector, Factory

DEPLOYMENTS = ("single", "cluster")  # tests/conftest.py: each broker test runs on both

WAIT_S = 15.0
SHORT_S = 1.0  # the online window for tests that need it to run out
HB_S = 0.2


@pytest.fixture
def window_s() -> float:
    """The broker's online window; a test parametrizes it to SHORT_S when it must run out."""
    return 30.0


@pytest.fixture
def broker(tmp_path: Path, window_s: float, deployment: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """This module's broker (replaces the conftest fixture): the window of ``window_s``."""
    overrides = {"presence.online_window_s": window_s, "presence.coalesce_ms": 100, "presence.max_watched": 300}
    running = start_broker(deployment, tmp_path, request, overrides)
    running.add_users({name: f"{name}-pw" for name in ("alice", "bob", "mallory")})
    yield running
    running.stop()


@pytest.fixture
def proxy(broker: BrokerThread) -> Iterator[MqttProxy]:
    running = MqttProxy(broker.port).start()
    yield running
    running.stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


def is_alice(online: bool | None) -> Any:
    return lambda p: p.user == "alice" and p.online is online


@pytest.mark.parametrize("window_s", [SHORT_S])
def test_foreground_heartbeats_keep_a_user_online_until_the_background(make_client: Factory) -> None:
    alice = make_client("alice", heartbeat_interval=HB_S)
    bob = make_client("bob")
    events = Collector(bob)
    alice.connect(timeout=10)
    bob.connect(timeout=10)
    alice.set_privacy("everyone")
    bob.set_privacy("everyone")
    assert bob.watch_presence(["alice"]) == {"alice": Presence("alice", False, None)}

    alice.set_foreground(True)
    came = events.next(Presence, WAIT_S, is_alice(True))
    # Three windows long, heartbeats every 0.2 s keep her online: no offline event meanwhile.
    with pytest.raises(AssertionError):
        events.next(Presence, 3 * SHORT_S, is_alice(False))
    now = bob.presence(["alice"])["alice"]
    assert now.online is True and now.last_seen is not None and now.last_seen > (came.last_seen or 0)

    alice.set_foreground(False)
    gone = events.next(Presence, WAIT_S, is_alice(False))
    assert gone.last_seen is not None and gone.last_seen >= now.last_seen
    assert bob.presence(["alice"]) == {"alice": gone}


def test_watching_is_renewed_after_a_reconnect(broker: BrokerThread, proxy: MqttProxy, make_client: Factory,
                                               clients: list[Client]) -> None:
    alice = make_client("alice", heartbeat_interval=HB_S)
    alice.connect(timeout=10)
    alice.set_privacy("everyone")
    bob = Client("bob", "bob-pw", device="phone", port=proxy.port, reconnect_delay=(0.1, 0.5))
    clients.append(bob)
    events = Collector(bob)
    bob.connect(timeout=10)
    bob.set_privacy("everyone")
    bob.watch_presence(["alice"])

    proxy.cut_all()  # bob's connection dies; the server forgets his watch list with it
    # After the reconnect the SDK watches again and hands over the state it got back.
    assert events.next(Presence, WAIT_S, is_alice(False)) == Presence("alice", False, None)
    alice.set_foreground(True)
    assert events.next(Presence, WAIT_S, is_alice(True)).last_seen is not None
    alice.set_foreground(False)
    events.next(Presence, WAIT_S, is_alice(False))


@pytest.mark.parametrize("window_s", [SHORT_S])
def test_a_foreground_client_is_online_again_right_after_its_reconnect(
        broker: BrokerThread, proxy: MqttProxy, make_client: Factory, clients: list[Client]) -> None:
    # Heartbeats every 30 s against a window of 1 s: only the heartbeat sent on reconnect can
    # bring alice back online while this test waits.
    alice = Client("alice", "alice-pw", device="phone", port=proxy.port, reconnect_delay=(0.1, 0.5),
                   heartbeat_interval=30.0)
    clients.append(alice)
    alice.connect(timeout=10)
    alice.set_privacy("everyone")
    bob = make_client("bob")
    events = Collector(bob)
    bob.connect(timeout=10)
    bob.set_privacy("everyone")
    bob.watch_presence(["alice"])
    alice.set_foreground(True)
    first = events.next(Presence, WAIT_S, is_alice(True))
    events.next(Presence, WAIT_S, is_alice(False))  # the window of 1 s runs out
    proxy.cut_all()
    again = events.next(Presence, WAIT_S, is_alice(True))
    assert again.last_seen is not None and first.last_seen is not None and again.last_seen > first.last_seen


def test_privacy_contacts_and_presence_requests(make_client: Factory) -> None:
    alice = make_client("alice", heartbeat_interval=HB_S)
    bob = make_client("bob")
    alice.connect(timeout=10)
    bob.connect(timeout=10)
    assert alice.privacy() == Privacy("contacts", ())
    assert alice.add_contacts(["bob", "mallory", "bob"]) == 2
    assert alice.privacy() == Privacy("contacts", ("bob", "mallory"))
    alice.set_foreground(True)  # the first heartbeat is published before this returns ...
    alice.request("ping")  # ... so alice's node has handled it once this is answered (one connection, in order)
    # In cluster mode bob may be on another node, which learns it a Redis write later (PROTOCOL
    # section 8, "Cluster mode"): on one process the first answer already says online.
    eventually(lambda: bob.presence(["alice"])["alice"].online is True, what="alice online for bob")

    # bob is in alice's list, but his default ("contacts", empty list) hides his own from her:
    shown = bob.presence(["alice", "zoe"])
    assert shown["alice"].online is True and shown["alice"].last_seen is None
    assert shown["zoe"] == Presence("zoe", None, None)
    assert bob.add_contacts(["alice"]) == 1
    assert bob.presence(["alice"])["alice"].last_seen is not None
    assert alice.remove_contacts(["bob"]) == 1
    assert bob.presence(["alice"])["alice"] == Presence("alice", None, None)
    alice.set_privacy("everyone")
    assert bob.presence(["alice"])["alice"].online is True

    many = [f"user{i}" for i in range(300)]
    assert len(bob.presence(many)) == 300, "two requests of at most 256 users"
    with pytest.raises(ValueError, match="user ids"):
        bob.presence(["Alice"])
    with pytest.raises(ValueError, match="last_seen"):
        bob.set_privacy("friends")


def test_a_refused_watch_is_not_kept(make_client: Factory) -> None:
    bob = make_client("bob")
    bob.connect(timeout=10)
    users = [f"user{i}" for i in range(301)]
    with pytest.raises(RequestError) as refused:
        bob.watch_presence(users)  # 256 accepted, then 45 more would be 301 > 300
    assert refused.value.code == "too_large"
    assert bob._engine.watched() == users[:256]
    bob.unwatch_presence(users[:10])
    assert bob._engine.watched() == users[10:256]


async def test_async_client_presence_events(broker: BrokerThread) -> None:
    async with AsyncClient("alice", "alice-pw", device="phone", port=broker.port, heartbeat_interval=HB_S) as alice, \
            AsyncClient("bob", "bob-pw", device="laptop", port=broker.port) as bob:
        await alice.set_privacy("everyone")
        await bob.set_privacy("everyone")
        assert await bob.watch_presence(["alice"]) == {"alice": Presence("alice", False, None)}
        await alice.set_foreground(True)

        presences: asyncio.Queue[Presence] = asyncio.Queue()

        async def read() -> None:  # one reader for the client's whole life, as an app does
            async for event in bob.events():
                if isinstance(event, Presence):
                    await presences.put(event)

        reader = asyncio.create_task(read())

        async def next_presence(online: bool) -> Presence:
            while True:
                event = await presences.get()
                if event.user == "alice" and event.online is online:
                    return event

        came = await asyncio.wait_for(next_presence(True), WAIT_S)
        await alice.set_foreground(False)
        gone = await asyncio.wait_for(next_presence(False), WAIT_S)
        assert came.last_seen is not None and gone.last_seen is not None and gone.last_seen >= came.last_seen
        assert await bob.presence(["alice"]) == {"alice": gone}
        assert await alice.add_contacts(["bob"]) == 1
        assert (await alice.privacy()).contacts == ("bob",)
        assert await alice.remove_contacts(["bob"]) == 0
        await bob.unwatch_presence(["alice"])
    await asyncio.wait_for(reader, WAIT_S)  # closing ends events()
