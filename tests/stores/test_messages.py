"""The ``MessageStore`` contract (bridge/messaging/store.py): per-device queues of staged items, bodies kept
once per message and read back by id, olm ciphertexts per item, acks that delete, remembered ids that
expire, a boot counter that only grows, batches written whole or not at all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.messaging.records import SEQ_SPAN, FlushBatch, Item, StagedMessage
from bridge.messaging.store import MessageStore
from bridge.store import StoreError
from tests.stores.backends import SQLITE_ONLY, Backend

# No Redis message store yet: #16 reshapes what loads everything at start (MessageStore.load) first.
STORE_BACKENDS = SQLITE_ONLY

FAR = 10**13  # an expiry that never comes
RECEIPT: dict[str, Any] = {"status": "delivered", "ids": ["m1"], "peer": "bob", "ts": 7}


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[MessageStore]:
    opened = await backend.messages()
    try:
        yield opened
    finally:
        await opened.close()


def message(mid: int, body: str = "hello", **fields: Any) -> StagedMessage:
    return StagedMessage(mid, "alice", f"m{mid}", "bob", "text", body, 5, FAR, "alice.phone", dev="phone", **fields)


def staged(m: StagedMessage, *devices: tuple[str, int]) -> FlushBatch:
    """A new message with its items, as the flush writes it."""
    return FlushBatch(bodies=[m], items=[Item(device, seq, FAR, 0.0, message=m) for device, seq in devices])


def queues(items: list[Item]) -> list[tuple[str, int, int | None]]:
    return [(i.device, i.seq, i.message.mid if i.message else None) for i in items]


async def test_boot_numbers_grow_across_reopening(backend: Backend) -> None:
    first = await backend.messages()
    try:
        one, two = await first.next_boot(), await first.next_boot()
    finally:
        await first.close()
    again = await backend.messages()
    try:
        three = await again.next_boot()
    finally:
        await again.close()
    assert one < two < three


async def test_a_committed_batch_loads_back_without_bodies(store: MessageStore) -> None:
    m = message(1, "héllo")
    batch = staged(m, ("bob.phone", 10), ("bob.phone", 9), ("bob.laptop", 2 * SEQ_SPAN + 1))
    batch.items.append(Item("alice.phone", 5, 123, 0.0, receipt=RECEIPT))
    await store.commit(batch)
    messages, items, remembered = await store.load(1)
    [loaded] = messages
    assert (loaded.mid, loaded.sender, loaded.msg_id, loaded.recipient, loaded.type, loaded.ts, loaded.expires_ms,
            loaded.origin, loaded.dev, loaded.olm, loaded.delivered) == \
        (1, "alice", "m1", "bob", "text", 5, FAR, "alice.phone", "phone", False, False)
    assert loaded.body is None, "bodies are read on demand"
    assert loaded.size == len("héllo".encode()), "bytes, not characters"
    assert queues(items) == [("alice.phone", 5, None), ("bob.laptop", 2 * SEQ_SPAN + 1, 1),
                             ("bob.phone", 9, 1), ("bob.phone", 10, 1)], "by device, then seq as a number"
    receipt = items[0]
    assert (receipt.receipt, receipt.expires_ms) == (RECEIPT, 123)
    assert remembered == []


async def test_bodies_are_read_by_message_id(store: MessageStore) -> None:
    many = [message(mid, f"body {mid}") for mid in range(1, 601)]
    await store.commit(FlushBatch(bodies=many, items=[Item("bob.phone", m.mid, FAR, 0.0, message=m) for m in many]))
    found = await store.bodies([*range(1, 601), 999])
    assert found == {mid: f"body {mid}" for mid in range(1, 601)}, "every body asked for, none that is missing"
    assert await store.bodies([3]) == {3: "body 3"}


async def test_olm_ciphertexts_are_kept_per_item(store: MessageStore) -> None:
    m = message(1, "", olm=True)
    items = [Item("bob.phone", 1, FAR, 0.0, message=m, body="ct-phone"),
             Item("bob.laptop", 1, FAR, 0.0, message=m, body="ct-lap-ü")]
    await store.commit(FlushBatch(bodies=[m], items=[*items, Item("alice.phone", 2, FAR, 0.0, receipt=RECEIPT)]))
    messages, loaded, _ = await store.load(1)
    assert [(x.olm, x.dev, x.size) for x in messages] == [(True, "phone", len("ct-phonect-lap-ü".encode()))]
    assert all(i.body is None for i in loaded), "ciphertexts are read on demand"
    keys = [("bob.phone", 1), ("bob.laptop", 1), ("alice.phone", 2), ("bob.tab", 1)]
    assert await store.item_bodies(keys) == {("bob.phone", 1): "ct-phone", ("bob.laptop", 1): "ct-lap-ü"}


async def test_writing_a_batch_again_duplicates_nothing(store: MessageStore) -> None:
    """A batch whose commit failed is written again in full (flush_failed): rows must not double."""
    batch = staged(message(1), ("bob.phone", 1), ("bob.laptop", 1))
    batch.dedup.append(("alice", "m1", FAR))
    await store.commit(batch)
    await store.commit(batch)
    messages, items, remembered = await store.load(1)
    assert (len(messages), queues(items), remembered) == (1, [("bob.laptop", 1, 1), ("bob.phone", 1, 1)],
                                                          [("alice", "m1", FAR)])


async def test_acks_delete_items_then_the_body(store: MessageStore) -> None:
    m = message(1, "", olm=True)
    await store.commit(FlushBatch(bodies=[m], items=[Item("bob.phone", 1, FAR, 0.0, message=m, body="a"),
                                                     Item("bob.laptop", 1, FAR, 0.0, message=m, body="b")]))
    await store.commit(FlushBatch(deleted_items=[("bob.phone", 1)], delivered=[1]))
    messages, items, _ = await store.load(1)
    assert [x.delivered for x in messages] == [True]
    assert queues(items) == [("bob.laptop", 1, 1)]
    assert await store.item_bodies([("bob.phone", 1), ("bob.laptop", 1)]) == {("bob.laptop", 1): "b"}
    await store.commit(FlushBatch(deleted_items=[("bob.laptop", 1)], deleted_bodies=[1]))
    await store.checkpoint()
    assert await store.load(1) == ([], [], [])
    assert await store.bodies([1]) == {} and await store.item_bodies([("bob.laptop", 1)]) == {}


async def test_other_queues_are_untouched_by_a_delete(store: MessageStore) -> None:
    await store.commit(staged(message(1), ("bob.phone", 1), ("bob.phone", 2), ("carol.x", 1)))
    await store.commit(FlushBatch(deleted_items=[("bob.phone", 1)]))
    _, items, _ = await store.load(1)
    assert queues(items) == [("bob.phone", 2, 1), ("carol.x", 1, 1)]


async def test_remembered_ids_expire_and_are_pruned(store: MessageStore) -> None:
    await store.commit(FlushBatch(dedup=[("alice", "m1", 100), ("alice", "m2", 150), ("bob", "m1", 200)]))
    assert sorted((await store.load(50))[2]) == [("alice", "m1", 100), ("alice", "m2", 150), ("bob", "m1", 200)]
    assert sorted((await store.load(150))[2]) == [("bob", "m1", 200)], "expired at its expiry time"
    await store.prune(150)
    assert (await store.load(50))[2] == [("bob", "m1", 200)], "pruned up to and including now"
    await store.commit(FlushBatch(dedup=[("bob", "m1", 300)]))
    assert (await store.load(250))[2] == [("bob", "m1", 300)], "remembered again: the new expiry counts"


async def test_a_failing_batch_writes_nothing(store: MessageStore) -> None:
    batch = staged(message(1), ("bob.phone", 1))
    batch.bodies.append(message(2, "\ud800"))  # a lone surrogate: cannot be stored as text
    batch.dedup.append(("alice", "m1", FAR))
    with pytest.raises((UnicodeEncodeError, StoreError)):
        await store.commit(batch)
    assert await store.load(1) == ([], [], [])
    assert await store.bodies([1]) == {}


async def test_an_item_whose_message_is_gone_is_skipped(store: MessageStore) -> None:
    """A part of a batch can fail alone (FlushBatch.parts); what it leaves must still load."""
    await store.commit(staged(message(1), ("bob.phone", 1), ("bob.phone", 2)))
    await store.commit(FlushBatch(deleted_bodies=[1], deleted_items=[("bob.phone", 1)]))
    assert await store.load(1) == ([], [], [])


async def test_staged_items_survive_reopening(backend: Backend) -> None:
    first = await backend.messages()
    try:
        await first.commit(staged(message(1, "kept"), ("bob.phone", 1)))
        await first.commit(FlushBatch(dedup=[("alice", "m1", FAR)]))
        await first.checkpoint()
    finally:
        await first.close()
    again = await backend.messages()
    try:
        messages, items, remembered = await again.load(1)
        assert ([x.mid for x in messages], queues(items), remembered) == ([1], [("bob.phone", 1, 1)],
                                                                          [("alice", "m1", FAR)])
        assert await again.bodies([1]) == {1: "kept"}
    finally:
        await again.close()


# Store operations started together on one connection must not collide (found by the benchmarks:
# a prune during a group commit failed it with 'cannot start a transaction within a transaction').
async def test_commit_prune_and_checkpoint_can_overlap(store: MessageStore) -> None:
    batches = []
    for n in range(20):
        message = StagedMessage(n, "alice", f"m{n}", "bob", "text", "body", 1, 10**13, "alice.phone")
        batches.append(FlushBatch(bodies=[message], items=[Item("bob.phone", n, 10**13, 0.0, message=message)],
                                  dedup=[("alice", f"d{n}", 10**13)]))
    work = [store.commit(b) for b in batches] + [store.prune(1) for _ in range(10)] + [store.checkpoint()]
    await asyncio.gather(*work)
    messages, items, remembered = await store.load(2)
    assert len(messages) == 20 and len(items) == 20 and len(remembered) == 20
