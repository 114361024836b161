"""``Holding`` (bridge/cluster/holding.py), the write-back shell: the order its writes reach the store.
The store and the host are stand-ins that record what is staged; the rules are bridge/cluster/writeback.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from bridge.clock import Clock
from bridge.cluster.holding import Holding
from bridge.cluster.store import MessageEntry, Stage, StageResult, StageStatus
from bridge.cluster.window import WindowOutcome, Windows
from bridge.links import LinkRegistry
from bridge.messaging.admission import Holds


class Host:
    def __init__(self) -> None:
        self.windows = Windows(8, 30.0)

    def apply(self, out: WindowOutcome) -> None:
        pass

    async def wake(self, targets: list[tuple[str, int]]) -> None:
        pass

    async def retrying(self, what: str, step: Callable[[], Awaitable[object]]) -> None:
        await step()

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        return asyncio.ensure_future(coro)


class Queues:
    """Records the message ids staged, in order; each write takes a few turns of the loop, as I/O does."""

    def __init__(self) -> None:
        self.staged: list[str] = []

    async def stage(self, stage: Stage) -> StageResult:
        for _ in range(3):
            await asyncio.sleep(0)
        assert stage.message is not None
        self.staged.append(stage.message.msg_id)
        return StageResult(StageStatus.STAGED)


class Supervisor:
    def spawn(self, task: str, one_round: Callable[[], Awaitable[object]]) -> asyncio.Task[None]:
        raise AssertionError("not used")

    def failed(self, task: str, exc: BaseException) -> None:
        raise AssertionError(f"{task} failed: {exc!r}")


def stage(msg_id: str) -> Stage:
    entry = MessageEntry("alice", msg_id, "bob", "text", 1000, "phone", body="hi")
    return Stage("bob", 10**13, 100, devices=("bob.phone",), message=entry, dedup_until_ms=10**13, delivery=True)


async def test_a_direct_stage_waits_for_the_held_items_a_flush_has_just_taken() -> None:
    """A flush takes a lane's due items and writes them in a task of its own; a later message of the
    lane that goes to the store directly must come after them (write_lane), though the flush's task
    has not started yet. Before the fix write_lane found nothing left to take and returned at once:
    in ``bench chaos --cluster`` a device got a later message below earlier ones."""
    queues = Queues()
    holding = Holding(Host(), queues, None, LinkRegistry(), Holds(), flush_ms=50,  # type: ignore[arg-type]
                      pending_hold_ms=1000, clock=Clock(), supervisor=Supervisor())
    writeback = holding._writeback
    for n, msg_id in enumerate(("m1", "m2")):
        writeback.hold(stage(msg_id), "alice.phone", {"bob.phone": 11 + n}, {"bob.phone": 1}, 0.0)
    holding.write_all(writeback.due(float("inf")))  # the flush: its write task is spawned, not run yet
    await holding.write_lane("alice.phone")  # the direct stage of m3 comes next in the lane
    queues.staged.append("m3")
    assert queues.staged == ["m1", "m2", "m3"]
    assert len(writeback) == 0
