"""``python -m bench mqtt-core``: parse and encode cost per PUBLISH / PUBACK, the sans-IO core against amqtt.

In one process, no network: the same packets (QoS 1 chat PUBLISHes with bodies of 100 and
1,000 bytes, their PUBACKs) go through

- the core (broker/mqtt/): a connected ``ServerConnection`` fed the stream in 64 KiB chunks
  (what one socket read brings) and drained with ``next_event``; encoded by its commands
  (``publish`` takes a packet id and records it in flight, ``puback`` checks the order);
- amqtt 0.12.1's packet classes as its reader loop uses them: ``MQTTFixedHeader.from_stream``
  then ``PublishPacket.from_stream`` / ``PubackPacket.from_stream`` over a
  ``StreamReaderAdapter`` on an ``asyncio.StreamReader`` that holds the whole stream (so it
  never waits: the favourable case for amqtt); encoded with ``build(...).to_bytes()``.

Per operation: the best of several rounds (core and amqtt in turns) of the time per packet,
the ratio amqtt / core, and (tracemalloc, a separate pass) the bytes held per parsed packet
while the packets are kept. Nothing here asserts a figure.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from amqtt.adapters import StreamReaderAdapter
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket

from bench.common import md_table
from bench.conn import message_parts
from broker.mqtt.connection import ServerConnection
from broker.mqtt.encoding import encode, encode_puback, encode_publish
from broker.mqtt.events import Connect
from broker.mqtt.limits import WireLimits

SIZES = {"tiny": (2_000, 2), "quick": (20_000, 5), "full": (50_000, 9)}  # packets per round, rounds
BODIES = (100, 1000)
CHUNK = 65536
UPLINK, DOWNLINK = b"u/alice/out", "u/bob/in"
LIMITS = WireLimits(max_packet_bytes=4 * 1024 * 1024)
OPS = ("PUBLISH in (parse)", "PUBACK out (encode)", "PUBLISH out (encode)", "PUBACK in (parse)")


def _ids(n: int) -> list[int]:
    return [i % 65535 + 1 for i in range(n)]


def _payloads(n: int, body: int) -> list[bytes]:
    _, prefix, suffix = message_parts("chat", "alice", "bob", body)
    return [prefix + str(i).encode() + suffix for i in range(n)]


def _chunks(data: bytes) -> list[bytes]:
    return [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]


def _connected() -> ServerConnection:
    conn = ServerConnection(LIMITS, 0.0, max_unacked=65535)
    conn.receive_data(encode(Connect("alice.phone", keepalive=60)), 0.0)
    conn.next_event()
    conn.accept()
    conn.data_to_send()
    return conn


# The core.

def _core_read(conn: ServerConnection, chunks: list[bytes], keep: list[object]) -> float:
    started = time.perf_counter()
    for chunk in chunks:
        conn.receive_data(chunk, 0.0)
        while (event := conn.next_event()) is not None:
            keep.append(event)
    return time.perf_counter() - started


def core_parse_publish(chunks: list[bytes], keep: list[object]) -> float:
    return _core_read(_connected(), chunks, keep)


def core_encode_puback(ids: list[int]) -> float:
    conn = _connected()
    conn.receive_data(b"".join(encode_publish(UPLINK, b"x", 1, i) for i in ids), 0.0)
    while conn.next_event() is not None:
        pass
    started = time.perf_counter()
    for packet_id in ids:
        conn.puback(packet_id)
    conn.data_to_send()
    return time.perf_counter() - started


def core_encode_publish(payloads: list[bytes]) -> float:
    conn = _connected()
    started = time.perf_counter()
    for payload in payloads:
        conn.publish(DOWNLINK, payload, 1)
    conn.data_to_send()
    return time.perf_counter() - started


def core_parse_puback(payloads: list[bytes], keep: list[object]) -> float:
    conn = _connected()
    ids = [conn.publish(DOWNLINK, payload, 1) or 0 for payload in payloads]
    conn.data_to_send()
    return _core_read(conn, _chunks(b"".join(encode_puback(i) for i in ids)), keep)


# amqtt 0.12.1.

async def _amqtt_read(data: bytes, n: int, cls: Any, keep: list[object]) -> float:
    reader = asyncio.StreamReader(limit=len(data) + 1)
    reader.feed_data(data)
    adapter = StreamReaderAdapter(reader)
    started = time.perf_counter()
    for _ in range(n):
        header = await MQTTFixedHeader.from_stream(adapter)
        keep.append(await cls.from_stream(adapter, fixed_header=header))
    return time.perf_counter() - started


def amqtt_encode_puback(ids: list[int]) -> float:
    started = time.perf_counter()
    for packet_id in ids:
        PubackPacket.build(packet_id).to_bytes()
    return time.perf_counter() - started


def amqtt_encode_publish(payloads: list[bytes]) -> float:
    started = time.perf_counter()
    for packet_id, payload in zip(_ids(len(payloads)), payloads, strict=True):
        PublishPacket.build(DOWNLINK, payload, packet_id, False, 1, False).to_bytes()
    return time.perf_counter() - started


def _best_of_both(rounds: int, core: Callable[[], float], amqtt: Callable[[], float]) -> tuple[float, float]:
    """The best round of each, the two measured in turns so that a busy moment of the machine falls on both."""
    best_core = best_amqtt = float("inf")
    for _ in range(rounds):
        gc.collect()
        best_core = min(best_core, core())
        gc.collect()
        best_amqtt = min(best_amqtt, amqtt())
    return best_core, best_amqtt


def _held_bytes(parse: Callable[[list[object]], float], n: int) -> int:
    """Bytes tracemalloc sees held after parsing ``n`` packets and keeping them, per packet."""
    keep: list[object] = []
    keep.extend([None] * n)  # the list's own slots, before the baseline
    keep.clear()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        parse(keep)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return round((after - before) / n)


def idle_connection_bytes(n: int = 2000) -> int:
    """Bytes tracemalloc sees per connected, idle ServerConnection (its CONNECT event included)."""
    return _held_bytes(lambda keep: _idle_connections(n, keep), n)


def _idle_connections(n: int, keep: list[object]) -> float:
    for _ in range(n):
        keep.append(_connected())
    return 0.0


def measure_body(body: int, n: int, rounds: int, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    payloads = _payloads(n, body)
    ids = _ids(n)
    publishes = b"".join(encode_publish(UPLINK, p, 1, i) for p, i in zip(payloads, ids, strict=True))
    pubacks = b"".join(encode_puback(i) for i in ids)
    chunks = _chunks(publishes)

    def amqtt(data: bytes, cls: Any) -> Callable[[list[object]], float]:
        return lambda keep: loop.run_until_complete(_amqtt_read(data, n, cls, keep))

    core_ops: dict[str, Callable[[], float]] = {
        OPS[0]: lambda: core_parse_publish(chunks, []), OPS[1]: lambda: core_encode_puback(ids),
        OPS[2]: lambda: core_encode_publish(payloads), OPS[3]: lambda: core_parse_puback(payloads, []),
    }
    amqtt_ops: dict[str, Callable[[], float]] = {
        OPS[0]: lambda: amqtt(publishes, PublishPacket)([]), OPS[1]: lambda: amqtt_encode_puback(ids),
        OPS[2]: lambda: amqtt_encode_publish(payloads), OPS[3]: lambda: amqtt(pubacks, PubackPacket)([]),
    }
    rows: dict[str, dict[str, Any]] = {}
    for op in OPS:
        core_s, amqtt_s = _best_of_both(rounds, core_ops[op], amqtt_ops[op])
        core_us, amqtt_us = core_s / n * 1e6, amqtt_s / n * 1e6
        rows[op] = {"core_us": round(core_us, 3), "amqtt_us": round(amqtt_us, 3),
                    "amqtt_over_core": round(amqtt_us / core_us, 1)}
    held = {
        OPS[0]: (_held_bytes(lambda keep: core_parse_publish(chunks, keep), n),
                 _held_bytes(amqtt(publishes, PublishPacket), n)),
        OPS[3]: (_held_bytes(lambda keep: core_parse_puback(payloads, keep), n),
                 _held_bytes(amqtt(pubacks, PubackPacket), n)),
    }
    for op, (core_b, amqtt_b) in held.items():
        rows[op]["core_held_bytes"], rows[op]["amqtt_held_bytes"] = core_b, amqtt_b
    for name, (a, b) in {"QoS 1 in: PUBLISH parsed + PUBACK encoded": (OPS[0], OPS[1]),
                         "QoS 1 out: PUBLISH encoded + PUBACK parsed": (OPS[2], OPS[3])}.items():
        core_us = rows[a]["core_us"] + rows[b]["core_us"]
        amqtt_us = rows[a]["amqtt_us"] + rows[b]["amqtt_us"]
        rows[name] = {"core_us": round(core_us, 3), "amqtt_us": round(amqtt_us, 3),
                      "amqtt_over_core": round(amqtt_us / core_us, 1)}
    return {"payload_bytes": len(payloads[0]), "ops": rows}


def run(size: str, echo: Callable[[str], None] = print) -> dict[str, Any]:
    n, rounds = SIZES[size]
    loop = asyncio.new_event_loop()
    try:
        bodies = {}
        for body in BODIES:
            bodies[str(body)] = result = measure_body(body, n, rounds, loop)
            for op, row in result["ops"].items():
                echo(f"[mqtt-core] body {body}: {op}: core {row['core_us']} µs, amqtt {row['amqtt_us']} µs,"
                     f" ratio {row['amqtt_over_core']}")
    finally:
        loop.close()
    idle = idle_connection_bytes()
    echo(f"[mqtt-core] an idle connected ServerConnection: {idle} bytes")
    return {"packets_per_round": n, "rounds": rounds, "chunk_bytes": CHUNK, "python": sys.version.split()[0],
            "bodies": bodies, "idle_connection_bytes": idle}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# The sans-IO MQTT core against amqtt's packet classes", "", f"`{result['command']}`", "",
             f"{result['packets_per_round']:,} packets per round, best of {result['rounds']} rounds (the two in"
             f" turns), time per packet in one process (Python {result['python']}). The core is fed"
             f" {result['chunk_bytes']:,}-byte chunks; amqtt's reader reads from a StreamReader that already"
             " holds the whole stream. 'held' is what tracemalloc sees allocated per parsed packet while the"
             f" packets are kept. The machine's load average was {result['machine']['load_average_1m']:.1f} at the"
             f" start ({result['machine']['nproc']} cores): other work makes the figures noisier, the ratio less"
             " so (the two run in turns).", ""]
    rows = []
    for body, data in result["bodies"].items():
        for op, row in data["ops"].items():
            rows.append([f"{body} ({data['payload_bytes']} B payload)", op, row["core_us"], row["amqtt_us"],
                         row["amqtt_over_core"], row.get("core_held_bytes"), row.get("amqtt_held_bytes")])
    lines += md_table(["body", "operation", "core µs", "amqtt µs", "amqtt / core", "core held B",
                       "amqtt held B"], rows, "llrrrrr")
    lines += ["", f"An idle connection's state in the core (a connected `ServerConnection` with its CONNECT event):"
                  f" {result['idle_connection_bytes']:,} bytes (tracemalloc)."]
    return "\n".join([*lines, ""])
