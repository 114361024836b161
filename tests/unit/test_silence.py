"""Keepalive deadlines on one timer (broker/silence.py): the slot rules with explicit times, then the watch."""

from __future__ import annotations

import asyncio
import math

from broker.silence import SilenceSlots, SilenceWatch, silent_until


def test_a_key_is_due_at_the_end_of_its_slot_never_before() -> None:
    slots: SilenceSlots[str, int] = SilenceSlots(slot_s=1.0)
    slots.add("a", 10.2, 1)
    slots.add("b", 10.0, 2)
    slots.add("c", 12.5, 3)
    assert len(slots) == 3 and slots.next_at() == 10.0
    assert slots.pop_due(9.99) == []
    assert slots.pop_due(10.0) == [("b", 2)]
    assert slots.next_at() == 11.0 and slots.pop_due(10.9) == []
    assert slots.pop_due(20.0) == [("a", 1), ("c", 3)], "in slot order"
    assert len(slots) == 0 and slots.next_at() is None


def test_discarded_and_moved_keys() -> None:
    slots: SilenceSlots[str, int] = SilenceSlots(slot_s=1.0)
    slots.add("a", 5.0, 1)
    slots.add("b", 5.0, 2)
    slots.discard("a")
    slots.discard("nobody")
    slots.add("b", 8.0, 3)  # added again: moves, with its new value
    assert slots.next_at() == 8.0, "the emptied slot of 5 s is skipped"
    assert slots.pop_due(7.0) == [] and slots.pop_due(8.0) == [("b", 3)]
    slots.add("a", 5.0, 4)  # a slot made again after it was emptied
    assert slots.pop_due(6.0) == [("a", 4)] and slots.pop_due(100.0) == []


def test_silent_until() -> None:
    assert silent_until(overdue_at=190.0, recheck_s=30.0, now=190.0) is None
    assert silent_until(overdue_at=240.0, recheck_s=30.0, now=190.0) == 220.0, "looked at again within recheck_s"
    assert silent_until(overdue_at=200.0, recheck_s=30.0, now=190.0) == 200.0
    assert silent_until(overdue_at=math.inf, recheck_s=30.0, now=190.0) == 220.0, "nothing due: still looked at"


class Conn:
    def __init__(self, loop: asyncio.AbstractEventLoop, deadline_s: float = 0.1) -> None:
        self.loop = loop
        self.last = loop.time()
        self.deadline_s = deadline_s
        self.packet_started = math.inf
        self.timed_out = asyncio.Event()
        self.at: float | None = None

    def overdue_at(self) -> float:
        return min(self.last + self.deadline_s, self.packet_started + 0.1)

    def handle_read_timeout(self) -> None:
        self.at = self.loop.time()
        self.timed_out.set()


async def test_watch_drops_the_silent_keeps_the_talking_and_forgets_the_gone() -> None:
    loop = asyncio.get_running_loop()
    watch = SilenceWatch(loop, recheck_s=0.1, slot_s=0.02)
    silent, talking, gone = Conn(loop), Conn(loop), Conn(loop)
    for conn in (silent, talking, gone):
        watch.watch(conn)
    watch.forget(gone)
    started = talking.last
    talking.last = started + 0.08  # read something before its first deadline: looked at again later
    await asyncio.wait_for(silent.timed_out.wait(), 2)
    assert silent.at is not None and silent.at >= silent.last + 0.1, "never before the deadline"
    assert not talking.timed_out.is_set() and not gone.timed_out.is_set()
    await asyncio.wait_for(talking.timed_out.wait(), 2)
    assert talking.at is not None and talking.at >= started + 0.18
    assert not gone.timed_out.is_set(), "forgotten: its deadline passed long ago"
    assert len(watch) == 0


async def test_a_packet_started_later_is_caught_by_the_recheck() -> None:
    """No keepalive (never silent), but a packet begun after the last look is overdue by its own deadline."""
    loop = asyncio.get_running_loop()
    watch = SilenceWatch(loop, recheck_s=0.1, slot_s=0.02)
    idle, stalled = Conn(loop, deadline_s=math.inf), Conn(loop, deadline_s=math.inf)
    watch.watch(idle)
    watch.watch(stalled)
    await asyncio.sleep(0)  # nothing is due: both are only looked at again within recheck_s
    stalled.packet_started = loop.time()
    await asyncio.wait_for(stalled.timed_out.wait(), 2)
    assert stalled.at is not None and stalled.at >= stalled.packet_started + 0.1, "never before the deadline"
    assert not idle.timed_out.is_set() and len(watch) == 1, "the idle one is still watched"
    watch.forget(idle)
