"""Supervision of background rounds (chatserver/supervisor.py) and the pure parts of a failed commit:
``FlushBatch.parts`` and ``Staging.drop_unwritable``. No I/O: times are passed in."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bridge.background import Backoff, cancel
from bridge.store import StoreError
from chatserver.supervisor import Supervisor
from tests.unit.test_staging import core, kinds, msg


def test_backoff_doubles_up_to_its_ceiling_and_a_success_resets_it() -> None:
    backoff = Backoff(0.1, 0.5)
    assert [backoff.failed() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.succeeded()
    assert backoff.failed() == 0.1


def test_a_failing_task_is_counted_named_until_it_works_again(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    supervisor = Supervisor(clock=lambda: now[0])
    assert supervisor.problems() == []
    with caplog.at_level(logging.ERROR, "chatserver.supervisor"):
        supervisor.failed("flush", RuntimeError("boom"))
        now[0] = 103.0
        supervisor.failed("flush", RuntimeError("again"))
        supervisor.failed("sweep", StoreError("disk full"))
    assert supervisor.failures == {"flush": 2, "sweep": 1}
    assert supervisor.problems() == ["background task flush failing for 3s (RuntimeError: again)",
                                     "background task sweep failing for 0s (StoreError: disk full)"]
    traced = {r.getMessage(): r.exc_info is not None for r in caplog.records}
    assert traced["background task flush failed, retrying"] is True  # a bug: with its traceback
    assert traced["background task sweep failed, retrying: disk full"] is False  # the disk: the message says it
    supervisor.succeeded("flush")
    assert [p.split(" failing")[0] for p in supervisor.problems()] == ["background task sweep"]
    assert supervisor.failures["flush"] == 2, "the counter never goes back"


def test_a_supervised_loop_survives_a_failed_round() -> None:
    supervisor = Supervisor()
    rounds: list[int] = []

    async def one_round() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 2:
            raise RuntimeError("second round fails")
        if len(rounds) == 3:
            assert supervisor.problems(), "failing between the failed round and the next"
        if len(rounds) == 4:
            done.set()
        await asyncio.sleep(0)

    async def run() -> None:
        task = supervisor.spawn("flush", one_round)
        await asyncio.wait_for(done.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    done = asyncio.Event()
    asyncio.run(run())
    assert supervisor.failures == {"flush": 1} and supervisor.problems() == []


def test_parts_of_a_batch_each_message_with_its_items_receipts_alone_the_rest_last() -> None:
    s = core()
    s.submit("alice.phone", "alice", msg("m1"), 1000, 0.0)
    s.submit("alice.phone", "alice", msg("m2"), 1000, 0.0)
    s.seen("bob", "alice", ["x1"], "bob.phone", 1000, 0.0)
    batch = s.take_flush(1.0)
    assert batch is not None
    batch.deleted_items.append(("bob.phone", 7))
    parts = batch.parts()
    assert [[m.msg_id for m in p.bodies] for p in parts] == [["m1"], ["m2"], [], []]
    assert [sorted(i.device for i in p.items) for p in parts] == [
        ["bob.laptop", "bob.phone"], ["bob.laptop", "bob.phone"], ["alice.phone"], []]
    assert parts[-1].deleted_items == [("bob.phone", 7)]
    assert sum(len(p.items) for p in parts) == len(batch.items)


def test_an_unwritable_message_is_dropped_its_sender_told_and_never_sent() -> None:
    s = core()
    s.device_online("bob.phone", 0.0)
    s.submit("alice.phone", "alice", msg("bad"), 1000, 0.0)
    s.submit("alice.phone", "alice", msg("ok"), 1000, 0.0)
    batch = s.take_flush(1.0)
    assert batch is not None
    bad, ok, *_ = batch.parts()
    assert kinds(s.drop_unwritable(bad)) == [("alice.phone", "internal", "bad")]
    assert kinds(s.flush_done(ok)) == [("alice.phone", "sent", ["ok"])]
    assert {i.message.msg_id for box in s.boxes.values() for i in box.items.values() if i.message} == {"ok"}
    assert s.take_flush(2.0) is None, "nothing of it is left to write"
    # A re-send of the dropped message is a new message (its id was not remembered), not 'sent'.
    again = s.submit("alice.phone", "alice", msg("bad"), 2000, 3.0)
    assert ("bob.phone", "msg", "bad") in kinds(again)


async def test_a_round_whose_cancel_became_another_error_still_ends_the_loop() -> None:
    """redis-py's socket timeout (Python 3.11's asyncio.timeout) can raise TimeoutError for a cancel
    that met its deadline: the supervised loop must end all the same, or a broker's stop waits for
    it for ever (seen in CI: a node's lease loop and a group sweep)."""
    async def library_call() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise TimeoutError("the deadline and the cancel met") from None

    task = Supervisor().spawn("lease", library_call)
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.wait({task}, timeout=2)
    assert task.done() and task.cancelled(), "the loop went on after its cancel"


async def test_cancel_ends_a_task_whose_round_swallowed_its_cancel() -> None:
    """A library that catches the cancel and returns leaves the task cancelling at its next sleep,
    where nothing would tell it again: a node's stop waited for its lease loop for ever (CI).
    ``cancel`` tells it again until it ends."""
    swallowed = 0

    async def loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # a round that returned instead

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    await asyncio.wait_for(cancel([task]), 5)
    assert task.cancelled() and swallowed == 1
