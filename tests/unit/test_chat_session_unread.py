"""``ChatSession.send`` against a transport that has paused writing (broker/chat_session.py): under
``UNREAD_DOWNLINK_MAX`` waiting bytes an item is written at once (so the transport's buffer counts it),
above it the item is dropped for that reason; the unacked cap keeps its own reason; with writing not
paused the buffer is not looked at. A fake transport and hub, no socket (tests/test_unread_downlinks.py
has the real one)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any, cast

import pytest

from broker import lean
from broker.chat_session import ChatSession, Dropped
from broker.counters import BrokerCounters
from broker.downlink import UNREAD_DOWNLINK_MAX
from broker.mqtt.events import Connect
from broker.mqtt.limits import WireLimits
from broker.port import ChatPort
from chatproto import Caller
from chatserver.app import broker_settings
from chatserver.config import Settings
from testkit.packets import connect_packet


class Transport:
    """What a session asks of its transport; ``waiting`` is what get_write_buffer_size reports."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.waiting = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.waiting

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.waiting += len(data)


class Bridge:
    def device_online(self, user: str, link: object) -> None:
        pass

    def device_offline(self, user: str, link: object) -> None:
        pass


class Hub:
    def __init__(self, max_unacked: int) -> None:
        self.limits = WireLimits(max_packet_bytes=1 << 20)
        self.connect_timeout_s = 10.0
        self.max_unacked = max_unacked
        self.max_unread = UNREAD_DOWNLINK_MAX
        self.bridge = cast("ChatPort", Bridge())  # the two calls linking an inbox make
        self.counters = BrokerCounters()
        self.drops: list[Dropped] = []

    def now(self) -> float:
        return 0.0

    def opened(self, session: ChatSession) -> bool:
        return True

    def route(self, session: ChatSession, connect: Connect) -> bool:
        session.head = None
        session.hold()
        return True

    def remember_inbox(self, session: ChatSession, qos: int | None) -> None:
        pass

    def dropped(self, session: ChatSession, why: Dropped) -> None:
        self.drops.append(why)

    def ended(self, session: ChatSession) -> None:
        pass

    def lost(self, session: ChatSession) -> None:
        pass


async def _linked(qos: int, max_unacked: int = 100) -> tuple[ChatSession, Transport, Hub]:
    """A session logged in as alice.phone with its inbox linked at ``qos``, its CONNACK written."""
    hub = Hub(max_unacked)
    session = ChatSession(hub, "tcp")
    transport = Transport()
    session.connection_made(transport)  # type: ignore[arg-type]
    session.data_received(connect_packet("alice.phone", "alice", "pw"))
    assert session.accepted(Caller("alice", "phone"), False, qos)
    await asyncio.sleep(0)  # the session's call_soon flush
    assert len(transport.written) == 1  # the CONNACK
    transport.written.clear()
    return session, transport, hub


def test_while_writing_is_paused_items_go_out_at_once_until_the_cap() -> None:
    async def main() -> None:
        session, transport, hub = await _linked(qos=0)
        session.pause_writing()
        transport.waiting = UNREAD_DOWNLINK_MAX - 10  # still under: written at once, not held in the core
        session.send(b"a" * 100)
        assert len(transport.written) == 1 and transport.written[0].endswith(b"a" * 100)
        assert hub.drops == [] and transport.waiting > UNREAD_DOWNLINK_MAX
        session.send(b"b" * 100)  # over: dropped, for that reason
        session.send(b"c" * 100)
        await asyncio.sleep(0)
        assert len(transport.written) == 1 and hub.drops == ["unread", "unread"]
    asyncio.run(main())


def test_with_writing_not_paused_the_buffer_is_not_looked_at() -> None:
    async def main() -> None:
        session, transport, hub = await _linked(qos=0)
        transport.waiting = 10 * UNREAD_DOWNLINK_MAX  # only pause_writing says the client does not read
        session.send(b"a" * 100)
        session.send(b"b" * 100)
        assert transport.written == []  # the hot path: once per loop iteration
        await asyncio.sleep(0)
        assert hub.drops == [] and len(transport.written) == 1 and transport.written[0].endswith(b"b" * 100)
        session.pause_writing()
        session.resume_writing()  # it read what was waiting
        session.send(b"c" * 100)
        await asyncio.sleep(0)
        assert hub.drops == [] and transport.written[-1].endswith(b"c" * 100)
    asyncio.run(main())


def test_the_unacked_cap_keeps_its_reason_while_paused() -> None:
    async def main() -> None:
        session, transport, hub = await _linked(qos=1, max_unacked=2)
        session.pause_writing()
        for _ in range(3):
            session.send(b"x")
        assert hub.drops == ["unacked"] and len(transport.written) == 2
    asyncio.run(main())


def test_the_once_per_device_warnings_are_remembered_within_a_bound(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """``LeanSessions.dropped`` warns once per device and reason; the devices it remembers for that are
    bounded (a user can remove devices and add new ones for ever): past the bound it starts over."""
    monkeypatch.setattr(lean, "WARNED_MAX", 2)
    caplog.set_level(logging.WARNING, logger="broker.lean")

    async def drops() -> list[str]:
        counters = BrokerCounters()
        hub = lean.LeanSessions(broker_settings(Settings()), cast(Any, None), cast(Any, None), counters,
                                *(cast(Any, None),) * 5)
        for device in ("a", "a", "b", "b", "c", "a"):  # c fills the memory: a is warned about again
            hub.dropped(cast(ChatSession, SimpleNamespace(client_id=f"alice.{device}")), "unread")
        assert counters.downlink_dropped == 6
        return [r.getMessage().split()[0] for r in caplog.records]

    assert asyncio.run(drops()) == ["alice.a", "alice.b", "alice.c", "alice.a"]
