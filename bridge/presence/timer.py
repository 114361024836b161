"""The one timer a presence service keeps: armed at the core's next deadline (window expiry,
coalesced items; in cluster mode also re-reads), so waiting costs no task per user."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bridge.background import Backoff, Supervisor

TASK = "presence_timer"


class DeadlineTimer:
    """Runs ``on_fire`` at the earliest time (ms of ``now``) passed to ``arm``; an ``on_fire`` that
    raises is reported to the supervisor and run again after a back-off (a bug must not stop the
    timer for good, nor spin it)."""

    def __init__(self, now: Callable[[], int], on_fire: Callable[[], None], supervisor: Supervisor) -> None:
        self._now = now
        self._on_fire = on_fire
        self._supervisor = supervisor
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0
        self._backoff = Backoff()
        self._closed = False

    def arm(self, due: int | None) -> None:
        """Fire at ``due`` unless armed earlier already (None: nothing to do)."""
        if due is None or self._closed or (self._handle is not None and self._at <= due):
            return
        if self._handle is not None:
            self._handle.cancel()
        delay = max(0, due - self._now() + 1) / 1000  # +1 ms: never wake before the deadline's millisecond
        self._handle = asyncio.get_running_loop().call_later(delay, self._fire)
        self._at = due

    def _fire(self) -> None:
        self._handle = None
        try:
            self._on_fire()
        except Exception as exc:
            self._supervisor.failed(TASK, exc)
            if not self._closed:
                delay = self._backoff.failed()
                self._handle = asyncio.get_running_loop().call_later(delay, self._fire)
                self._at = self._now() + int(delay * 1000)
            return
        self._supervisor.succeeded(TASK)
        self._backoff.succeeded()

    def close(self) -> None:
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
