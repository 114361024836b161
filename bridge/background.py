"""Background rounds of the bridge's services: the supervisor they run under, and two helpers.

A service's background work (a group commit, a sweep, a batch of last-seen times,
a timer) runs in rounds under a ``Supervisor`` passed into its constructor:
``chatserver.supervisor.Supervisor`` implements it (logs, counts and reports each
failure to ``/readyz``), so the bridge never imports the application around it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 5.0
RECANCEL_S = 1.0


class Supervisor(Protocol):
    def spawn(self, task: str, one_round: Callable[[], Awaitable[object]]) -> asyncio.Task[None]:
        """Run ``one_round`` again and again (it waits for its own time) until cancelled; a round
        that raises is reported as a failure of ``task`` and retried after a back-off."""

    def failed(self, task: str, exc: BaseException) -> None:
        """A round of ``task`` run outside ``spawn`` failed with ``exc``."""

    def succeeded(self, task: str) -> None:
        """A round of ``task`` run outside ``spawn`` succeeded: it is no longer failing."""


def raise_if_cancelled(exc: BaseException | None = None) -> None:
    """For a loop that survives its rounds' errors: if this task was cancelled, end it. A library
    can turn a cancellation into another error (redis-py's socket timeout, through Python 3.11's
    asyncio.timeout, raises TimeoutError when the cancel and its deadline meet); the loop then went
    on, cancelled but never told again, and a broker's stop waited for it for ever (CI)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


class Backoff:
    """The pause after failed rounds: doubles from ``low`` up to ``high``; a success resets it."""

    def __init__(self, low: float = BACKOFF_MIN_S, high: float = BACKOFF_MAX_S) -> None:
        self.low, self.high = low, high
        self._next = low

    def failed(self) -> float:
        """The pause before the next round after this failure."""
        delay = self._next
        self._next = min(delay * 2, self.high)
        return delay

    def succeeded(self) -> None:
        self._next = self.low


async def cancel(tasks: Sequence[asyncio.Future[None]]) -> None:
    """Stop tasks and wait until they have ended. A task whose round swallowed its cancel (a library
    caught it and returned) would wait at its next sleep for ever, and a broker's stop with it (CI:
    a node's lease loop): each still running is cancelled again every ``RECANCEL_S``."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a failure at stop is not logged as "never retrieved"
