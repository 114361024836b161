"""What a listener does before MQTT: its TLS context, the /mqtt path, and behind a load balancer the client's address.

``listeners.tcp/tls.proxy_protocol``: ``ProxiedServer`` accepts connections itself. It closes at
once a peer outside ``listeners.trusted_proxies``; from a trusted one it reads the PROXY header
(broker/proxy_protocol.py) with exact reads off the socket, so nothing past the header is read,
within ``deadline_s`` of the accept; anything else (no header, garbage, too slow) is closed. Only
then does asyncio take the socket (``connect_accepted_socket``, with the TLS handshake on the tls
listener) and the broker serves it like any stream, the header's address being its peer
(``ClientWriter``): the per-address limits, the login throttle, logs and sessions all see it.

Why an accept loop of its own: asyncio's server starts reading as soon as it accepts, and bytes it
has buffered past the header (the TLS ClientHello a balancer sends right behind it) could not be
given back to a TLS handshake started afterwards (``StreamWriter.start_tls``).

WebSocket listeners (``listeners.ws/wss.forwarded_for``) are behind an HTTP proxy instead:
``forwarded_client`` reads X-Forwarded-For, and ``ForwardedWriter`` carries its address.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial

from amqtt.adapters import StreamWriterAdapter, WebSocketsWriter
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from broker.counters import BrokerCounters
from broker.proxy_protocol import (
    Address,
    ProxyHeader,
    ProxyHeaderError,
    TrustedProxies,
    forwarded_client,
    parse_proxy_header,
)
from broker.streams import stream_protocol

log = logging.getLogger(__name__)

WS_PATH = "/mqtt"
WS_SUBPROTOCOL = Subprotocol("mqtt")
WS_MAX_MESSAGE = 2**20
"""The largest WebSocket message (fragments counted together) on either path: websockets' default. An MQTT
packet may span messages: its own limit is ``limits.max_packet_bytes``."""
ACCEPT_BACKOFF_S = 1.0  # after EMFILE and the like, as asyncio's own server


class ListenerError(Exception):
    """A listener could not be started; the message names the config key."""


ProxiedConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Address], Awaitable[None]]
ProtocolFor = Callable[[Address], Callable[[], asyncio.BaseProtocol]]
"""The client a PROXY header named -> the protocol factory for its connection (the lean path, broker/lean.py)."""


class ClientWriter(StreamWriterAdapter):
    """amqtt's stream writer, whose peer is the client a PROXY header named."""

    def __init__(self, writer: asyncio.StreamWriter, client: Address) -> None:
        super().__init__(writer)
        self.client = client

    def get_peer_info(self) -> tuple[str, int] | None:
        return self.client


class ForwardedWriter(WebSocketsWriter):
    """amqtt's WebSocket writer, whose peer is the client X-Forwarded-For named (port 0: not forwarded)."""

    def __init__(self, connection: ServerConnection, client: Address) -> None:
        super().__init__(connection)
        self.client = client

    def get_peer_info(self) -> tuple[str, int] | None:
        return self.client


def forwarded_peer(connection: ServerConnection, trusted: TrustedProxies, listener: str) -> Address | None:
    """The client of a WebSocket connection from a trusted proxy, by X-Forwarded-For; None: refuse it."""
    request = connection.request
    return forwarded_address(connection.remote_address[0], request.headers if request else None, trusted, listener)


def forwarded_address(peer: str, headers: Headers | None, trusted: TrustedProxies, listener: str) -> Address | None:
    """The client that the upgrade request's ``headers`` name, if ``peer`` is a trusted proxy (port 0: not
    forwarded); None: refuse it. Both WebSocket paths (amqtt's and broker/lean_ws.py) decide here."""
    if peer not in trusted:
        reason = "not in listeners.trusted_proxies"
    elif headers is None or (client := forwarded_client(headers.get_all("X-Forwarded-For"), trusted)) is None:
        reason = "no valid X-Forwarded-For header"
    else:
        log.debug("%s is %s (X-Forwarded-For)", peer, client)
        return client, 0
    log.info("%s refused on listeners.%s (forwarded_for): %s", peer, listener, reason)
    return None


async def read_proxy_header(recv: Callable[[int], Awaitable[bytes]]) -> ProxyHeader:
    """Read a PROXY header with ``recv(n)`` (at most n bytes; b"" at the end); raises ``ProxyHeaderError``."""
    data = b""
    while not isinstance(step := parse_proxy_header(data), ProxyHeader):
        chunk = await recv(step.at_least)
        if not chunk:
            raise ProxyHeaderError(f"closed after {len(data)} bytes of a PROXY header")
        data += chunk
    return step


