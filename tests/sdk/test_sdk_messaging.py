"""End-to-end messaging through the SDK and the real server, as PROTOCOL.md
promises it: an online message and its receipts sent -> delivered -> seen; a
200-message offline backlog arriving once and in order; an outbox that survives
a restart of the sending app; every device of a recipient getting each message;
callbacks that use the client (from the dispatcher thread); permanent errors
reported with the message id; rate-limited messages retried until sent; an item
the app never finished with handed over again (once) after a restart; and the
asyncio client both ways."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from client_sdk import AsyncClient, Client, ErrorEvent, Message, Receipt
from client_sdk.events import Event
from tests.deployment import start_broker
from tests.helpers import BrokerProcess
from tests.sdk.conftest import Collector, Factory, LogWatch

DEPLOYMENTS = ("single", "cluster")  # tests/conftest.py: each broker test runs on both

WAIT_S = 15.0


@pytest.fixture
def broker(tmp_path: Path, deployment: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """These tests need no broker internals: the broker runs as its own process, as in production
    (or as three cluster nodes behind HAProxy)."""
    users = {name: f"{name}-pw" for name in ("alice", "bob", "mallory")}
    if deployment == "cluster":
        running = start_broker(deployment, tmp_path, request)
        running.add_users(users)
    else:  # users first: the process reads its data folder
        running = BrokerProcess(tmp_path / "data")
        running.add_users(users)
        running.start()
    yield running
    running.stop()


def receipts_for(events: Collector, msg_id: str, count: int) -> list[str]:
    """Statuses of the next ``count`` receipts naming ``msg_id``, in arrival order."""
    return [events.next(Receipt, WAIT_S, lambda r: msg_id in r.ids).status for _ in range(count)]


def test_online_message_then_sent_delivered_seen(make_client: Factory) -> None:
    bob = make_client("bob", store="bob.db")
    bob_events = Collector(bob)
    bob.connect(timeout=10)
    alice = make_client("alice", store="alice.db")
    alice_events = Collector(alice)
    alice.connect(timeout=10)

    mid = alice.send("bob", "hi")
    message = bob_events.next(Message, WAIT_S)
    assert (message.id, message.sender, message.to, message.body, message.type) == (mid, "alice", "bob", "hi", "text")
    assert message.seq > 0 and message.ts > 0
    assert receipts_for(alice_events, mid, 2) == ["sent", "delivered"]
    bob.mark_seen("alice", [mid])
    seen = alice_events.next(Receipt, WAIT_S, lambda r: mid in r.ids)
    assert (seen.status, seen.peer) == ("seen", "bob")
    assert alice.outbox() == []


def test_offline_backlog_of_200_arrives_once_in_order(make_client: Factory) -> None:
    first = make_client("bob", store="bob.db")
    first.connect(timeout=10)  # bob's phone becomes known to the server ...
    first.close()  # ... and goes offline

    alice = make_client("alice", store="alice.db")
    alice_events = Collector(alice)
    alice.connect(timeout=10)
    ids = [alice.send("bob", f"n{i}") for i in range(200)]
    confirmed: set[str] = set()
    while not set(ids) <= confirmed:
        confirmed.update(alice_events.next(Receipt, WAIT_S, lambda r: r.status == "sent").ids)
    assert alice.outbox() == []

    bob = make_client("bob", store="bob.db")
    bob_events = Collector(bob)
    bob.connect(timeout=10)
    got = bob_events.messages(200, timeout=30)
    assert [m.id for m in got] == ids
    assert [m.body for m in got] == [f"n{i}" for i in range(200)]
    assert all(a.seq < b.seq for a, b in itertools.pairwise(got))
    # Exactly once: a message sent now is queued behind the backlog (rule 4), so
    # any repeat of the backlog would be handed over before it.
    marker = alice.send("bob", "marker")
    assert bob_events.next(Message, WAIT_S).id == marker


def test_outbox_survives_a_restart_of_the_sending_app(make_client: Factory) -> None:
    bob = make_client("bob", store="bob.db")
    bob_events = Collector(bob)
    bob.connect(timeout=10)

    killed = make_client("alice", store="alice.db")
    mid = killed.send("bob", "written while offline")  # never connected: only stored
    assert killed.outbox() == [mid]
    killed.close()

    alice = make_client("alice", store="alice.db")
    assert alice.outbox() == [mid]
    alice_events = Collector(alice)
    alice.connect(timeout=10)
    message = bob_events.next(Message, WAIT_S)
    assert (message.id, message.body) == (mid, "written while offline")
    alice_events.next(Receipt, WAIT_S, lambda r: r.status == "sent" and mid in r.ids)
    assert alice.outbox() == []
    marker = alice.send("bob", "marker")
    assert bob_events.next(Message, WAIT_S).id == marker  # the restarted message came once


def test_every_device_of_the_recipient_gets_each_message(make_client: Factory) -> None:
    phone, laptop = make_client("bob", device="phone"), make_client("bob", device="laptop")
    on_phone, on_laptop = Collector(phone), Collector(laptop)
    phone.connect(timeout=10)
    laptop.connect(timeout=10)
    alice = make_client("alice")
    alice.connect(timeout=10)
    ids = [alice.send("bob", f"to both {i}") for i in range(3)]
    assert [m.id for m in on_phone.messages(3, WAIT_S)] == ids
    assert [m.id for m in on_laptop.messages(3, WAIT_S)] == ids


def test_callbacks_run_in_the_dispatcher_thread_and_may_use_the_client(make_client: Factory) -> None:
    bob = make_client("bob")
    threads: list[str] = []

    def echo(message: Message) -> None:  # a bot: answers every message from inside the callback
        threads.append(threading.current_thread().name)
        bob.ping()
        bob.send(message.sender, f"echo: {message.body}")
        bob.mark_seen(message.sender, [message.id])

    bob.on_message = echo
    bob.connect(timeout=10)
    alice = make_client("alice")
    alice_events = Collector(alice)
    alice.connect(timeout=10)
    mid = alice.send("bob", "ping?")
    assert alice_events.next(Message, WAIT_S).body == "echo: ping?"
    alice_events.next(Receipt, WAIT_S, lambda r: r.status == "seen" and mid in r.ids)
    assert threads == ["chat-dispatch-bob.phone"]


def test_permanent_error_is_reported_with_the_message_id(make_client: Factory) -> None:
    alice = make_client("alice")
    events = Collector(alice)
    alice.connect(timeout=10)
    mid = alice.send("nobody", "hello?")
    error = events.next(ErrorEvent, WAIT_S, lambda e: e.ref == mid)
    assert error.code == "unknown_recipient"
    assert alice.outbox() == []


async def next_of(events: AsyncIterator[Event], kind: type[Any], where: Any = lambda e: True) -> Any:
    async def find() -> Any:
        async for event in events:
            if isinstance(event, kind) and where(event):
                return event
        raise AssertionError("the event stream ended")

    return await asyncio.wait_for(find(), WAIT_S)


async def test_item_not_finished_by_the_app_is_handed_over_again_once(
    broker: BrokerProcess, make_client: Factory, tmp_path: Any
) -> None:
    crashing = AsyncClient("bob", "bob-pw", device="phone", port=broker.port, store=tmp_path / "bob.db")
    await crashing.connect(timeout=10)
    alice = make_client("alice")
    alice.connect(timeout=10)
    mid = alice.send("bob", "survives a crash")
    stream = crashing.events()
    first = await next_of(stream, Message)
    assert first.id == mid
    await crashing.close()  # the app "dies" while still busy with the message: never finished, never acked
    await stream.aclose()

    bob = make_client("bob", store="bob.db")
    bob_events = Collector(bob)
    bob.connect(timeout=10)
    again = bob_events.next(Message, WAIT_S)
    assert (again.id, again.seq) == (mid, first.seq)
    marker = alice.send("bob", "marker")
    assert bob_events.next(Message, WAIT_S).id == marker  # handed over again exactly once


class Reader:
    """Reads a client's events() in a task, as an app does, into a queue the test can wait on."""

    def __init__(self, client: AsyncClient) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.stash: list[Event] = []
        self.task = asyncio.create_task(self._read(client))

    async def _read(self, client: AsyncClient) -> None:
        async for event in client.events():
            await self.queue.put(event)

    async def next(self, kind: type[Any], where: Any = lambda e: True) -> Any:
        """The first event (in arrival order) of ``kind`` matching ``where``; others stay for later calls."""
        def match(event: Event) -> bool:
            return isinstance(event, kind) and bool(where(event))

        for index, event in enumerate(self.stash):
            if match(event):
                return self.stash.pop(index)

        async def find() -> Any:
            while True:
                event = await self.queue.get()
                if match(event):
                    return event
                self.stash.append(event)

        return await asyncio.wait_for(find(), WAIT_S)


