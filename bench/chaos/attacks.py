"""Misbehaving clients on raw sockets, each run as its own process so it cannot slow the honest SDK clients.

    python -m bench.chaos.attacks KIND PORT SECONDS [USER PASSWORD [TARGET]]

Prints one JSON line with what it did. KIND is one of:
  mute      a device of USER that reads its inbox but never PUBACKs nor acks (slow consumer)
  deaf      a device of USER that subscribes and then never reads its socket at all
  spam      USER publishes chat messages to TARGET as fast as the socket takes them
  seen      USER publishes seen reports of 1,000 new ids each to TARGET as fast as the socket takes them
  badpw     connection attempts with wrong passwords, as many as it can (from 127.0.0.2)
  big       5 MB PUBLISHes (over the 4 MB packet limit), reconnecting after each close
  deep      50,000-deep JSON as a chat message, over and over
  topics    SUBSCRIBE to and PUBLISH on thousands of distinct topics
  hostile   Hypothesis-generated envelopes, acks, seen, requests, forbidden topics and raw
            MQTT packets (see ``hostile.py``)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import sys
import time
import uuid
from collections import Counter
from typing import Any

from bench.common import PUBLISH, connect_packet, mqtt_str, packet, publish_packet, subscribe_packet


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


def publish_payload(body: bytes) -> tuple[str, bytes]:
    """(topic, payload) of a PUBLISH body (QoS 1)."""
    size = struct.unpack("!H", body[:2])[0]
    return body[2:2 + size].decode(errors="replace"), body[2 + size + 2:]


class Raw:
    """One MQTT connection; ``items`` collects what arrives on the user's inbox (JSON objects)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.items: list[dict[str, Any]] = []
        self.packet_id = 0

    @classmethod
    async def login(cls, port: int, user: str | None, password: str | None, device: str = "x",
                    source: str | None = None) -> tuple[Raw, int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0) if source else None)
        raw = cls(reader, writer)
        writer.write(connect_packet(f"{user}.{device}", user, password, 60))
        first, body = await asyncio.wait_for(read_packet(reader), 30)
        return raw, body[1] if first >> 4 == 2 else -1

    def next_id(self) -> int:
        self.packet_id = self.packet_id % 65535 + 1
        return self.packet_id

    def publish(self, topic: str, payload: bytes) -> None:
        self.writer.write(publish_packet(topic.encode(), self.next_id(), payload))

    async def pump(self, puback: bool = True) -> None:
        """Read until the connection closes; PUBACK each QoS 1 item if ``puback``."""
        try:
            while True:
                first, body = await read_packet(self.reader)
                if first >> 4 == PUBLISH:
                    _topic, payload = publish_payload(body)
                    if puback:
                        self.writer.write(packet(0x40, body[2 + struct.unpack("!H", body[:2])[0]:][:2]))
                    with contextlib.suppress(ValueError):
                        self.items.append(json.loads(payload))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass

    def close(self) -> None:
        self.writer.transport.abort()


def chat(to: str, body: str) -> bytes:
    return json.dumps({"id": uuid.uuid4().hex[:16], "to": to, "body": body}).encode()


async def slow_device(port: int, seconds: float, user: str, password: str, read: bool) -> dict[str, Any]:
    raw, code = await Raw.login(port, user, password, "mute" if read else "deaf")
    raw.writer.write(subscribe_packet(1, f"u/{user}/in"))
    if read:  # read everything, answer nothing
        task = asyncio.ensure_future(raw.pump(puback=False))
        await asyncio.sleep(seconds)
        task.cancel()
    else:  # never read: the kernel buffers fill, then the broker's writes back up
        await asyncio.sleep(seconds)
    raw.close()
    return {"connack": code, "items_read": len(raw.items)}


def seen_report(to: str, n: int) -> bytes:
    return json.dumps({"to": to, "ids": [f"s{n}-{i}" for i in range(1000)]}).encode()


