"""The task-free chat downlink (broker/downlink.py; the bytes by broker/mqtt/encoding.py) writes the same bytes
amqtt would, and never reuses a packet id that is still in flight on either path."""

from __future__ import annotations

import asyncio

import pytest
from amqtt.mqtt.publish import PublishPacket

from broker.downlink import DownlinkWriter, PacketIds
from broker.mqtt.encoding import encode_publish, remaining_length


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152])
@pytest.mark.parametrize("qos", [0, 1])
def test_publish_bytes_match_amqtt(size: int, qos: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    packet_id = 4242 if qos else None
    expected = PublishPacket.build("u/bob/in", payload, packet_id, False, qos, False).to_bytes()
    assert encode_publish(b"u/bob/in", payload, qos, packet_id) == expected


def test_remaining_length_examples() -> None:
    # MQTT 3.1.1 table 2.4: the boundaries of 1 to 4 bytes.
    assert remaining_length(0) == b"\x00"
    assert remaining_length(127) == b"\x7f"
    assert remaining_length(128) == b"\x80\x01"
    assert remaining_length(16_383) == b"\xff\x7f"
    assert remaining_length(268_435_455) == b"\xff\xff\xff\x7f"


def test_qos1_needs_packet_id() -> None:
    with pytest.raises(ValueError):
        encode_publish(b"t", b"", 1, None)


def test_packet_ids_skip_those_in_flight() -> None:
    counter = iter([1, 2, 1, 3, 2, 4])
    ids = PacketIds(lambda: next(counter))
    assert [ids.take(), ids.take(), ids.take()] == [1, 2, 3]  # the second 1 is still in flight
    assert ids.release(2) is True
    assert ids.release(2) is False  # not a chat id (any more): amqtt's handler takes it
    assert ids.take() == 2


def test_packet_ids_exhausted() -> None:
    ids = PacketIds(lambda: 7)
    assert ids.take() == 7
    assert ids.take() is None  # the only id the counter gives is in flight


def test_packet_ids_stop_at_the_limit_without_searching() -> None:
    """Past ``limit`` unacknowledged ids ``take`` answers None at once: the search for a free id
    cost up to 65,535 probes per item for a client that never acknowledged (tests/chaos)."""
    calls = 0

    def counter() -> int:
        nonlocal calls
        calls += 1
        return calls

    ids = PacketIds(counter, limit=3)
    assert [ids.take(), ids.take(), ids.take()] == [1, 2, 3]
    assert ids.take() is None and calls == 3
    assert ids.release(2)
    assert ids.take() == 4


class _Sink:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


async def test_writes_once_per_loop_iteration_in_order() -> None:
    sink = _Sink()
    writer = DownlinkWriter(sink, asyncio.get_running_loop())  # type: ignore[arg-type]  # duck-typed writer
    for n in range(5):
        writer.write(bytes([n]))
    assert sink.writes == []  # nothing before the loop runs
    await asyncio.sleep(0)
    assert sink.writes == [bytes(range(5))]
    writer.write(b"\x09")
    await asyncio.sleep(0)
    assert sink.writes == [bytes(range(5)), b"\x09"]
