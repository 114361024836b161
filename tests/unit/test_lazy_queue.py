"""LazyQueue and LazyEvent (broker/lazy_queue.py) behave as asyncio's and make nothing until used.

Run on every CPython the machine has (scripts/test-pythons): they are what failed first on
Python 3.13, whose Queue.put/get read a private attribute the lazy queue never made.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from broker.lazy_queue import LazyEvent, LazyQueue, QueueShutDown

PARTS = ("_items", "_getters", "_putters", "_joined")


def parts(queue: LazyQueue[int]) -> list[str]:
    return [name for name in PARTS if getattr(queue, name) is not None]


@pytest.mark.parametrize(("lazy", "base"), [(LazyQueue, asyncio.Queue), (LazyEvent, asyncio.Event)])
def test_no_public_method_is_left_to_asyncio(lazy: type, base: type) -> None:
    """asyncio's own methods read private attributes the lazy classes never make (3.13's
    ``Queue._is_shutdown``): every public one, and repr, is implemented here instead."""
    public = {name for name in dir(base) if not name.startswith("_")} | {"__repr__", "__str__"}
    assert public - set(vars(lazy)) == set()
    repr(lazy())  # asyncio's __repr__ would read its private attributes


def test_unused_queue_has_no_parts() -> None:
    queue: LazyQueue[int] = LazyQueue()
    assert queue.empty() and queue.qsize() == 0 and not queue.full() and queue.maxsize == 0
    assert parts(queue) == []
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    assert parts(queue) == []


async def test_same_behaviour_as_asyncio_queue() -> None:
    for queue in (LazyQueue[int](), asyncio.Queue[int]()):
        await queue.put(1)
        queue.put_nowait(2)
        assert queue.qsize() == 2 and not queue.empty()
        assert [await queue.get(), queue.get_nowait()] == [1, 2]
        queue.task_done()
        queue.task_done()
        with pytest.raises(ValueError):
            queue.task_done()
        await asyncio.wait_for(queue.join(), 1)
        getter = asyncio.ensure_future(queue.get())
        await asyncio.sleep(0)
        assert not getter.done()
        await queue.put(3)
        assert await asyncio.wait_for(getter, 1) == 3


async def test_bounded_and_join_wait() -> None:
    queue: LazyQueue[int] = LazyQueue(maxsize=1)
    await queue.put(1)
    assert queue.full() and queue.maxsize == 1
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(9)
    putter = asyncio.ensure_future(queue.put(2))
    await asyncio.sleep(0)
    assert not putter.done()
    joined = asyncio.ensure_future(queue.join())
    assert queue.get_nowait() == 1
    await asyncio.wait_for(putter, 1)
    queue.task_done()
    assert not joined.done()
    assert queue.get_nowait() == 2
    queue.task_done()
    await asyncio.wait_for(joined, 1)
    assert queue._joined is None


async def test_a_getter_cancelled_after_its_wake_up_passes_the_item_on() -> None:
    for queue in (LazyQueue[int](), asyncio.Queue[int]()):
        first, second = asyncio.ensure_future(queue.get()), asyncio.ensure_future(queue.get())
        await asyncio.sleep(0)
        queue.put_nowait(1)  # wakes the first getter...
        first.cancel()  # ...which is cancelled before it runs: the second gets the item
        assert await asyncio.wait_for(second, 1) == 1
        assert first.cancelled() and queue.empty()


async def test_shrinks_when_empty_and_works_again() -> None:
    queue: LazyQueue[int] = LazyQueue()
    await queue.put(1)
    queue.shrink()  # not empty: kept
    assert queue.get_nowait() == 1
    queue.shrink()
    assert parts(queue) == []
    getter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.shrink()  # a getter waits: kept
    await queue.put(2)
    assert await asyncio.wait_for(getter, 1) == 2


async def test_shutdown_as_python_313() -> None:
    queues: list[asyncio.Queue[int]] = [LazyQueue()]
    if sys.version_info >= (3, 13):
        queues.append(asyncio.Queue())
        assert QueueShutDown is asyncio.QueueShutDown
    for queue in queues:
        getter = asyncio.ensure_future(queue.get())
        await asyncio.sleep(0)
        queue.put_nowait(1)
        queue.put_nowait(2)
        assert await getter == 1
        waiting = asyncio.ensure_future(queue.get())
        queue.shutdown()  # type: ignore[attr-defined]  # Python 3.13's
        with pytest.raises(QueueShutDown):
            queue.put_nowait(3)
        assert await waiting == 2  # what was queued can still be read
        with pytest.raises(QueueShutDown):
            await asyncio.wait_for(queue.get(), 1)
        queue.task_done()
        queue.task_done()
        await asyncio.wait_for(queue.join(), 1)


async def test_immediate_shutdown_drops_the_items_and_wakes_everyone() -> None:
    queue: LazyQueue[int] = LazyQueue(maxsize=1)
    queue.put_nowait(1)
    putter = asyncio.ensure_future(queue.put(2))
    joined = asyncio.ensure_future(queue.join())
    await asyncio.sleep(0)
    queue.shutdown(immediate=True)
    with pytest.raises(QueueShutDown):
        await asyncio.wait_for(putter, 1)
    await asyncio.wait_for(joined, 1)
    with pytest.raises(QueueShutDown):
        queue.get_nowait()


async def test_lazy_event_waits_sets_and_gives_its_deque_back() -> None:
    event = LazyEvent()
    assert event.waiters() == 0 and event._waiting is None and not event.is_set()
    waiters = [asyncio.ensure_future(event.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters) and event.waiters() == 2
    event.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True]
    assert event._waiting is None
    event.clear()
    assert not event.is_set()
    event.set()
    assert await asyncio.wait_for(event.wait(), 1) is True  # already set: no wait
    assert event._waiting is None


async def test_lazy_event_waiter_cancelled_leaves_no_deque() -> None:
    for event in (LazyEvent(), asyncio.Event()):
        waiter = asyncio.ensure_future(event.wait())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not event.is_set()
        if isinstance(event, LazyEvent):
            assert event._waiting is None and event.waiters() == 0
        event.set()
        assert await asyncio.wait_for(event.wait(), 1) is True
