"""``python -m bench mqtt-core`` still runs (tiny sizes; the figures are not checked)."""

from __future__ import annotations

from bench import mqtt_core


def test_the_core_benchmark_runs() -> None:
    result = mqtt_core.run("tiny", echo=lambda line: None)
    ops = result["bodies"]["100"]["ops"]
    assert set(mqtt_core.OPS) <= set(ops)
    assert all(row["core_us"] > 0 and row["amqtt_us"] > 0 for row in ops.values())
    assert "amqtt / core" in mqtt_core.markdown(
        {**result, "command": "python -m bench mqtt-core --tiny", "machine": {"load_average_1m": 0.5, "nproc": 2}})