async def spam(port: int, seconds: float, user: str, password: str, target: str, uplink: str = "out") -> dict[str, Any]:
    raw, code = await Raw.login(port, user, password, uplink)
    raw.writer.write(subscribe_packet(1, f"u/{user}/in"))
    reading = asyncio.ensure_future(raw.pump())
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline and not raw.writer.is_closing():
        for _ in range(50):
            raw.publish(f"u/{user}/{uplink}", chat(target, "spam") if uplink == "out" else seen_report(target, sent))
            sent += 1
        try:  # the broker reads a flooder slowly: stop at the deadline, not when the socket has drained
            await asyncio.wait_for(raw.writer.drain(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
    await asyncio.sleep(0.5)
    reading.cancel()
    raw.close()
    codes = Counter(i.get("code") or i.get("status") or i.get("kind") for i in raw.items)
    return {"connack": code, "published": sent, "per_s": round(sent / seconds), "answers": dict(codes)}


async def bad_passwords(port: int, seconds: float, user: str, concurrency: int = 64) -> dict[str, Any]:
    codes: Counter[int] = Counter()
    deadline = time.monotonic() + seconds

    async def one() -> None:
        while time.monotonic() < deadline:
            try:
                raw, code = await Raw.login(port, user, "wrong-" + uuid.uuid4().hex[:8], "bad", source="127.0.0.2")
                raw.close()
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                code = -1
            codes[code] += 1

    await asyncio.gather(*(one() for _ in range(concurrency)))
    attempts = sum(codes.values())
    return {"attempts": attempts, "per_s": round(attempts / seconds),
            "connack_codes": {str(k): v for k, v in codes.items()}}


async def big(port: int, seconds: float, user: str, password: str) -> dict[str, Any]:
    payload = b"x" * (5 * 1024 * 1024)
    sent, closed, deadline = 0, 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        raw, _code = await Raw.login(port, user, password, "big")
        try:
            sent += 1
            raw.publish(f"u/{user}/out", payload)
            await raw.writer.drain()
            await asyncio.wait_for(raw.pump(), 10)
            closed += 1
        except (ConnectionError, OSError, TimeoutError):
            closed += 1
        raw.close()
    return {"payloads_5mb": sent, "connections_closed_by_broker": closed}


async def deep(port: int, seconds: float, user: str, password: str, target: str) -> dict[str, Any]:
    raw, _code = await Raw.login(port, user, password, "deep")
    raw.writer.write(subscribe_packet(1, f"u/{user}/in"))
    reading = asyncio.ensure_future(raw.pump())
    nested = b'{"id":"d1","to":"' + target.encode() + b'","body":' + b"[" * 50000 + b"]" * 50000 + b"}"
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline and not raw.writer.is_closing():
        raw.publish(f"u/{user}/out", nested)
        await raw.writer.drain()
        sent += 1
        await asyncio.sleep(0)
    await asyncio.sleep(0.5)
    reading.cancel()
    raw.close()
    return {"published": sent, "answers": dict(Counter(i.get("code") for i in raw.items))}


async def topics(port: int, seconds: float, user: str, password: str, count: int = 5000) -> dict[str, Any]:
    raw, _code = await Raw.login(port, user, password, "topics")
    reading = asyncio.ensure_future(raw.pump())
    deadline, subs, pubs = time.monotonic() + seconds, 0, 0
    while time.monotonic() < deadline and not raw.writer.is_closing():
        for i in range(count // 10):
            body = struct.pack("!H", raw.next_id()) + mqtt_str(f"t/{uuid.uuid4().hex}/{i}".encode()) + b"\x01"
            raw.writer.write(packet(0x82, body))
            raw.publish(f"u/{user}/x{pubs}", b"{}")
            subs, pubs = subs + 1, pubs + 1
        await raw.writer.drain()
    reading.cancel()
    raw.close()
    return {"subscribes": subs, "publishes": pubs}


def main(argv: list[str]) -> int:
    kind, port, seconds, *rest = argv
    p, s = int(port), float(seconds)
    runs: dict[str, Any] = {
        "mute": lambda: slow_device(p, s, rest[0], rest[1], True),
        "deaf": lambda: slow_device(p, s, rest[0], rest[1], False),
        "spam": lambda: spam(p, s, rest[0], rest[1], rest[2]),
        "seen": lambda: spam(p, s, rest[0], rest[1], rest[2], "seen"),
        "badpw": lambda: bad_passwords(p, s, rest[0]),
        "big": lambda: big(p, s, rest[0], rest[1]),
        "deep": lambda: deep(p, s, rest[0], rest[1], rest[2]),
        "topics": lambda: topics(p, s, rest[0], rest[1]),
    }
    if kind == "hostile":
        from bench.chaos import hostile  # noqa: PLC0415 (Hypothesis only where it is used)

        result = hostile.run(p, s, rest[0], rest[1], rest[2:])
    else:
        result = asyncio.run(runs[kind]())
    print(json.dumps({"kind": kind, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
