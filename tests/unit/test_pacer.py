"""The per-connection publish pacer (broker/wire.py): a burst at once, then the rate, by waiting."""

from __future__ import annotations

import pytest

from broker.pacing import Pacer


def test_burst_then_waits_at_the_rate() -> None:
    pacer = Pacer(rate=100.0, burst=3, now=0.0)
    assert [pacer.wait_s(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert pacer.wait_s(0.0) == pytest.approx(0.01)
    assert pacer.wait_s(0.0) == pytest.approx(0.02)  # each waiting publish queues behind the last


def test_refills_with_time_up_to_the_burst() -> None:
    pacer = Pacer(rate=10.0, burst=2, now=0.0)
    pacer.wait_s(0.0)
    pacer.wait_s(0.0)
    assert pacer.wait_s(0.1) == 0.0  # one token came back in 0.1 s
    assert pacer.wait_s(100.0) == 0.0 and pacer.wait_s(100.0) == 0.0
    assert pacer.wait_s(100.0) > 0  # never more than the burst saved up
