"""The periodic look at a node's local queues, spread over ``cluster.poll_s`` (pure).

A node reads each connected device's queue every ``poll_s`` without a nudge, so that a nudge
its sender could not publish delays an item, never loses it (docs/PROTOCOL.md). It used to read
them all at once: one task and one Redis read per device in the same instant, every 300 s (10,000
at once for 10,000 phones, a million at the scale docs/SCALING.md models). ``PollCycle`` hands out
a slice each tick instead, so the reads are spread evenly and each device is still looked at once
per ``poll_s``. A device that connects during a cycle waits for the next one (its link reads its
queue anyway); one that left is skipped by the caller.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable


class PollCycle:
    """Every device once per ``poll_s``, in even slices of one ``tick_s``."""

    __slots__ = ("_left", "_size", "_tick", "_ticks")

    def __init__(self, poll_s: float, tick_s: float) -> None:
        self._ticks = max(1, math.floor(poll_s / tick_s))  # ticks per cycle
        self._tick = 0  # ticks of this cycle so far
        self._left: deque[str] = deque()
        self._size = 0

    def due(self, clients: Callable[[], list[str]]) -> list[str]:
        """The devices to look at on this tick; ``clients`` (the connected ones) is asked when a cycle starts."""
        if self._tick == 0:
            self._left = deque(clients())
            self._size = len(self._left)
        tick, size, ticks = self._tick, self._size, self._ticks
        take = (tick + 1) * size // ticks - tick * size // ticks
        self._tick = (tick + 1) % ticks
        left = self._left
        return [left.popleft() for _ in range(take)]
