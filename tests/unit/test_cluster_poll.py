"""``bridge.cluster.poll.PollCycle``: each connected device's queue is read once per ``poll_s``, spread evenly
over it, never all at once."""

from __future__ import annotations

from collections import Counter

from bridge.cluster.poll import PollCycle


def test_every_device_once_per_cycle_in_even_slices() -> None:
    devices = [f"u{n}.phone" for n in range(1_000)]
    cycle = PollCycle(poll_s=300.0, tick_s=1.0)
    slices = [cycle.due(lambda: devices) for _ in range(300)]
    assert {len(s) for s in slices} == {3, 4}  # 1,000 over 300 ticks: not 1,000 at once
    assert Counter(d for s in slices for d in s) == Counter(devices)  # each once in the 300 ticks
    next_cycle = [cycle.due(lambda: devices[:600]) for _ in range(300)]  # asked again: 600 now
    assert {len(s) for s in next_cycle} == {2}


def test_devices_connected_during_a_cycle_wait_for_the_next() -> None:
    connected = ["a.1", "b.1", "c.1", "d.1"]
    cycle = PollCycle(poll_s=2.0, tick_s=1.0)
    assert cycle.due(lambda: connected) == ["a.1", "b.1"]
    connected.append("e.1")
    assert cycle.due(lambda: connected) == ["c.1", "d.1"]
    assert cycle.due(lambda: connected) == ["a.1", "b.1"]  # five now: two, then three
    assert cycle.due(lambda: connected) == ["c.1", "d.1", "e.1"]


def test_a_poll_shorter_than_a_tick_looks_at_all_each_time() -> None:
    cycle = PollCycle(poll_s=0.5, tick_s=0.5)
    assert cycle.due(lambda: ["a.1", "b.1"]) == ["a.1", "b.1"]
    assert cycle.due(lambda: []) == []
    assert cycle.due(lambda: ["a.1"]) == ["a.1"]
