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
        if _made(self, "_queue") or _made(self, "_getters") or _made(self, "_putters"):
            return
        for name in ("_queue", "_getters", "_putters", "_finished"):
            if _made(self, name) is not None:
                delattr(self, name)

    def empty(self) -> bool:
        return not _made(self, "_queue")

    def qsize(self) -> int:
        queue = _made(self, "_queue")
        return len(queue) if queue is not None else 0


class LazyEvent(asyncio.Event):
    def __init__(self) -> None:
        # No super().__init__(): the waiters' deque is made when someone waits.
        self._value = False

    def __getattr__(self, name: str) -> Any:
        if name != "_waiters":
            raise AttributeError(name)
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        return self._waiters

    def set(self) -> None:
        if _made(self, "_waiters") is None:
            self._value = True  # nobody waits: asyncio.Event.set would make the deque to find that out
            return
        super().set()

    async def wait(self) -> Literal[True]:
        try:
            return await super().wait()
        finally:
            if _made(self, "_waiters") is not None and not self._waiters:
                del self._waiters  # nobody else waits: give the deque back


def _made(obj: object, name: str) -> Any:
    """The attribute if it was made, else None; neither makes it (``__getattr__``) nor the object's
    ``__dict__`` (reading ``vars()`` turns Python 3.11's inline attribute values into a 64-byte dict)."""
    try:
        return object.__getattribute__(obj, name)
    except AttributeError:
        return None
