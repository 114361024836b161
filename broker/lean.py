"""The lean connection layer (``mqtt.lean_sessions``): chat sessions on the sans-IO core, the rest on amqtt.

With the setting on, every listener (tcp, tls, ws, wss) serves every
connection with a ``ChatSession`` (broker/chat_session.py), an ``asyncio.Protocol`` over
``broker.mqtt.ServerConnection``. Its first CONNECT decides the path
(``chat_rules.lean_caller``):

- a chat device (``{user}.{device}`` logged in as ``user``, no generic topics configured for
  users, no QoS 2 will) stays: it is logged in here with the same ``Authenticator``, login
  throttle and CONNECT deadline as on amqtt's path, takes over a live connection with its
  client id (on either path), and hands its traffic to the bridge through the same
  ``ChatPort`` calls;
- anything else is **handed to amqtt unchanged**: the transport gets an asyncio stream
  protocol (``broker.streams.stream_protocol``), which is given the bytes read so far, and
  ``ChatBroker.stream_connected`` serves it from the start, as if it had just connected.

Listeners behind a PROXY header take the same path, with the header's client as the peer
(``proxied``). On ws and wss a ``WsLink`` (broker/lean_ws.py) does the WebSocket upgrade and is the
session's transport, so the session reads and writes the MQTT stream inside the binary frames; a
hand-off swaps amqtt's stream protocol in above the same ``WsLink``, and amqtt serves the connection
as a plain MQTT stream (``forwarded_for``: with X-Forwarded-For's client as its peer, as ``proxied``).
docs/AMQTT.md, "Two connection paths".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from amqtt.broker import Server

from broker.admission import AddressSlots
from broker.auth import BAD_CREDENTIALS, Authenticator
from broker.chat_rules import lean_caller, may_will
from broker.chat_session import ChatSession, Dropped
from broker.counters import BrokerCounters
from broker.lean_ws import WsLink, WsListener
from broker.mqtt.events import Connect
from broker.mqtt.limits import WireLimits
from broker.port import ChatPort
from broker.proxy_protocol import Address, TrustedProxies
from broker.settings import BrokerSettings
from broker.silence import SilenceWatch
from broker.streams import stream_protocol
from chatproto import Caller

log = logging.getLogger(__name__)

WARNED_MAX = 10_000
"""(device, reason) pairs remembered so that a device that keeps being dropped is warned about once; past this
many the memory starts over (at worst a device is warned about once more)."""

StreamConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[None]]
ProxiedConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Address, str], Awaitable[None]]


class LeanSessions:
    """The chat sessions of one broker on the lean path: routing, login, takeover, the registry."""

    def __init__(self, settings: BrokerSettings, auth: Authenticator, bridge: ChatPort, counters: BrokerCounters,
                 unauthenticated: AddressSlots, silence: Callable[[], SilenceWatch],
                 take_over_amqtt: Callable[[str], Awaitable[None]], stream_connected: StreamConnected,
                 proxied_connected: ProxiedConnected) -> None:
        self.limits: WireLimits = settings.wire
        self.connect_timeout_s = settings.connect_timeout_s
        self.max_unacked = settings.max_unacked_downlinks
        self.max_unread = settings.max_unread_downlink_bytes
        self._generic = bool(settings.acl)
        self._settings = settings
        self._auth = auth
        self.bridge = bridge
        self.counters = counters
        self._unauthenticated = unauthenticated
        self._silence = silence
        self._take_over_amqtt = take_over_amqtt
        self._stream_connected = stream_connected
        self._proxied_connected = proxied_connected
        self.servers: dict[str, Server] = {}
        self._open: dict[ChatSession, str | None] = {}  # every session open here -> its address while not logged in
        self._live: dict[str, ChatSession] = {}  # client id -> its logged-in session
        self._persistent: dict[str, int | None] = {}  # clean_session=0 client ids -> granted inbox QoS (None: none)
        self._logins: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._warned: set[tuple[str, Dropped]] = set()

    def now(self) -> float:
        return self._loop.time()

    async def listen(self, name: str, host: str, port: int, **kwargs: Any) -> asyncio.Server:
        """A tcp or tls listener whose connections are ``ChatSession``s (kwargs: ``create_server``'s)."""
        return await self._loop.create_server(lambda: ChatSession(self, name), host, port, **kwargs)

    async def listen_ws(self, name: str, host: str, port: int, trusted: TrustedProxies | None,
                        **kwargs: Any) -> asyncio.Server:
        """A ws or wss listener: the WebSocket layer (broker/lean_ws.py) under a ``ChatSession`` each.
        ``trusted``: ``forwarded_for``'s proxies, whose X-Forwarded-For names the session's peer."""
        listener = WsListener(name, lambda client: ChatSession(self, name, client), trusted, self.connect_timeout_s,
                              self.counters)
        return await self._loop.create_server(lambda: WsLink(listener), host, port, **kwargs)

    def proxied(self, name: str) -> Callable[[Address], Callable[[], ChatSession]]:
        """For a listener behind a PROXY header (``ProxiedServer``): sessions whose peer is the header's client."""
        return lambda client: lambda: ChatSession(self, name, client)

    # --- a session's life -----------------------------------------------------------------

    def opened(self, session: ChatSession) -> bool:
        """A connection was accepted; False: close it at once (the listener or the address is full)."""
        name = session.listener
        self.counters.connection(name)
        server = self.servers.get(name)
        if server is not None and 0 < server.max_connections <= server.conn_count:
            log.info("%s:%d refused: listeners.%s.max_connections reached", *session.peer, name)
            return False
        address = session.peer[0]
        if not self._unauthenticated.take(address):
            self.counters.refused_unauthenticated += 1
            log.info("%s:%d refused: %d connections from that address have not logged in yet "
                     "(limits.max_unauthenticated_per_address)", *session.peer,
                     self._settings.max_unauthenticated_per_address)
            return False
        if server is not None:
            server.conn_count += 1
        self._open[session] = address
        self._silence().watch(session)
        return True

    def route(self, session: ChatSession, connect: Connect) -> bool:
        """The CONNECT came: log a chat device in here (True), or hand the connection to amqtt (False)."""
        caller = lean_caller(connect, self._generic)
        head, session.head = session.head, None
        if caller is None:
            self._hand_off(session, b"".join(head or ()))
            return False
        session.hold()
        task = self._loop.create_task(self._login(session, connect, caller))
        self._logins.add(task)
        task.add_done_callback(self._logins.discard)
        return True

    async def _login(self, session: ChatSession, connect: Connect, caller: Caller) -> None:
        client_id = connect.client_id
        try:
            result = await self._auth.login(connect.username, connect.password, client_id, session.peer[0])
            if result.ok and connect.will is not None and not may_will(caller, connect.will.topic):
                log.warning("login refused: %s set a will on %r, which it may not publish to", client_id,
                            connect.will.topic)
                self._auth.count("bad_will")
                session.refused(BAD_CREDENTIALS, "will topic not allowed")
                return
            if not result.ok:
                session.refused(result.code, result.reason)
                return
            if session.transport is None:
                return  # the client left (or its CONNECT deadline passed) meanwhile
            if result.new_device:
                self.bridge.device_registered(caller.user, caller.device)
            await self.take_over(client_id)
        except Exception:  # a store that failed: the device retries, the broker goes on
            log.exception("login of %s failed", client_id)
            session.end("login failed")
            return
        present = not connect.clean_session and client_id in self._persistent
        if connect.clean_session:
            self._persistent.pop(client_id, None)  # [MQTT-3.1.2-6]
        inbox = self._persistent.get(client_id) if present else None
        self._give(session)
        # Again, with no await before the registration below: a login of the same id may have
        # registered while the takeover of an amqtt connection was awaited.
        self.end_live(client_id, "taken over by a new connection")
        if session.accepted(caller, present, inbox) and session.transport is not None:
            self._live[client_id] = session
            self._silence().watch(session)  # its keepalive may fall due before the CONNECT deadline it waited for
            if not connect.clean_session:
                self._persistent.setdefault(client_id, None)

    async def take_over(self, client_id: str) -> None:
        """MQTT-3.1.4-2: close a live connection with ``client_id``, on either path, before the new one is served."""
        self.end_live(client_id, "taken over by a new connection")
        await self._take_over_amqtt(client_id)

    def end_live(self, client_id: str, reason: str) -> None:
        """End the lean session of ``client_id``, if one is live (a takeover from either path)."""
        old = self._live.get(client_id)
        if old is not None:
            log.info("%s: closing its connection (%s)", client_id, reason)
            old.end(reason)

    def forget(self, client_id: str) -> None:
        """Nothing of ``client_id`` is resumed (a removed device)."""
        self._persistent.pop(client_id, None)

    def remember_inbox(self, session: ChatSession, qos: int | None) -> None:
        """A persistent session's inbox subscription (None: unsubscribed), linked again when it resumes
        [MQTT-3.1.2-4]."""
        if session.client_id in self._persistent:
            self._persistent[session.client_id] = qos

    def dropped(self, session: ChatSession, why: Dropped) -> None:
        """A downlink not sent: the session leaves ``max_unacked`` without PUBACK, or does not read what waits
        for it (``max_unread``: ``limits.max_unread_downlink_bytes``, broker/downlink.py)."""
        self.counters.downlink_dropped += 1
        warned = (session.client_id, why)
        if warned in self._warned:  # once per device and reason: it may be hostile, and log lines cost too
            return
        if len(self._warned) >= WARNED_MAX:  # a user may remove devices and add new ones: keep this bounded
            self._warned.clear()
        self._warned.add(warned)
        if why == "unread":
            log.warning("%s does not read what it is sent (over %d bytes wait for it): further deliveries are not "
                        "sent until it reads (staged items are redelivered later)", session.client_id,
                        self.max_unread)
        else:
            log.warning("%s leaves %d deliveries without PUBACK: further ones are not sent until it acknowledges "
                        "(staged items are redelivered later)", session.client_id, self.max_unacked)

    def ended(self, session: ChatSession) -> None:
        """The session ended (the transport closes next): it is neither live nor watched any more."""
        if self._live.get(session.client_id) is session:
            del self._live[session.client_id]
        self._give(session)
        self._silence().forget(session)

    def lost(self, session: ChatSession) -> None:
        """The transport closed."""
        if session in self._open:
            del self._open[session]
            server = self.servers.get(session.listener)
            if server is not None:
                server.conn_count -= 1

    def close_all(self) -> None:
        """Shutdown: every session ends (their devices go offline before the bridge closes)."""
        for task in self._logins:
            task.cancel()
        for session in list(self._open):
            session.end("the broker is shutting down")

    def _give(self, session: ChatSession) -> None:
        address = self._open.get(session)
        if address is not None:
            self._open[session] = None
            self._unauthenticated.give(address)

    def _hand_off(self, session: ChatSession, head: bytes) -> None:
        """amqtt serves this connection from its first byte: a stream protocol takes the transport over."""
        transport, name = session.transport, session.listener
        assert transport is not None and session.conn is not None
        session.conn.close("handed to amqtt")
        self.ended(session)
        self.lost(session)
        self.counters.accepted[name] -= 1  # amqtt's path counts it again
        session.transport = None
        client = session.peer

        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Awaitable[None]:
            if session.proxied:
                return self._proxied_connected(reader, writer, client, name)
            return self._stream_connected(reader, writer, name)

        stream = stream_protocol(connected)()
        transport.set_protocol(stream)
        stream.connection_made(transport)
        if head:
            stream.data_received(head)
        if session.eof:
            stream.eof_received()
