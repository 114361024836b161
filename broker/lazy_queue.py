"""An ``asyncio.Queue`` and an ``asyncio.Event`` that make their parts on first use.

amqtt gives every connection four queues (two in its ``Session``, two in the
protocol handler), each with three deques and an ``Event`` with a fourth: about
13 KiB per connection (bench/results/probe-memory.md). An idle phone uses none
of them: chat traffic bypasses them (broker/handler.py) and the broker's message
loop polls them instead of waiting on them (``ChatBroker._client_message_loop``).

``LazyQueue`` and ``LazyEvent`` are subclasses (amqtt's annotations and
``isinstance`` checks see what they expect) that never call the base class's
``__init__`` and implement every public method themselves, on attributes of
their own: nothing depends on asyncio's private attributes, which change between
Python versions (3.13 added ``Queue._is_shutdown``, read by every put and get).
tests/unit/test_lazy_queue.py checks the behaviour against asyncio's classes and
that no public method of theirs is left to the base class; scripts/test-pythons
runs it on every CPython the machine has.
"""

from __future__ import annotations

import asyncio
import collections
import sys
from collections.abc import Callable
from typing import Literal, TypeVar

T = TypeVar("T")

if sys.version_info >= (3, 13):
    QueueShutDown = asyncio.QueueShutDown
else:
    class QueueShutDown(Exception):
        """What ``asyncio.QueueShutDown`` is from Python 3.13: put or get on a queue that was shut down."""

Waiters = collections.deque[asyncio.Future[None]]


class LazyQueue(asyncio.Queue[T]):
    """``asyncio.Queue`` (FIFO, optional bound, ``task_done``/``join``, 3.13's ``shutdown``) whose
    deques and join event exist only while something is queued or waits."""

    _shut_down = False  # set on the instance by shutdown(), which amqtt never calls: one slot less each

    def __init__(self, maxsize: int = 0) -> None:
        # No super().__init__(): not making the parts up front is the point. The attributes are set
        # here, in one order, so that instances share their dict keys (CPython's inline values).
        self._bound = maxsize
        self._unfinished = 0
        self._items: collections.deque[T] | None = None
        self._getters: Waiters | None = None
        self._putters: Waiters | None = None
        self._joined: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} maxsize={self._bound} qsize={self.qsize()} unfinished={self._unfinished}>"

    __str__ = __repr__

    @property
    def maxsize(self) -> int:
        return self._bound

    def qsize(self) -> int:
        return len(self._items) if self._items is not None else 0

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self._bound <= self.qsize()

    def shrink(self) -> None:
        """Drop the parts again once nothing is queued or waiting (a SUBSCRIBE at login used them once)."""
        if not self._items and not self._getters and not self._putters:
            self._items = self._getters = self._putters = None

    def put_nowait(self, item: T) -> None:
        if self._shut_down:
            raise QueueShutDown
        if self.full():
            raise asyncio.QueueFull
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        self._unfinished += 1
        if self._joined is not None:
            self._joined.clear()
        _wake_next(self._getters)

    def get_nowait(self) -> T:
        if not self._items:
            if self._shut_down:
                raise QueueShutDown
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        _wake_next(self._putters)
        return item

    async def put(self, item: T) -> None:
        while self.full():
            if self._shut_down:
                raise QueueShutDown
            if self._putters is None:
                self._putters = collections.deque()
            await _wait_turn(self._putters, lambda: not self.full())
        self.put_nowait(item)

    async def get(self) -> T:
        while self.empty():
            if self._shut_down:
                raise QueueShutDown
            if self._getters is None:
                self._getters = collections.deque()
            await _wait_turn(self._getters, lambda: not self.empty())
        return self.get_nowait()

    def task_done(self) -> None:
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1
        if self._unfinished == 0 and self._joined is not None:
            self._joined.set()
            self._joined = None  # its waiters hold it; the next join() makes a new one

    async def join(self) -> None:
        if self._unfinished > 0:
            if self._joined is None:
                self._joined = asyncio.Event()
            await self._joined.wait()

    def shutdown(self, immediate: bool = False) -> None:
        """As Python 3.13's: puts fail from now on; gets fail once empty (at once if ``immediate``,
        which also drops what is queued and counts it done)."""
        self._shut_down = True
        if immediate and self._items:
            dropped = len(self._items)
            self._items.clear()
            self._unfinished = max(0, self._unfinished - dropped)
            if self._unfinished == 0 and self._joined is not None:
                self._joined.set()
                self._joined = None
        for waiters in (self._getters, self._putters):
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # each re-checks and raises QueueShutDown


def _wake_next(waiters: Waiters | None) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


def _discard(waiters: Waiters, waiter: asyncio.Future[None]) -> None:
    if waiter in waiters:  # not if it was woken: waking takes it out
        waiters.remove(waiter)


async def _wait_turn(waiters: Waiters, still_ready: Callable[[], bool]) -> None:
    """Wait in ``waiters`` to be woken; if cancelled after being woken, pass the turn on (as asyncio.Queue)."""
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    except BaseException:
        waiter.cancel()
        _discard(waiters, waiter)
        if still_ready() and not waiter.cancelled():
            _wake_next(waiters)
        raise


class LazyEvent(asyncio.Event):
    """``asyncio.Event`` whose waiters' deque exists only while someone waits."""

    def __init__(self) -> None:
        # No super().__init__(), as for LazyQueue.
        self._flag = False
        self._waiting: Waiters | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {'set' if self._flag else 'unset'} waiters={self.waiters()}>"

    __str__ = __repr__

    def waiters(self) -> int:
        """How many ``wait()`` calls are waiting now."""
        return len(self._waiting) if self._waiting is not None else 0

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if self._flag:
            return
        self._flag = True
        waiting, self._waiting = self._waiting, None
        for waiter in waiting or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> Literal[True]:
        if self._flag:
            return True
        if self._waiting is None:
            self._waiting = collections.deque()
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter
            return True
        finally:
            waiting = self._waiting
            if waiting is not None:
                _discard(waiting, waiter)
                if not waiting:
                    self._waiting = None  # nobody else waits: give the deque back
