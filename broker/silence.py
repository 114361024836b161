"""Every connection's keepalive and packet deadlines on one timer (MQTT 3.1.1 section 3.1.2.10).

A server drops a client that sent nothing for 1.5 x its keepalive. A timer per
connection (``loop.call_later``, re-armed when the deadline passes with
something read meanwhile) costs ~900 bytes under uvloop: a TimerHandle with its
libuv timer, a closure and a bound method, per idle phone
(bench/results/probe-memory.md). Here the connections wait in slots of
``SLOT_S`` seconds by the time their deadline falls due, and one timer per event
loop wakes for the earliest slot; a connection costs two dictionary entries.

A deadline is checked at the end of its slot, never before it: a silent client
is dropped between 1.5 x keepalive and that plus ``SLOT_S``. A connection also
has a packet deadline (``mqtt.packet_deadline_s``: a packet started must be
whole within it), which can begin at any moment: each connection is looked at
at least every ``recheck_s`` (the packet deadline), so a stalled packet ends its
connection between one and two packet deadlines after its first byte, with no
timer per packet read.

``SilenceSlots`` and ``silent_until`` are the rules (pure, explicit times);
``SilenceWatch`` runs them on the loop.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Generic, Protocol, TypeVar

SLOT_S = 0.25

K = TypeVar("K")  # hashable
V = TypeVar("V")


def silent_until(overdue_at: float, recheck_s: float, now: float) -> float | None:
    """When to look again at a connection overdue at ``overdue_at``; None: it is overdue now."""
    return None if now >= overdue_at else min(overdue_at, now + recheck_s)


class SilenceSlots(Generic[K, V]):
    """Keys (each with a value) by the slot in which they fall due; ``pop_due`` takes those whose slot has ended."""

    def __init__(self, slot_s: float = SLOT_S) -> None:
        self._slot_s = slot_s
        self._slots: dict[int, dict[K, V]] = {}  # slot number -> its keys and their values
        self._slot_of: dict[K, int] = {}
        self._heap: list[int] = []  # slot numbers; some may be gone already (skipped when met)

    def __len__(self) -> int:
        return len(self._slot_of)

    def add(self, key: K, due: float, value: V) -> None:
        """Watch ``key`` (with ``value``) from now on for ``due`` (a key added again moves)."""
        self.discard(key)
        slot = math.ceil(due / self._slot_s)  # the slot ends at or after ``due``: never early
        keys = self._slots.get(slot)
        if keys is None:
            keys = self._slots[slot] = {}
            heapq.heappush(self._heap, slot)
        keys[key] = value
        self._slot_of[key] = slot

    def discard(self, key: K) -> None:
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return
        keys = self._slots[slot]
        del keys[key]
        if not keys:
            del self._slots[slot]

    def next_at(self) -> float | None:
        """When the earliest slot ends (None: nothing is watched)."""
        while self._heap and self._heap[0] not in self._slots:
            heapq.heappop(self._heap)
        return self._heap[0] * self._slot_s if self._heap else None

    def pop_due(self, now: float) -> list[tuple[K, V]]:
        """The keys and values of every slot ended by ``now``, in slot order, no longer watched."""
        due: list[tuple[K, V]] = []
        while self._heap and self._heap[0] * self._slot_s <= now:
            keys = self._slots.pop(heapq.heappop(self._heap), None)
            if keys:
                for key in keys:
                    del self._slot_of[key]
                due.extend(keys.items())
        return due


class Watched(Protocol):
    """A connection as ``SilenceWatch`` sees it."""

    def overdue_at(self) -> float:
        """Loop time from which the connection is overdue as things stand (``math.inf``: never)."""

    def handle_read_timeout(self) -> None:
        """It is overdue: end it."""


class SilenceWatch:
    """One per event loop: calls ``handle_read_timeout`` of a connection silent for its deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop, recheck_s: float, slot_s: float = SLOT_S) -> None:
        self._loop = loop
        self._recheck_s = recheck_s  # the longest a connection goes unlooked-at (its packet deadline may start)
        self._slots: SilenceSlots[Watched, None] = SilenceSlots(slot_s)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def __len__(self) -> int:
        return len(self._slots)

    def runs_on(self, loop: asyncio.AbstractEventLoop) -> bool:
        return loop is self._loop

    def watch(self, connection: Watched) -> None:
        now = self._loop.time()
        self._slots.add(connection, min(connection.overdue_at(), now + self._recheck_s), None)
        self._arm()

    def forget(self, connection: Watched) -> None:
        """Stop watching (the connection ended); the timer, if any, then finds nothing to do."""
        self._slots.discard(connection)

    def _arm(self) -> None:
        at = self._slots.next_at()
        if at is None or at >= self._timer_at:
            return  # nothing to watch, or the timer already wakes earlier
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self._loop.call_at(at, self._fire), at

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = self._loop.time()
        for connection, _ in self._slots.pop_due(now):
            again = silent_until(connection.overdue_at(), self._recheck_s, now)
            if again is None:
                connection.handle_read_timeout()
            else:  # something came meanwhile, or nothing is due yet: look again later
                self._slots.add(connection, again, None)
        self._arm()
