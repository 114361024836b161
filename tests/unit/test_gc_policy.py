"""The garbage-collector rule (broker/gc_policy.py): freeze survivors, and run a full
collection only once the frozen set has grown by a quarter since the last one."""

from __future__ import annotations

import gc

from broker.gc_policy import FREEZE_MIN_OBJECTS, FULL_FLOOR, Action, GcTuner, Heap, decide


def test_few_survivors_are_left_alone() -> None:
    heap = Heap(old=FREEZE_MIN_OBJECTS - 1, frozen=FULL_FLOOR, frozen_after_collect=FULL_FLOOR)
    assert decide(heap) is Action.NOTHING


def test_survivors_are_frozen() -> None:
    assert decide(Heap(old=FREEZE_MIN_OBJECTS, frozen=FULL_FLOOR, frozen_after_collect=FULL_FLOOR)) is Action.FREEZE


def test_full_collection_after_a_quarter_of_growth() -> None:
    base = 4 * FULL_FLOOR
    assert decide(Heap(old=0, frozen=base + base // 4, frozen_after_collect=base)) is Action.NOTHING
    assert decide(Heap(old=0, frozen=base + base // 4 + 1, frozen_after_collect=base)) is Action.COLLECT


def test_small_heaps_use_the_floor() -> None:
    # 10 frozen objects after the last collection: growth to 1,000 is no reason for a full pass.
    assert decide(Heap(old=0, frozen=1_000, frozen_after_collect=10)) is Action.NOTHING
    assert decide(Heap(old=0, frozen=FULL_FLOOR * 2, frozen_after_collect=10)) is Action.COLLECT


class _Node:
    def __init__(self) -> None:
        self.peer: _Node | None = None


def test_frozen_cycles_are_reclaimed_by_the_full_collection() -> None:
    tuner = GcTuner(full_floor=0)
    tuner.collect_and_freeze()
    try:
        before = gc.get_freeze_count()
        pairs = [(_Node(), _Node()) for _ in range(FREEZE_MIN_OBJECTS)]
        for a, b in pairs:
            a.peer, b.peer = b, a  # a cycle: only the collector can free it
        gc.collect(1)  # move them into the oldest generation, as time would
        gc.collect(1)
        assert tuner.step() is Action.FREEZE
        assert gc.get_freeze_count() >= before + 2 * FREEZE_MIN_OBJECTS
        del pairs, a, b
        assert gc.collect() == 0  # frozen: the collector does not see them
        tuner._frozen_after_collect = 0  # as if the last full collection was long ago
        assert tuner.step() is Action.COLLECT
        assert gc.get_freeze_count() < before + FREEZE_MIN_OBJECTS  # the cycles are gone
    finally:
        gc.unfreeze()
