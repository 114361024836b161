"""A message to a user who never logged in (PROTOCOL.md section 6, rule 3; SDK.md "Pending
messages"), through the real broker and SDK: nothing can be encrypted for carol yet, so alice's
SDK keeps the message as ``pending`` (a Receipt, not an error), keeps it across a restart, lets
messages to others go on, never lets a later message to carol overtake it, and sends it once
carol's first device has published keys (at once when carol writes, else at the next poll)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from client_sdk import AsyncClient
from client_sdk.events import PENDING, ErrorEvent, Message, Receipt
from tests.helpers import BrokerThread
from tests.sdk.conftest import Collector, Factory, LogWatch

DEPLOYMENTS = ("single", "cluster")  # tests/conftest.py: each broker test runs on both


def online(make_client: Factory, user: str, device: str, **options: Any) -> Collector:
    client = make_client(user, device=device, **options)
    collector = Collector(client)
    client.connect()
    return collector


def pending_ids(alice: Collector, wanted: set[str]) -> set[str]:
    """Collect ``pending`` receipts until they name every id of ``wanted``."""
    seen: set[str] = set()
    while not wanted <= seen:
        receipt = alice.next(Receipt, where=lambda r: r.status == PENDING)
        assert receipt.peer == "carol"
        seen.update(receipt.ids)
    return seen


def statuses(alice: Collector, ids: list[str], status: str) -> None:
    """Wait for ``status`` receipts covering every id of ``ids``."""
    left = set(ids)
    while left:
        left -= set(alice.next(Receipt, where=lambda r: r.status == status).ids)


def test_message_to_a_user_who_never_logged_in_waits_for_her_first_device(
        make_client: Factory, broker: BrokerThread) -> None:
    broker.add_user("carol", "carol-pw")
    alice = online(make_client, "alice", "phone", store="alice.db")
    laptop = online(make_client, "alice", "laptop", store="alice-laptop.db")
    bob = online(make_client, "bob", "phone")

    first = alice.client.send("carol", "first", "text")
    second = alice.client.send("carol", "second", "text")
    to_bob = alice.client.send("bob", "not held up", "text")
    assert bob.next(Message).id == to_bob, "a message to someone else does not wait behind carol's"
    assert pending_ids(alice, {first, second}) == {first, second}
    statuses(alice, [to_bob], "sent")
    assert alice.client.outbox() == [first, second]
    assert not [e for e in alice.all_now() if isinstance(e, ErrorEvent)], "pending, not failed"

    alice.client.close()  # the app restarts: the held messages are still there, still pending
    alice = online(make_client, "alice", "phone", store="alice.db")
    assert pending_ids(alice, {first, second}) == {first, second}
    third = alice.client.send("carol", "third", "text")  # must not overtake the held ones
    pending_ids(alice, {third})

    carol = online(make_client, "carol", "phone")  # her first device publishes keys...
    carol.client.send("alice", "hi, I'm here", "text")  # ...and writes: alice's SDK tries at once
    assert alice.next(Message).body == "hi, I'm here"
    assert [(m.id, m.body, m.encrypted) for m in carol.messages(3)] == \
        [(first, "first", True), (second, "second", True), (third, "third", True)]
    statuses(alice, [first, second, third], "sent")
    statuses(alice, [first, second, third], "delivered")
    assert alice.client.outbox() == []
    fourth = alice.client.send("carol", "fourth", "text")
    assert carol.next(Message).id == fourth
    history = [m.id for m in laptop.messages(6) if m.to == "carol"]  # and to_bob, and carol's hi
    assert history == [first, second, third, fourth], "alice's other device gets the history copies in order"
    assert not [e for e in alice.all_now() if isinstance(e, ErrorEvent)]


def test_held_message_goes_out_at_the_next_poll_when_the_recipient_stays_silent(
        make_client: Factory, broker: BrokerThread) -> None:
    broker.add_user("carol", "carol-pw")
    alice = online(make_client, "alice", "phone", hold_retry=(0.2, 0.5))
    mid = alice.client.send("carol", "waiting for you", "text")
    pending_ids(alice, {mid})
    carol = online(make_client, "carol", "phone")  # publishes keys, says nothing
    assert carol.next(Message).id == mid
    statuses(alice, [mid], "delivered")


async def test_async_client_reports_a_held_message_as_pending(broker: BrokerThread, tmp_path: Path) -> None:
    broker.add_user("carol", "carol-pw")
    async with AsyncClient("alice", "alice-pw", device="tablet", port=broker.port,
                           store=tmp_path / "alice.db") as alice:
        mid = await alice.send("carol", "are you there?", "text")
        async for event in alice.events():
            assert not isinstance(event, ErrorEvent), event
            if isinstance(event, Receipt) and event.status == PENDING:
                assert (event.ids, event.peer) == ((mid,), "carol")
                break
        assert alice.outbox() == [mid]


def test_servers_no_keys_after_the_only_device_was_removed_holds_the_message(
        make_client: Factory, broker: BrokerThread) -> None:
    broker.add_user("carol", "carol-pw")
    alice = online(make_client, "alice", "phone", hold_retry=(0.2, 0.5))
    phone = online(make_client, "carol", "phone")
    alice.client.send("carol", "hello phone", "text")
    assert phone.next(Message).body == "hello phone"  # alice's SDK now has carol's list, with the phone
    plain = online(make_client, "carol", "laptop", encryption=False)  # a device without keys
    phone.client.close()
    plain.client.remove_device("phone")  # carol has no device with keys now; alice's SDK does not know it
    with LogWatch("client_sdk.engine", "held until the recipient has keys") as watch:
        mid = alice.client.send("carol", "after the removal", "text")
        pending_ids(alice, {mid})
        watch.wait()  # it was the server that said no_keys
    assert alice.client.outbox() == [mid]
    tablet = online(make_client, "carol", "tablet")
    assert tablet.next(Message).id == mid
    statuses(alice, [mid], "delivered")
    assert not [e for e in alice.all_now() if isinstance(e, ErrorEvent)]
