"""The garbage-collector rule (chatserver/gc_policy.py): freeze survivors, and run a full
collection only once the frozen set has grown by a quarter since the last one."""

from __future__ import annotations

import gc

from chatserver.gc_policy import (
    FREEZE_MIN_OBJECTS,
    FULL_FLOOR,
    FULL_GROWTH,
    MAX_GROWTH,
    Action,
    GcTuner,
    Heap,
    decide,
    next_growth,
)


def test_few_survivors_are_left_alone() -> None:
    heap = Heap(old=FREEZE_MIN_OBJECTS - 1, added=0, frozen_after_collect=FULL_FLOOR)
    assert decide(heap) is Action.NOTHING


def test_survivors_are_frozen() -> None:
    assert decide(Heap(old=FREEZE_MIN_OBJECTS, added=0, frozen_after_collect=FULL_FLOOR)) is Action.FREEZE


def test_full_collection_after_a_quarter_of_growth() -> None:
    base = 4 * FULL_FLOOR
    assert decide(Heap(old=0, added=base // 4, frozen_after_collect=base)) is Action.NOTHING
    assert decide(Heap(old=0, added=base // 4 + 1, frozen_after_collect=base)) is Action.COLLECT


def test_small_heaps_use_the_floor() -> None:
    # 10 frozen objects after the last collection: 1,000 more is no reason for a full pass.
    assert decide(Heap(old=0, added=1_000, frozen_after_collect=10)) is Action.NOTHING
    assert decide(Heap(old=0, added=FULL_FLOOR, frozen_after_collect=10)) is Action.COLLECT


class _Node:
    def __init__(self) -> None:
        self.peer: _Node | None = None


def test_frozen_cycles_are_reclaimed_by_the_full_collection() -> None:
    tuner = GcTuner(full_floor=0)
    tuner.collect_and_freeze()
    try:
        before = gc.get_freeze_count()
        count = max(FREEZE_MIN_OBJECTS, before // 2)  # enough to grow the frozen set by more than a quarter
        pairs = [(_Node(), _Node()) for _ in range(count)]
        for a, b in pairs:
            a.peer, b.peer = b, a  # a cycle: only the collector can free it
        gc.collect(1)  # move them into the oldest generation, as time would
        gc.collect(1)
        assert tuner.step() is Action.FREEZE
        assert gc.get_freeze_count() >= before + 2 * count
        del pairs, a, b
        assert gc.collect() == 0  # frozen: the collector does not see them
        assert tuner.step() is Action.COLLECT  # a quarter more than survived the last full pass
        assert gc.get_freeze_count() < before + count  # the cycles are gone
    finally:
        gc.unfreeze()


def test_fruitless_full_collections_space_out_the_next_ones() -> None:
    growth = FULL_GROWTH
    for expected in (0.5, 1.0, 2.0, MAX_GROWTH, MAX_GROWTH):
        growth = next_growth(growth, found=0, kept=250_000)  # the lean path: nothing unreachable
        assert growth == expected
    assert next_growth(growth, found=2_500, kept=250_000) == FULL_GROWTH, "cycles found: back to a quarter"
    assert next_growth(0.5, found=2_499, kept=250_000) == 1.0
    base = 4 * FULL_FLOOR
    assert decide(Heap(old=0, added=base, frozen_after_collect=base), growth=1.0) is Action.NOTHING
    assert decide(Heap(old=0, added=base + 1, frozen_after_collect=base), growth=1.0) is Action.COLLECT


def test_the_tuner_backs_off_after_a_collection_that_finds_nothing() -> None:
    tuner = GcTuner(full_floor=0)
    try:
        gc.collect()  # nothing left for the tuner's own pass to find
        tuner.collect_and_freeze()
        assert tuner.growth == 2 * FULL_GROWTH
        pairs = [(_Node(), _Node()) for _ in range(max(FREEZE_MIN_OBJECTS, gc.get_freeze_count() // 10))]
        for a, b in pairs:
            a.peer, b.peer = b, a
        del pairs, a, b
        tuner.collect_and_freeze()  # the cycles are found: a quarter again
        assert tuner.growth == FULL_GROWTH
    finally:
        gc.unfreeze()
