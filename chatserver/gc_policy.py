"""Keep the cyclic garbage collector off the long-lived connection objects.

Each connected phone holds ~340 GC-tracked objects (amqtt's session, handler,
queues, tasks). With 10,000 connected, every full collection walks 3.5 million
objects: 1.4-1.6 s during which nothing is served, and a third of the CPU
(bench/results/analysis.md section 2). Those objects live as long as their
connection; the garbage a message makes is young and dies by reference count.

So, as CPython's docs suggest for long-lived objects (``gc.freeze``): objects
that survived into the oldest generation are moved, every ``check_s``, to the
permanent generation, which collections skip. Objects there are still freed by
reference counting; only *cycles* among them (a closed connection's task and
protocol objects) wait. They are reclaimed by a full collection (unfreeze,
collect, freeze) once the objects frozen since the last one amount to a quarter
of what survived it,
the same proportion CPython uses to schedule its own full collections: the pause
is then paid once per that much growth, not every few seconds.

A full collection that reclaims almost nothing doubles the growth that schedules the
next one, up to ``MAX_GROWTH``; one that finds cycles sets it back to a quarter. On
the lean connection path a closed connection leaves no cycles: with 10,000 idle
phones each full collection paused the broker ~130 ms to find 0 unreachable objects,
every ~10 s under load (the messages' short-lived objects count as growth while they
are frozen), and put 35 ms into the p99 latency of bench compare's 500 msg/s phase.

``decide`` is the rule (pure); ``GcTuner`` applies it to the interpreter.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass
from enum import Enum

from bridge.background import cancel
from chatserver.supervisor import Supervisor

log = logging.getLogger(__name__)

FREEZE_MIN_OBJECTS = 2_000  # survivors worth a freeze; fewer cost nothing to scan
FULL_GROWTH = 0.25  # CPython's own ratio for full collections (gcmodule.c, long_lived_pending)
FULL_FLOOR = 100_000  # below this many frozen objects a full collection is cheap anyway
MAX_GROWTH = 4.0  # after fruitless full collections, the next waits for the frozen set to grow 4-fold at most
FRUITLESS = 0.01  # a full collection that reclaims under 1% of what it keeps found next to nothing


class Action(Enum):
    NOTHING = "nothing"
    FREEZE = "freeze"
    COLLECT = "collect"


@dataclass(frozen=True, slots=True)
class Heap:
    old: int  # objects in the oldest collected generation (survivors since the last freeze)
    added: int  # objects frozen since the last full collection (some have died since: an upper bound)
    frozen_after_collect: int  # frozen objects right after the last full collection


def decide(heap: Heap, floor: int = FULL_FLOOR, growth: float = FULL_GROWTH) -> Action:
    """What to do now: a full collection when the frozen set grew by ``growth`` (a quarter, unless the last
    ones were fruitless: ``next_growth``), else freeze survivors."""
    if heap.added > max(floor, heap.frozen_after_collect) * growth:
        return Action.COLLECT
    if heap.old >= FREEZE_MIN_OBJECTS:
        return Action.FREEZE
    return Action.NOTHING


def next_growth(growth: float, found: int, kept: int) -> float:
    """The growth that schedules the next full collection, after one that found ``found`` unreachable objects
    and kept ``kept``: doubled (up to ``MAX_GROWTH``) if it was fruitless, else back to ``FULL_GROWTH``."""
    if found < FRUITLESS * kept:
        return min(growth * 2, MAX_GROWTH)
    return FULL_GROWTH


class GcTuner:
    """Applies ``decide`` every ``check_s`` seconds. One per process: the GC is process-wide."""

    def __init__(self, check_s: float = 5.0, full_floor: int = FULL_FLOOR) -> None:
        self._check_s = check_s
        self._full_floor = full_floor
        self._frozen_after_collect = 0
        self._added = 0
        self.growth = FULL_GROWTH
        self._task: asyncio.Task[None] | None = None

    def start(self, supervisor: Supervisor) -> None:
        self.collect_and_freeze()
        self._task = supervisor.spawn("gc", self._round)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel([self._task])
            self._task = None
        gc.unfreeze()

    def step(self) -> Action:
        # Only the unfrozen generations are measured here: counting the frozen set
        # (gc.get_freeze_count) walks all of it, ~100 ms with 10,000 connected.
        old = len(gc.get_objects(generation=2))
        action = decide(Heap(old, self._added, self._frozen_after_collect), self._full_floor, self.growth)
        if action is Action.FREEZE:
            self._added += old + len(gc.get_objects(generation=1)) + len(gc.get_objects(generation=0))
            gc.freeze()
        elif action is Action.COLLECT:
            self.collect_and_freeze()
        return action

    def collect_and_freeze(self) -> None:
        """One full collection over everything, then freeze what survived."""
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self._frozen_after_collect = gc.get_freeze_count()  # a walk of the set, but after a full collection
        self._added = 0
        self.growth = next_growth(self.growth, found, self._frozen_after_collect)
        log.info("full garbage collection: %d unreachable, %d objects kept, %.0f ms; the next after %.0f%% growth",
                 found, self._frozen_after_collect, (time.perf_counter() - started) * 1000, 100 * self.growth)

    async def _round(self) -> None:
        await asyncio.sleep(self._check_s)
        self.step()
