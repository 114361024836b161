"""The #20 target rows of the benchmark summary (bench/report.py): the lean path beside mosquitto, in one run."""

from __future__ import annotations

from typing import Any

from bench.report import lean_compare_rows, ours_name, ratio_rows


def _phase(idle: int, mode: str, rate: float, cpu: float, p99: float | None = None,
           offered: int | None = None) -> dict[str, Any]:
    phase: dict[str, Any] = {"idle": idle, "mode": mode, "msgs_per_s": rate, "cpu_cores": {"broker": cpu},
                             "offered_per_s": offered}
    if p99 is not None:
        phase["deliver"] = {"p99_ms": p99}
    return phase


def _compare() -> dict[str, Any]:
    lean = [_phase(2000, "max", 10_000, 1.0), _phase(10_000, "max", 12_000, 0.96),
            _phase(10_000, "rate", 500, 0.2, p99=0.8, offered=500)]
    mosquitto = [_phase(2000, "max", 80_000, 0.8), _phase(10_000, "max", 80_000, 0.8)]
    return {"targets": {"chat-lean": {"phases": lean}, "mosquitto": {"phases": mosquitto},
                        "amqtt": {"phases": [_phase(10_000, "max", 240, 1.0)]}}}


def test_the_lean_targets_are_judged_from_one_run() -> None:
    rows = {row[0]: row[1:] for row in lean_compare_rows(_compare())}
    assert rows["lean: broker CPU per message <= 4x mosquitto's (2,000 idle)"] == ["100 vs 10.0 µs = 10.0x", "NOT met"]
    assert rows["lean: broker CPU per message <= 4x mosquitto's (10,000 idle)"] == ["80 vs 10.0 µs = 8.0x", "NOT met"]
    assert rows["lean: msg/s with 10,000 idle >= 3x 3,939 (11,817)"] == ["12,000 msg/s", "met"]
    assert rows["lean: p99 publish -> recipient <= 1 ms at 500 msg/s (10,000 idle)"] == ["0.80 ms", "met"]


def test_ours_is_the_default_path_when_chat_was_not_run() -> None:
    compare = _compare()
    assert ours_name(compare) == "chat-lean"
    assert ratio_rows(compare)[-1][:4] == [10_000, 12_000, 240, 80_000]
    compare["targets"]["chat"] = {"phases": [_phase(10_000, "max", 5_000, 1.0)]}
    assert ours_name(compare) == "chat"
