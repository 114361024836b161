"""An ``asyncio.Queue`` and an ``asyncio.Event`` that make their parts on first use.

amqtt gives every connection four queues (two in its ``Session``, two in the
protocol handler), each with three deques and an ``Event`` with a fourth: about
13 KiB per connection (bench/results/probe-memory.md). An idle phone uses none
of them: chat traffic bypasses them (broker/handler.py) and the broker's message
loop polls them instead of waiting on them (``ChatBroker._client_message_loop``).
``LazyQueue`` behaves as ``asyncio.Queue`` (it is one) but creates each part the
first time a queue method touches it.

It relies on the names of ``asyncio.Queue``'s private attributes (the same from
Python 3.10 to 3.13); tests/unit/test_lazy_queue.py checks the behaviour.
``LazyEvent`` does the same for the two Events of amqtt's protocol handler,
which nothing waits on while a connection is idle.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class LazyQueue(asyncio.Queue[T]):
    def __init__(self, maxsize: int = 0) -> None:
        # No super().__init__(): not making the parts up front is the point.
        self._maxsize = maxsize
        self._unfinished_tasks = 0

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not set yet: the parts asyncio.Queue.__init__ would make.
        value: Any
        if name in ("_getters", "_putters", "_queue"):
            value = collections.deque()
        elif name == "_finished":
            value = asyncio.Event()
            if not self._unfinished_tasks:
                value.set()
        else:
            raise AttributeError(name)
        setattr(self, name, value)
        return value

    def shrink(self) -> None:
        """Drop the parts again once nothing is queued or waiting (a SUBSCRIBE at login used them once)."""
        parts = self.__dict__
        if parts.get("_queue") or parts.get("_getters") or parts.get("_putters"):
            return
        for name in ("_queue", "_getters", "_putters", "_finished"):
            parts.pop(name, None)

    def empty(self) -> bool:
        return "_queue" not in self.__dict__ or not self._queue

    def qsize(self) -> int:
        return len(self._queue) if "_queue" in self.__dict__ else 0


class LazyEvent(asyncio.Event):
    def __init__(self) -> None:
        # No super().__init__(): the waiters' deque is made when someone waits.
        self._value = False

    def __getattr__(self, name: str) -> Any:
        if name != "_waiters":
            raise AttributeError(name)
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        return self._waiters

    async def wait(self) -> Literal[True]:
        try:
            return await super().wait()
        finally:
            if not self.__dict__.get("_waiters", True):
                del self._waiters  # nobody else waits: give the deque back
