"""LazyQueue (broker/lazy_queue.py) behaves as asyncio.Queue and makes nothing until used."""

from __future__ import annotations

import asyncio

import pytest

from broker.lazy_queue import LazyEvent, LazyQueue


def test_unused_queue_has_no_parts() -> None:
    queue: LazyQueue[int] = LazyQueue()
    assert queue.empty() and queue.qsize() == 0 and not queue.full()
    assert not {"_getters", "_putters", "_queue", "_finished"} & set(vars(queue))
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()


async def test_same_behaviour_as_asyncio_queue() -> None:
    for queue in (LazyQueue[int](), asyncio.Queue[int]()):
        await queue.put(1)
        queue.put_nowait(2)
        assert queue.qsize() == 2 and not queue.empty()
        assert [await queue.get(), queue.get_nowait()] == [1, 2]
        queue.task_done()
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
    assert queue.full()
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


async def test_shrinks_when_empty_and_works_again() -> None:
    queue: LazyQueue[int] = LazyQueue()
    await queue.put(1)
    queue.shrink()  # not empty: kept
    assert queue.get_nowait() == 1
    queue.shrink()
    assert not {"_getters", "_putters", "_queue", "_finished"} & set(vars(queue))
    getter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.shrink()  # a getter waits: kept
    await queue.put(2)
    assert await asyncio.wait_for(getter, 1) == 2


async def test_lazy_event_waits_sets_and_gives_its_deque_back() -> None:
    event = LazyEvent()
    assert "_waiters" not in vars(event) and not event.is_set()
    waiter = asyncio.ensure_future(event.wait())
    await asyncio.sleep(0)
    assert not waiter.done() and len(event._waiters) == 1
    event.set()
    assert await asyncio.wait_for(waiter, 1) is True
    assert "_waiters" not in vars(event)
    event.clear()
    assert not event.is_set()
    event.set()
    assert await asyncio.wait_for(event.wait(), 1) is True  # already set: no wait


async def test_lazy_event_set_without_waiters_makes_no_deque() -> None:
    event = LazyEvent()
    event.set()  # asyncio.Event.set walks its waiters: here there are none to make
    assert event.is_set() and "_waiters" not in vars(event)
    assert await asyncio.wait_for(event.wait(), 1) is True
    event.clear()
    waiter = asyncio.ensure_future(event.wait())
    await asyncio.sleep(0)
    event.set()  # with a waiter: woken as by asyncio.Event
    assert await asyncio.wait_for(waiter, 1) is True and "_waiters" not in vars(event)