class ProxiedServer:
    """A listening socket whose connections start with a PROXY header (the parts of
    ``asyncio.Server`` the broker uses: ``sockets``, ``is_serving``, ``close``, ``wait_closed``)."""

    def __init__(self, name: str, sock: socket.socket, connected: ProxiedConnected, trusted: TrustedProxies,
                 deadline_s: float, tls: ssl.SSLContext | None, counters: BrokerCounters,
                 protocol_for: ProtocolFor | None = None) -> None:
        self.name = name
        self.sockets = [sock]
        self._connected = connected
        self._protocol_for = protocol_for
        self._trusted = trusted
        self._deadline_s = deadline_s
        self._tls = tls
        self._counters = counters
        self._unwrapping: set[asyncio.Task[None]] = set()  # connections whose header is being read
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    def is_serving(self) -> bool:
        return not self._accepting.done()

    def close(self) -> None:
        self._accepting.cancel()
        for task in self._unwrapping:
            task.cancel()
        self.sockets[0].close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._accepting, *self._unwrapping, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        listening = self.sockets[0]
        while True:
            try:
                sock, peer = await loop.sock_accept(listening)
            except OSError as exc:  # out of file descriptors: let some connections end first
                log.warning("listeners.%s: accept failed: %s", self.name, exc)
                await asyncio.sleep(ACCEPT_BACKOFF_S)
                continue
            task = loop.create_task(self._unwrap(sock, (str(peer[0]), int(peer[1]))))
            self._unwrapping.add(task)
            task.add_done_callback(self._unwrapping.discard)

    async def _unwrap(self, sock: socket.socket, peer: Address) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        try:
            if peer[0] not in self._trusted:
                raise ProxyHeaderError("not in listeners.trusted_proxies")
            async with asyncio.timeout(self._deadline_s):
                header = await read_proxy_header(partial(loop.sock_recv, sock))
        except (ProxyHeaderError, TimeoutError, OSError) as exc:
            sock.close()
            self._refuse(peer, "no PROXY header within the deadline" if isinstance(exc, TimeoutError) else str(exc))
            return
        except asyncio.CancelledError:  # the listener is closing
            sock.close()
            raise
        client = header.source or peer  # LOCAL / UNKNOWN: the proxy's own connection (a health check)
        log.debug("%s:%d is %s:%d (PROXY header)", *peer, *client)
        try:
            # The transport owns the socket from here, and closes it if the TLS handshake fails.
            factory: Callable[[], asyncio.BaseProtocol] = (
                self._protocol_for(client) if self._protocol_for is not None
                else stream_protocol(lambda reader, writer: self._connected(reader, writer, client)))
            handshake_s = self._deadline_s if self._tls else None
            await loop.connect_accepted_socket(factory, sock, ssl=self._tls, ssl_handshake_timeout=handshake_s)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self._refuse(peer, f"TLS handshake failed: {exc!r}")

    def _refuse(self, peer: Address, reason: str) -> None:
        self._counters.refused_proxy += 1
        log.info("%s:%d refused on listeners.%s (proxy_protocol): %s", *peer, self.name, reason)


async def start_proxied_server(name: str, connected: ProxiedConnected, host: str, port: int, *,
                               trusted: TrustedProxies, deadline_s: float, tls: ssl.SSLContext | None,
                               reuse_port: bool, backlog: int, counters: BrokerCounters,
                               protocol_for: ProtocolFor | None = None) -> ProxiedServer:
    """Listen on ``host:port`` (its first address) for connections that start with a PROXY header;
    ``backlog``: ``listen()``'s (``listeners.backlog``)."""
    family, _, _, _, address = (await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))[0]
    sock = socket.create_server(address[:2], family=family, backlog=backlog, reuse_port=reuse_port)
    sock.setblocking(False)  # SO_REUSEADDR: create_server sets it
    return ProxiedServer(name, sock, connected, trusted, deadline_s, tls, counters, protocol_for)


def only_mqtt_path(connection: ServerConnection, request: Request) -> Response | None:
    """websockets' ``process_request``: MQTT is served on ``/mqtt`` only (others get HTTP 404)."""
    return mqtt_path_refusal(request)


def mqtt_path_refusal(request: Request) -> Response | None:
    """HTTP 404 for an upgrade request on any path but ``/mqtt``; None: go on with the handshake."""
    if request.path.split("?", 1)[0] != WS_PATH:
        return Response(404, "Not Found", Headers({"Content-Type": "text/plain"}), b"MQTT is served on /mqtt\n")
    return None


def tls_context(listener: str, certfile: str | None, keyfile: str | None, section: str = "") -> ssl.SSLContext:
    """``section``: the config section named in errors (default ``listeners.<listener>``)."""
    section = section or f"listeners.{listener}"
    if not certfile or not keyfile:
        raise ListenerError(f"{section}: certfile and keyfile are both required for TLS")
    # ssl's FileNotFoundError carries no file name (the CLI said "cannot read None"):
    # open each file first, so the message names the key and the file (tests/test_cli.py).
    for key, path in (("certfile", certfile), ("keyfile", keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ListenerError(f"{section}.{key}: cannot read {path}: {exc.strerror or exc}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as exc:
        raise ListenerError(f"{section}: cannot read {exc.filename}: no such file") from None
    except PermissionError as exc:
        raise ListenerError(f"{section}: cannot read {exc.filename}: permission denied") from None
    except (ssl.SSLError, OSError) as exc:
        raise ListenerError(
            f"{section}: certfile {certfile} / keyfile {keyfile} is not a usable PEM pair: {exc}"
        ) from None
    return context
