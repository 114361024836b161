"""``python -m bench mqtt-core`` still runs (tiny sizes; the figures are not checked)."""

from __future__ import annotations

from bench import mqtt_core
from bench.common import ack_publish, publish_packet, publish_parts, split_packets


def test_the_core_benchmark_runs() -> None:
    result = mqtt_core.run("tiny", echo=lambda line: None)
    ops = result["bodies"]["100"]["ops"]
    assert set(mqtt_core.OPS) <= set(ops)
    assert all(row["core_us"] > 0 and row["amqtt_us"] > 0 for row in ops.values())
    assert "amqtt / core" in mqtt_core.markdown(
        {**result, "command": "python -m bench mqtt-core --tiny", "machine": {"load_average_1m": 0.5, "nproc": 2}})


def test_the_generators_packet_split_gives_whole_packets_at_any_cut() -> None:
    """bench.common.split_packets, which the load generator's clients read with: fed a stream cut anywhere,
    it yields each packet once and whole, and the PUBLISHes' ids and payloads (QoS 1 and 0)."""
    stream = publish_packet(b"u/a/in", 7, b"x" * 300) + ack_publish(b"u/a/ack", b"{}") + bytes([0x20, 2, 0, 0])
    for cut in range(len(stream) + 1):
        seen: list[tuple[int, bytes, bytes]] = []
        rest = b""
        for chunk in (stream[:cut], stream[cut:]):
            buf = rest + chunk
            found, used = split_packets(buf)
            seen += [(first, *publish_parts(buf, first, start, end)) if first >> 4 == 3 else (first, b"", b"")
                     for first, start, end in found]
            rest = buf[used:]
        assert rest == b""
        assert seen == [(0x32, b"\x00\x07", b"x" * 300), (0x30, b"", b"{}"), (0x20, b"", b"")], cut
