"""The garbage-collector rule (chatserver/gc_policy.py): freeze survivors, and run a full
collection only once the heap (memory blocks in use) has grown by a quarter since the last one."""

from __future__ import annotations

import gc
import sys

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
    heap = Heap(old=FREEZE_MIN_OBJECTS - 1, grown=0, base=FULL_FLOOR)
    assert decide(heap) is Action.NOTHING


def test_survivors_are_frozen() -> None:
    assert decide(Heap(old=FREEZE_MIN_OBJECTS, grown=0, base=FULL_FLOOR)) is Action.FREEZE


def test_full_collection_after_a_quarter_of_growth() -> None:
    base = 4 * FULL_FLOOR
    assert decide(Heap(old=0, grown=base // 4, base=base)) is Action.NOTHING
    assert decide(Heap(old=0, grown=base // 4 + 1, base=base)) is Action.COLLECT


def test_small_heaps_use_the_floor() -> None:
    # 10 blocks in use after the last collection: 1,000 more is no reason for a full pass.
    assert decide(Heap(old=0, grown=1_000, base=10)) is Action.NOTHING
    assert decide(Heap(old=0, grown=FULL_FLOOR, base=10)) is Action.COLLECT


class _Node:
    def __init__(self) -> None:
        self.peer: _Node | None = None


def _cycles_until(blocks: int) -> list[_Node]:
    """Pairs of objects in a cycle (one of each pair listed), until more than ``blocks`` memory blocks are in use."""
    nodes: list[_Node] = []
    while sys.getallocatedblocks() <= blocks:
        for _ in range(FREEZE_MIN_OBJECTS):
            a, b = _Node(), _Node()
            a.peer, b.peer = b, a  # a cycle: only the collector can free it
            nodes.append(a)
    return nodes


def test_frozen_cycles_are_reclaimed_by_the_full_collection() -> None:
    tuner = GcTuner(full_floor=0)
    tuner.collect_and_freeze()
    try:
        before, base = gc.get_freeze_count(), sys.getallocatedblocks()
        nodes = _cycles_until(int(base * (1 + FULL_GROWTH / 2)))
        count = len(nodes)
        gc.collect(1)  # move them into the oldest generation, as time would
        gc.collect(1)
        assert tuner.step() is Action.FREEZE  # an eighth more: frozen, not collected
        assert gc.get_freeze_count() >= before + 2 * count
        nodes += _cycles_until(int(base * (1 + 2 * FULL_GROWTH)))
        gc.collect(1)
        gc.collect(1)
        del nodes
        assert tuner.step() is Action.COLLECT  # more than a quarter grown since the last full pass
        assert gc.get_freeze_count() < before + count  # the cycles are gone
    finally:
        gc.unfreeze()


def test_a_steady_load_schedules_no_full_collection() -> None:
    """Objects frozen while in flight and freed later (by reference count) are no growth: before, each
    freeze counted them, and a steady load ran a full collection every few tens of seconds."""
    tuner = GcTuner(full_floor=0)
    tuner.collect_and_freeze()
    try:
        base = sys.getallocatedblocks()
        for _ in range(8):  # eight rounds, each freezing a tenth of the heap in short-lived objects: 80% in all
            in_flight = [{"seq": n, "ids": [str(n)]} for n in range(base // 40)]
            gc.collect(1)
            gc.collect(1)
            assert tuner.step() is Action.FREEZE
            del in_flight  # acked: freed by reference count although frozen
        assert tuner.step() is not Action.COLLECT
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
    assert decide(Heap(old=0, grown=base, base=base), growth=1.0) is Action.NOTHING
    assert decide(Heap(old=0, grown=base + 1, base=base), growth=1.0) is Action.COLLECT


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
