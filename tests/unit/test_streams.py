"""LeanStreamProtocol (broker/streams.py): drain works as asyncio's, with no deque while nobody waits."""

from __future__ import annotations

import asyncio
from typing import Any

from broker.streams import LeanStreamProtocol, lean_streams_fit


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def close(self) -> None:
        self.closing = True


def connected() -> tuple[LeanStreamProtocol, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = LeanStreamProtocol(reader, loop=loop)
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, asyncio.StreamWriter(transport, protocol, reader, loop)


async def test_drain_waits_while_paused_and_the_deque_exists_only_meanwhile() -> None:
    protocol, writer = connected()
    assert "_drain_waiters" not in vars(protocol)
    await asyncio.wait_for(writer.drain(), 1)  # not paused: at once
    protocol.pause_writing()
    drains = [asyncio.ensure_future(writer.drain()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(d.done() for d in drains) and len(protocol._drain_waiters) == 2
    protocol.resume_writing()
    await asyncio.wait_for(asyncio.gather(*drains), 1)
    assert "_drain_waiters" not in vars(protocol)


async def test_connection_lost_wakes_a_waiting_drain_with_the_error() -> None:
    protocol, writer = connected()
    protocol.pause_writing()
    drain = asyncio.ensure_future(writer.drain())
    await asyncio.sleep(0)
    protocol.connection_lost(ConnectionResetError("gone"))
    try:
        await asyncio.wait_for(drain, 1)
    except ConnectionResetError:
        pass
    else:
        raise AssertionError("the drain should end with the connection's error")
    assert "_drain_waiters" not in vars(protocol)


async def test_this_python_has_the_parts_the_lean_protocol_relies_on() -> None:
    """Run on every CPython the machine has: a Python that renamed them would serve with asyncio's
    protocol (working, 760 bytes more per connection), and this says so."""
    assert lean_streams_fit(asyncio.get_running_loop())
