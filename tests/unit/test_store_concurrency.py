"""Store operations started together on one SQLite connection must not collide (found by the benchmarks:
a prune during a group commit failed it with 'cannot start a transaction within a transaction')."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bridge.messaging.records import FlushBatch, Item, StagedMessage
from storage.sqlite.messages import SqliteMessageStore


async def test_commit_prune_and_checkpoint_can_overlap(tmp_path: Path) -> None:
    store = await SqliteMessageStore.open(tmp_path)
    try:
        batches = []
        for n in range(20):
            message = StagedMessage(n, "alice", f"m{n}", "bob", "text", "body", 1, 10**13, "alice.phone")
            batches.append(FlushBatch(bodies=[message], items=[Item("bob.phone", n, 10**13, 0.0, message=message)],
                                      dedup=[("alice", f"d{n}", 10**13)]))
        work = [store.commit(b) for b in batches] + [store.prune(1) for _ in range(10)] + [store.checkpoint()]
        await asyncio.gather(*work)
        messages, items, remembered = await store.load(2)
        assert len(messages) == 20 and len(items) == 20 and len(remembered) == 20
    finally:
        await store.close()
