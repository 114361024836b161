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
collect, freeze) once the heap has grown by a quarter since the last one, the
same proportion CPython uses to schedule its own full collections: the pause is
then paid once per that much growth, not every few seconds.

The heap is measured in memory blocks in use (``sys.getallocatedblocks``: ~0.3 ms
with 5 million), from the fewest since the last full collection. It used to be the
number of objects frozen since then, an upper bound that grew with the traffic: the
messages in flight at each freeze count although they die by reference count soon
after. Under a steady load with 10,000 idle phones that scheduled a full collection
(130-211 ms with nothing served, 0 unreachable objects found) every few tens of
seconds, each one a spike of 70-160 ms in the p99 of ``bench compare``. The blocks
in use stay flat under a steady load and grow with what really stays: new
connections, a filling dedup memory, leaked cycles.

A full collection that reclaims almost nothing doubles the growth that schedules the
next one, up to ``MAX_GROWTH``; one that finds cycles sets it back to a quarter. On
the lean connection path a closed connection leaves no cycles.

``decide`` is the rule (pure); ``GcTuner`` applies it to the interpreter.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from dataclasses import dataclass
from enum import Enum

from bridge.background import cancel
from chatserver.supervisor import Supervisor

log = logging.getLogger(__name__)

FREEZE_MIN_OBJECTS = 2_000  # survivors worth a freeze; fewer cost nothing to scan
FULL_GROWTH = 0.25  # CPython's own ratio for full collections (gcmodule.c, long_lived_pending)
FULL_FLOOR = 100_000  # below this many blocks in use a full collection is cheap anyway
MAX_GROWTH = 4.0  # after fruitless full collections, the next waits for the heap to grow 4-fold at most
FRUITLESS = 0.01  # a full collection that reclaims under 1% of what it keeps found next to nothing


class Action(Enum):
    NOTHING = "nothing"
    FREEZE = "freeze"
    COLLECT = "collect"


@dataclass(frozen=True, slots=True)
class Heap:
    old: int  # objects in the oldest collected generation (survivors since the last freeze)
    grown: int  # memory blocks in use now, minus the fewest in use since the last full collection
    base: int  # memory blocks in use right after the last full collection


def decide(heap: Heap, floor: int = FULL_FLOOR, growth: float = FULL_GROWTH) -> Action:
    """What to do now: a full collection when the heap grew by ``growth`` (a quarter, unless the last
    ones were fruitless: ``next_growth``), else freeze survivors."""
    if heap.grown > max(floor, heap.base) * growth:
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

    def __init__(self, check_s: float = 1.0, full_floor: int = FULL_FLOOR) -> None:
        self._check_s = check_s
        self._full_floor = full_floor
        self._base = sys.getallocatedblocks()  # memory blocks in use after the last full collection
        self._low = self._base  # the fewest in use seen since then
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
        # Only the unfrozen generations are listed here: counting the frozen set
        # (gc.get_freeze_count) walks all of it, ~8 ms per 300,000 objects.
        blocks = sys.getallocatedblocks()
        self._low = min(self._low, blocks)
        old = len(gc.get_objects(generation=2))
        action = decide(Heap(old, blocks - self._low, self._base), self._full_floor, self.growth)
        if action is Action.FREEZE:
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
        kept = gc.get_freeze_count()  # a walk of the set, but after a full collection
        self._base = self._low = sys.getallocatedblocks()
        self.growth = next_growth(self.growth, found, kept)
        log.info("full garbage collection: %d unreachable, %d objects kept, %.0f ms; the next after %.0f%% growth "
                 "of %d memory blocks", found, kept, (time.perf_counter() - started) * 1000, 100 * self.growth,
                 self._base)

    async def _round(self) -> None:
        await asyncio.sleep(self._check_s)
        self.step()
