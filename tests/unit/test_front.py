"""ProxiedServer (broker/front.py) on asyncio's loop and on uvloop (what ``chat-broker run`` uses).

The header and what follows it arrive in one segment, as a load balancer sends them: the stream
must start right after the header, over TCP and over TLS (the ClientHello right behind the
header). Untrusted peers and missing headers are refused and counted; close() ends the listener
and the connections whose header is still awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from broker.counters import BrokerCounters
from broker.front import ProxiedServer, start_proxied_server
from broker.proxy_protocol import Address, TrustedProxies
from tests.test_listeners import make_cert

HEADER = b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 1883\r\n"
IO_S = 5.0

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    return asyncio.run if request.param == "asyncio" else uvloop.run  # type: ignore[no-any-return]


async def echo_server(tls: ssl.SSLContext | None, trusted: str = "127.0.0.1/32",
                      deadline_s: float = IO_S) -> tuple[ProxiedServer, BrokerCounters, list[Address]]:
    """A proxied listener that answers each connection with its client and the first line it reads."""
    counters, clients = BrokerCounters(), []

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: Address) -> None:
        clients.append(client)
        writer.write(f"{client[0]}:{client[1]} ".encode() + await reader.readline())
        await writer.drain()
        writer.close()

    server = await start_proxied_server("tcp", connected, "127.0.0.1", 0, trusted=TrustedProxies([trusted]),
                                        deadline_s=deadline_s, tls=tls, reuse_port=False, backlog=16,
                                        counters=counters)
    return server, counters, clients


def port_of(server: ProxiedServer) -> int:
    return int(server.sockets[0].getsockname()[1])


def test_tcp_stream_starts_after_the_header(run: Runner) -> None:
    async def main() -> None:
        server, counters, _ = await echo_server(None)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(HEADER + b"hello\n")
        assert await asyncio.wait_for(reader.read(), IO_S) == b"198.51.100.7:40000 hello\n"
        writer.close()
        assert counters.refused_proxy == 0
        server.close()
        await server.wait_closed()
        assert not server.is_serving()

    run(main())


def test_tls_handshake_right_behind_the_header(run: Runner, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        server, _, _ = await echo_server(server_tls)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_tls.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        pending = HEADER
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(pending + outgoing.read())  # header and ClientHello in one segment
                pending = b""
                incoming.write(await asyncio.wait_for(reader.read(65536), IO_S))
        tls.write(b"over tls\n")
        writer.write(outgoing.read())
        answer = b""
        while not answer.endswith(b"\n"):
            try:
                answer += tls.read(100)
            except ssl.SSLWantReadError:
                incoming.write(await asyncio.wait_for(reader.read(65536), IO_S))
        assert answer == b"198.51.100.7:40000 over tls\n"
        writer.close()
        server.close()
        await server.wait_closed()

    run(main())


def test_refusals(run: Runner) -> None:
    async def closed_at_once(port: int, data: bytes) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        try:
            return await asyncio.wait_for(reader.read(), IO_S) == b""
        except ConnectionResetError:
            return True
        finally:
            writer.close()

    async def main() -> None:
        untrusting, counters, clients = await echo_server(None, trusted="10.0.0.0/8")
        assert await closed_at_once(port_of(untrusting), HEADER + b"hello\n")
        server, counters2, _ = await echo_server(None, deadline_s=0.3)
        assert await closed_at_once(port_of(server), b"\x10\x0c\x00\x04MQTT")  # no header: MQTT at once
        assert await closed_at_once(port_of(server), HEADER[:10])  # a part of one, then nothing
        assert (counters.refused_proxy, counters2.refused_proxy, clients) == (1, 2, [])
        # close() also ends a connection whose header is still awaited
        stalled = socket.create_connection(("127.0.0.1", port_of(untrusting)))
        slow, _, _ = await echo_server(None, deadline_s=60)
        waiting = socket.create_connection(("127.0.0.1", port_of(slow)))
        waiting.sendall(HEADER[:5])
        for listener in (untrusting, server, slow):
            listener.close()
            await asyncio.wait_for(listener.wait_closed(), IO_S)
        waiting.settimeout(IO_S)
        with contextlib.suppress(ConnectionResetError):  # closed: by FIN or RST
            assert await asyncio.to_thread(waiting.recv, 1) == b""  # not left open until the 60 s deadline
        stalled.close()
        waiting.close()

    run(main())
