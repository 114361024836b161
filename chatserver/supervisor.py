"""One supervision for every background task of the broker.

A background task runs in rounds (a group commit, a sweep, a batch of last-seen
times, a timer). Before this, an exception a round did not expect ended its task
for good and nobody noticed: one message with a lone surrogate stopped the
staging flusher, and from then on no sender got ``sent``, with no log line and
``/readyz`` still 200. Now every such round is run through a ``Supervisor``:
the exception is logged with its traceback, counted
(``chat_background_failures_total{task}``), and makes ``/readyz`` answer 503
naming the task until a later round of it succeeds; the task goes on after a
back-off (``Backoff``, pure). What a failed round held is the task's to keep:
it puts it back (retried) or answers its senders.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from bridge.background import Backoff, raise_if_cancelled
from bridge.store import StoreError

log = logging.getLogger(__name__)

TASKS = ("flush", "redeliver", "sweep", "checkpoint", "body_read", "presence_persist", "presence_timer",
         "presence_sync", "loop_lag", "gc", "ack", "queue_read", "queue_poll", "group_log", "push",
         "media_sweep")
"""The broker's background tasks (the metric shows each, 0 until it fails)."""


class Supervisor:
    """Failures of background rounds: counted per task, and failing tasks named for ``/readyz``.

    Implements ``bridge.background.Supervisor``, the port the bridge's services run their rounds under.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures: dict[str, int] = {}
        self._failing: dict[str, tuple[float, str]] = {}  # task -> (since, last error)
        self._clock = clock

    def failed(self, task: str, exc: BaseException) -> None:
        self.failures[task] = self.failures.get(task, 0) + 1
        since = self._failing.get(task, (self._clock(), ""))[0]
        self._failing[task] = (since, f"{type(exc).__name__}: {exc}")
        if isinstance(exc, StoreError):  # the disk or the database: the message says it all
            log.error("background task %s failed, retrying: %s", task, exc)
        else:
            log.error("background task %s failed, retrying", task, exc_info=exc)

    def succeeded(self, task: str) -> None:
        if self._failing.pop(task, None) is not None:
            log.info("background task %s works again", task)

    def problems(self) -> list[str]:
        """Why the broker is not ready because of its background tasks (empty: no task is failing)."""
        now = self._clock()
        return [f"background task {task} failing for {now - since:.0f}s ({error})"
                for task, (since, error) in sorted(self._failing.items())]

    def spawn(self, task: str, one_round: Callable[[], Awaitable[object]]) -> asyncio.Task[None]:
        """Run ``one_round`` again and again (it waits for its own time) until cancelled."""
        return asyncio.ensure_future(self._run(task, one_round))

    async def _run(self, task: str, one_round: Callable[[], Awaitable[object]]) -> None:
        backoff = Backoff()
        while True:
            try:
                await one_round()
            except Exception as exc:
                raise_if_cancelled(exc)
                self.failed(task, exc)
                await asyncio.sleep(backoff.failed())
            else:
                self.succeeded(task)
                backoff.succeeded()
                raise_if_cancelled()  # a round that swallowed its cancel (a wait_for timing out with it)