async def test_async_clients_chat_both_ways(broker: BrokerProcess) -> None:
    async with AsyncClient("alice", "alice-pw", device="phone", port=broker.port) as alice, \
            AsyncClient("bob", "bob-pw", device="laptop", port=broker.port) as bob:
        at_alice, at_bob = Reader(alice), Reader(bob)
        mid = await alice.send("bob", "hello bob")
        got = await at_bob.next(Message)
        assert (got.id, got.sender, got.to, got.body) == (mid, "alice", "bob", "hello bob")
        await bob.mark_seen("alice", [got.id])
        reply = await bob.send("alice", "hello alice")
        back = await at_alice.next(Message)
        assert (back.id, back.sender, back.body) == (reply, "bob", "hello alice")
        await alice.mark_seen("bob", [back.id])
        statuses = [(await at_alice.next(Receipt, lambda r: mid in r.ids)).status for _ in range(3)]
        assert statuses == ["sent", "delivered", "seen"]
        assert (await at_bob.next(Receipt, lambda r: reply in r.ids and r.status == "seen")).peer == "alice"
    # closing ends the event streams
    await asyncio.wait_for(asyncio.gather(at_alice.task, at_bob.task), WAIT_S)


def test_rate_limited_messages_are_retried_until_sent(tmp_path: Any) -> None:
    # A server that takes 5 messages at once and 50/s after: most of a quick
    # burst of 30 is refused 'rate_limited' (transient), and the SDK retries.
    server = BrokerProcess(tmp_path / "data", {"limits.send_burst": 5, "limits.send_rate_per_s": 50.0})
    server.add_users({"alice": "alice-pw", "bob": "bob-pw"})
    server.start()
    clients: list[Client] = []
    try:
        bob = Client("bob", "bob-pw", device="phone", port=server.port)
        alice = Client("alice", "alice-pw", device="phone", port=server.port)
        clients += [bob, alice]
        bob_events, alice_events = Collector(bob), Collector(alice)
        bob.connect(timeout=10)
        alice.connect(timeout=10)
        with LogWatch("client_sdk.engine", ": rate_limited (") as refused:
            ids = [alice.send("bob", f"burst {i}") for i in range(30)]
            got = bob_events.messages(30, timeout=30)
        assert refused.count > 0  # the server did refuse some, and they came through anyway
        assert sorted(m.id for m in got) == sorted(ids)  # each exactly once; retried ones may come later
        confirmed: set[str] = set()
        while not set(ids) <= confirmed:
            confirmed.update(alice_events.next(Receipt, WAIT_S, lambda r: r.status == "sent").ids)
        assert alice.outbox() == []
        assert not any(isinstance(e, ErrorEvent) for e in alice_events.all_now())  # transient: not reported
    finally:
        for client in clients:
            client.close()
        server.stop()
