"""``asyncio.start_server`` with a stream protocol that makes its drain waiters' deque on first use.

Python 3.11's ``StreamReaderProtocol`` gives every connection a deque for the
writers waiting in ``drain()`` (``FlowControlMixin._drain_waiters``): 760 bytes,
a twentieth of an idle phone's connection (bench/results/probe-memory.md). A
writer waits there only while the transport's buffer is above its high-water
mark, which an idle connection never is. ``LeanStreamProtocol`` has no deque
until a drain has to wait, and gives it back when the last waiter has gone.

It relies on the names of ``FlowControlMixin``'s private attributes (the same
in Python 3.11 to 3.13): ``start_server`` checks once that they are there and
otherwise serves with asyncio's own protocol. tests/unit/test_streams.py checks
the behaviour, and that this Python has them, on every CPython the machine has
(scripts/test-pythons).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


class LeanStreamProtocol(asyncio.StreamReaderProtocol):
    # What FlowControlMixin's loops (resume_writing, connection_lost) read while no drain waits.
    _drain_waiters: Any = ()
    _paused: bool  # FlowControlMixin's, not in typeshed
    _connection_lost: bool  # as above

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        waiters = self._drain_waiters
        if isinstance(waiters, collections.deque) and not waiters:
            del self._drain_waiters  # the class's empty tuple shows through

    async def _drain_helper(self) -> None:
        if self._connection_lost or not self._paused:
            await super()._drain_helper()  # type: ignore[misc]  # private, not in typeshed; raises or returns at once
            return
        if not isinstance(self._drain_waiters, collections.deque):
            self._drain_waiters = collections.deque()
        try:
            await super()._drain_helper()  # type: ignore[misc]  # private, not in typeshed
        finally:
            if isinstance(self._drain_waiters, collections.deque) and not self._drain_waiters:
                del self._drain_waiters  # the last waiter has gone


def lean_streams_fit(loop: asyncio.AbstractEventLoop) -> bool:
    """True if this Python's stream protocol has the private parts ``LeanStreamProtocol`` works with."""
    probe = asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), loop=loop)
    return (isinstance(vars(probe).get("_drain_waiters"), collections.deque)
            and isinstance(getattr(probe, "_paused", None), bool)
            and isinstance(getattr(probe, "_connection_lost", None), bool)
            and callable(getattr(probe, "_drain_helper", None)))


def stream_protocol(client_connected: ClientConnected) -> Callable[[], asyncio.StreamReaderProtocol]:
    """A protocol factory that calls ``client_connected(reader, writer)`` for each connection, as
    ``asyncio.start_server`` does, with ``LeanStreamProtocol`` where it fits."""
    loop = asyncio.get_running_loop()
    protocol = LeanStreamProtocol if lean_streams_fit(loop) else asyncio.StreamReaderProtocol

    def factory() -> asyncio.StreamReaderProtocol:
        return protocol(asyncio.StreamReader(loop=loop), client_connected, loop=loop)

    return factory


async def start_server(client_connected: ClientConnected, host: str | None, port: int | None,
                       **kwargs: Any) -> asyncio.Server:
    """``asyncio.start_server`` (same arguments after the port), with ``LeanStreamProtocol`` where it fits."""
    return await asyncio.get_running_loop().create_server(stream_protocol(client_connected), host, port, **kwargs)
