"""The hardened embedded broker: amqtt's ``Broker`` with narrow overrides.

Each override says which amqtt 0.12.1 fault it fixes (see docs/AMQTT.md):

- ``_client_connected``: authenticate *before* any session is looked up, so a
  wrong password cannot wipe or take over a victim's session (fault 1) and
  failed logins leave no session behind (fault 3). It also bounds the time to
  CONNECT, and performs a clean takeover when the same device reconnects.
- ``_topic_filtering`` / ``add_subscription``: the PROTOCOL.md ACL, in code,
  with no plugin that can be configured away; no anonymous plugin at all
  (fault 4).
- ``retain_message`` / ``_publish_retained_messages_for_subscription`` /
  ``_serve_client``: nothing is retained on chat topics, and retained messages
  are offered only for the session's own subscriptions, each checked against
  the ACL (fault 2).
- ``_handle_message_delivery`` / ``_handle_disconnect``: publishes (and wills)
  on chat topics go to the bridge through its port (``broker.port.ChatPort``),
  not through amqtt's broadcast loop.

MQTT 3.1.1 conformance (docs/MQTT.md; tests/mqtt/), with the layers below:
- every packet passes ``broker.wire.PacketGate`` before amqtt parses it
  (malformed input, packet size, first packet CONNECT, keepalive bounds);
- ``broker.handler``: keepalive [MQTT-3.1.2-24], unacked QoS 1/2 kept [MQTT-4.4.0-1];
- ``broker.conformant``: delivered QoS, offline queue, subscriptions;
- here: takeover [MQTT-3.1.4-2], clean sessions discarded at disconnect
  [MQTT-3.1.2-6], and generic (non-chat) topics opened by ``mqtt.acl`` /
  ``mqtt.anonymous_acl`` (``broker.acl``), with anonymous clients only if
  ``mqtt.allow_anonymous``. Chat topics keep the PROTOCOL.md rules whatever the
  config says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial
from typing import Any, cast

import websockets
from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, WebSocketsReader, WriterAdapter
from amqtt.broker import Server
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.session import Session
from websockets.asyncio.server import ServerConnection

from broker.acl import NO_ACCESS, TopicAcl
from broker.admission import AddressSlots
from broker.auth import ACCEPTED, BAD_CREDENTIALS, IDENTIFIER_REJECTED, Authenticator, LoginResult
from broker.chat_rules import hand_uplink, refuse_publish
from broker.conformant import RESUMING, SUBACK_FAILURE, ConformantBroker
from broker.counters import BrokerCounters
from broker.downlink import DownlinkPolicy, close_writer
from broker.front import (
    WS_MAX_MESSAGE,
    WS_SUBPROTOCOL,
    ClientWriter,
    ForwardedWriter,
    ListenerError,
    forwarded_peer,
    only_mqtt_path,
    start_proxied_server,
    tls_context,
)
from broker.handler import ChatProtocolHandler
from broker.lean import LeanSessions
from broker.link import SessionLink
from broker.logs import WS_LOG, bind_client, bind_connection
from broker.mqtt.connection import keepalive_deadline
from broker.mqtt.errors import ConnectRefused, ProtocolViolation
from broker.port import ChatPort
from broker.proxy_protocol import Address, TrustedProxies
from broker.session_states import lighten, set_aside
from broker.settings import BrokerSettings
from broker.silence import SilenceWatch
from broker.streams import start_server
from broker.wire import PacketGate
from chatproto import Caller, inbox_topic, is_chat_topic, may_subscribe, split_client_id, uplink_kind

log = logging.getLogger(__name__)

TAKEOVER_WAIT_S = 5.0
KEEPALIVE = "broker.keepalive_s"  # Session.attributes key: seconds of silence after which the client is dropped
ACL = "broker.acl"  # Session.attributes key: the session's TopicAcl, built once per connection


class LoginRefusedError(Exception):
    pass


def _resolved(value: Any) -> asyncio.Future[Any]:
    """A done future holding ``value``: amqtt's _handle_* methods take the waiter that produced it."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _chat_identity(session: Session) -> Caller | None:
    parts = split_client_id(session.client_id or "")
    if parts is None or parts[0] != session.username:
        return None
    return Caller(parts[0], parts[1])


class ChatBroker(ConformantBroker):
    def __init__(self, settings: BrokerSettings, authenticator: Authenticator, bridge: ChatPort) -> None:
        # Listeners are started by _start_listeners below; amqtt's own listener
        # table only needs its mandatory "default" entry, unbound. No plugins:
        # auth and ACL are methods of this class, not options to forget.
        super().__init__({"listeners": {"default": {"bind": None}}, "plugins": {}}, settings.max_queued_messages)
        self.settings = settings
        self._wire = settings.wire
        self._unauthenticated = AddressSlots(settings.max_unauthenticated_per_address)
        self._trusted = TrustedProxies(settings.trusted_proxies)
        self._auth = authenticator
        self.bridge = bridge
        self._live: dict[str, asyncio.Task[Any]] = {}
        self._links: dict[str, SessionLink] = {}
        self._silence: SilenceWatch | None = None  # made in the broker's loop, at the first keepalive
        self.counters = BrokerCounters()  # read by chatserver.metrics at scrape time
        self._downlink_policy = DownlinkPolicy(settings.max_unacked_downlinks, self.counters)
        self.lean: LeanSessions | None = None  # mqtt.lean_sessions: chat sessions on the sans-IO core (broker/lean.py)

    # --- listeners --------------------------------------------------------------

    async def start(self) -> None:
        # Bind first: a port in use or a bad certificate raises ListenerError
        # here, instead of amqtt logging a traceback and wrapping it.
        await self._open_listeners()
        await super().start()

    async def _start_listeners(self) -> None:
        """amqtt's hook; our listeners are already open (see ``start``)."""

    async def _open_listeners(self) -> None:
        if self.settings.lean_sessions:
            self.lean = LeanSessions(self.settings, self._auth, self.bridge, self.counters, self._unauthenticated,
                                     self._silence_watch, self._take_over, self.stream_connected,
                                     self.proxied_connected)
        for listener in self.settings.listeners:
            name, host, port = listener.name, listener.host, listener.port
            tls = tls_context(name, listener.certfile, listener.keyfile) if name in ("tls", "wss") else None
            try:
                instance: Any
                if name in ("tcp", "tls") and listener.proxy_protocol:
                    instance = await start_proxied_server(
                        name, partial(self.proxied_connected, listener_name=name), host, port, trusted=self._trusted,
                        deadline_s=self.settings.connect_timeout_s, tls=tls, reuse_port=listener.reuse_port,
                        backlog=listener.backlog,
                        counters=self.counters, protocol_for=self.lean.proxied(name) if self.lean else None,
                    )
                elif name in ("tcp", "tls") and self.lean is not None:
                    instance = await self.lean.listen(name, host, port, ssl=tls, reuse_address=True,
                                                      reuse_port=listener.reuse_port, backlog=listener.backlog)
                elif name in ("tcp", "tls"):
                    instance = await start_server(
                        partial(self.stream_connected, listener_name=name), host, port, ssl=tls, reuse_address=True,
                        reuse_port=listener.reuse_port, backlog=listener.backlog,
                    )
                elif self.lean is not None:
                    instance = await self.lean.listen_ws(name, host, port, self._trusted if listener.forwarded_for
                                                         else None, ssl=tls, reuse_address=True,
                                                         reuse_port=listener.reuse_port, backlog=listener.backlog)
                else:
                    connected = self.forwarded_connected if listener.forwarded_for else self.ws_connected
                    instance = await websockets.serve(
                        partial(connected, listener_name=name), host, port, ssl=tls,
                        subprotocols=[WS_SUBPROTOCOL], process_request=only_mqtt_path, logger=WS_LOG,
                        max_size=WS_MAX_MESSAGE, reuse_port=listener.reuse_port, backlog=listener.backlog,
                    )
            except OSError as exc:
                raise ListenerError(
                    f"listeners.{name}.bind: cannot listen on {listener.bind}: {exc.strerror or exc}"
                ) from None
            self._servers[name] = Server(name, instance, listener.max_connections)
            if self.lean is not None:
                self.lean.servers[name] = self._servers[name]
            log.info("listening: %s on %s", name, self.bound_addresses()[name])

    def open_connections(self) -> dict[str, int]:
        """Listener name -> connections open now (accepted, not yet closed)."""
        return {name: server.conn_count for name, server in self._servers.items()}

    def listeners_serving(self) -> dict[str, bool]:
        """Listener name -> whether it accepts connections now."""
        return {name: _serving(server.instance) for name, server in self._servers.items()}

    def bound_addresses(self) -> dict[str, tuple[str, int]]:
        """Listener name -> the (host, port) actually bound (port 0 resolves here)."""
        result: dict[str, tuple[str, int]] = {}
        for name, server in self._servers.items():
            sockets = getattr(server.instance, "sockets", None) or []
            if sockets:
                host, port = sockets[0].getsockname()[:2]
                result[name] = (str(host), int(port))
        return result

    # --- behind a load balancer (broker/front.py) ---------------------------------

    async def proxied_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: Address,
                                listener_name: str) -> None:
        """A stream whose PROXY header named ``client``: served as if ``client`` were its peer."""
        await self._client_connected(listener_name, StreamReaderAdapter(reader), ClientWriter(writer, client))

    async def forwarded_connected(self, websocket: ServerConnection, listener_name: str) -> None:
        """A WebSocket through a trusted HTTP proxy: its peer is the client X-Forwarded-For names."""
        client = forwarded_peer(websocket, self._trusted, listener_name)
        if client is None:
            self.counters.refused_proxy += 1
            await websocket.close(1008, "not through a trusted proxy")
            return
        await self._client_connected(listener_name, WebSocketsReader(websocket), ForwardedWriter(websocket, client))

    # --- connection: authenticate first, then session --------------------------

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        server = self._servers.get(listener_name)
        if server is None:
            await close_writer(writer)
            return
        await server.acquire_connection()
        self.counters.connection(listener_name)
        bind_connection(f"{listener_name}-{sum(self.counters.accepted.values())}")  # log lines of this connection
        try:
            peer = writer.get_peer_info()
            if peer is None:
                await close_writer(writer)
                return
            if not self._unauthenticated.take(peer[0]):
                self.counters.refused_unauthenticated += 1
                log.info("%s:%d refused: %d connections from that address have not logged in yet "
                         "(limits.max_unauthenticated_per_address)", peer[0], peer[1],
                         self.settings.max_unauthenticated_per_address)
                await _close_quietly(writer)
                return
            # Every packet is checked whole before amqtt parses it (broker/wire.py).
            reader = PacketGate(reader, self._wire, f"{peer[0]}:{peer[1]}", writer)
            try:
                handler, session = await asyncio.wait_for(
                    self._accept_connect(reader, writer, peer[0], peer[1]),
                    timeout=self.settings.connect_timeout_s,
                )
            except TimeoutError:
                log.info("no CONNECT from %s:%d within %.0fs: closing", peer[0], peer[1],
                         self.settings.connect_timeout_s)
                await _close_quietly(writer)
                return
            except ConnectRefused as exc:
                # Section 3.2.2.3: a return code the spec names, then close [MQTT-3.2.2-5].
                with contextlib.suppress(OSError, ConnectionError):
                    await ConnackPacket.build(0, exc.code).to_stream(writer)
                await _close_quietly(writer)
                return
            # OSError, not just ConnectionError: amqtt's own refusals (protocol
            # level, id-less persistent session) close the socket unguarded, and a
            # client that already reset it raises ENOTCONN there (tests/test_auth.py).
            except (LoginRefusedError, ProtocolViolation, AMQTTError, MQTTError, NoDataError, OSError,
                    ValueError) as exc:
                log.debug("connection from %s:%d refused: %r", peer[0], peer[1], exc)
                await _close_quietly(writer)
                return
            finally:
                self._unauthenticated.give(peer[0])
            bind_client(session.client_id or "")  # here: wait_for ran _accept_connect in a task of its own
            try:
                await self._serve_client(reader, writer, session, handler)
            except (AMQTTError, MQTTError, NoDataError, ConnectionError) as exc:
                log.info("connection of %s ended: %r", session.client_id, exc)
        finally:
            server.release_connection()

    async def _accept_connect(
        self, reader: ReaderAdapter, writer: WriterAdapter, address: str, port: int
    ) -> tuple[ChatProtocolHandler, Session]:
        # Parses CONNECT and refuses bad protocol levels etc. itself (amqtt).
        parsed, incoming = await ChatProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        handler = cast("ChatProtocolHandler", parsed)  # init_from_connect builds cls(...)
        client_id = incoming.client_id or ""
        if incoming.username is None and self.settings.allow_anonymous:
            result = _anonymous_login(client_id, address)
            self._auth.count("anonymous" if result.ok else "bad_client_id")
        else:
            result = await self._auth.login(incoming.username, incoming.password, client_id, address)
        if result.ok and incoming.will_flag and not self._may_publish(incoming, incoming.will_topic or ""):
            log.warning("login refused: %s set a will on %r, which it may not publish to", client_id,
                        incoming.will_topic)
            result = LoginResult(BAD_CREDENTIALS, result.user, None, "will topic not allowed")
            self._auth.count("bad_will")
        if not result.ok:
            # Fault 1 and 3: nothing of any session was read or changed, and the
            # refused connection is never registered.
            await ConnackPacket.build(0, result.code).to_stream(writer)
            raise LoginRefusedError(result.reason)
        if result.new_device and result.user and result.device:
            self.bridge.device_registered(result.user, result.device)
        await self._take_over(client_id)
        return handler, self._session_for(incoming)

    async def _take_over(self, client_id: str) -> None:
        """MQTT-3.1.4-2: a new authenticated connection closes the old one first (on either path)."""
        if self.lean is not None:
            self.lean.end_live(client_id, "taken over by a new connection")
        old_task = self._live.get(client_id)
        if old_task is None or old_task.done():
            return
        log.info("%s reconnected: closing its previous connection", client_id)
        old = self._sessions.get(client_id)
        if old is not None:
            await old[1].handle_connection_closed()
        await asyncio.wait({old_task}, timeout=TAKEOVER_WAIT_S)

    async def close_session(self, client_id: str) -> None:
        """Disconnect ``client_id`` if it is connected (``devices.remove``); its session is discarded."""
        if self.lean is not None:
            self.lean.forget(client_id)
            self.lean.end_live(client_id, "the device was removed")
        entry = self._sessions.get(client_id)
        task = self._live.get(client_id)
        if entry is None or task is None or task.done():
            return
        log.info("%s was removed: closing its connection", client_id)
        entry[0].clean_session = True  # nothing of a removed device is resumed
        await entry[1].handle_connection_closed()
        await asyncio.wait({task}, timeout=TAKEOVER_WAIT_S)

    def _silence_watch(self) -> SilenceWatch:
        loop = asyncio.get_running_loop()
        if self._silence is None or not self._silence.runs_on(loop):
            self._silence = SilenceWatch(loop, recheck_s=self._wire.packet_deadline_s)
        return self._silence

    def _session_for(self, incoming: Session) -> Session:
        """amqtt's session cache logic (MQTT-3.1.2-4..6), run only after authentication."""
        client_id = incoming.client_id or ""
        existing = self._sessions.get(client_id)
        # A clean session is never resumed, even if it has not been discarded yet
        # [MQTT-3.1.2-6] (amqtt resumed it: session present=1 and its subscriptions).
        if (incoming.clean_session or existing is None or existing[0].clean_session
                or existing[0].transitions.is_connected()):
            if existing is not None:
                self._discard_session(existing[0])
            incoming.parent = 0  # session present = 0 [MQTT-3.2.2-1, MQTT-3.2.2-3]
            session = lighten(incoming)
        else:
            session = existing[0]
            set_aside(incoming)
            for attr in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password", "remote_address", "remote_port"):
                setattr(session, attr, getattr(incoming, attr))
            session.parent = 1  # session present = 1 [MQTT-3.2.2-2]
        # The silence deadline is watched by one timer for all (broker/silence.py, started in
        # _serve_client); amqtt reads without a timeout (keep_alive 0), which saves a Task per read.
        session.attributes[KEEPALIVE] = keepalive_deadline(incoming.keep_alive)
        session.keep_alive = 0
        session.attributes.pop(ACL, None)
        return session

    def _discard_session(self, session: Session) -> None:
        """Forget a session: subscriptions, queues, in-flight messages [MQTT-3.1.2-6]."""
        client_id = session.client_id or ""
        entry = self._sessions.get(client_id)
        if entry is not None and entry[0] is session:
            del self._sessions[client_id]
        self._drop_subscriptions(session)
        session.clear_queues()
        session.inflight_out.clear()
        session.inflight_in.clear()

    async def _serve_client(
        self, reader: ReaderAdapter, writer: WriterAdapter, session: Session, handler: ChatProtocolHandler
    ) -> None:
        client_id = session.client_id or ""
        # Until its backlog is handed over, messages for this session queue behind it.
        session.attributes[RESUMING] = True
        session.transitions.connect()
        handler.attach(session, reader, writer)
        self._sessions[client_id] = (session, handler)
        self._live[client_id] = asyncio.current_task()  # type: ignore[assignment]
        deadline = session.attributes.get(KEEPALIVE, 0)
        if isinstance(reader, PacketGate):  # keepalive (if any) and the packet deadline
            handler.watch_silence(self._silence_watch(), deadline)
        caller = _chat_identity(session)
        if caller is not None:
            # Before the reader starts, so that every chat publish takes the same path (order).
            handler.chat_uplink = partial(self._chat_uplink, session, caller)
            handler.downlink_policy = self._downlink_policy
        try:
            await handler.mqtt_connack_authorize(True)
            await handler.start()  # re-sends unacknowledged in-flight messages [MQTT-4.4.0-1]
            self._resume_deliveries(session, handler)  # then the offline queue, RETAIN=0 [MQTT-3.3.1-9]
            # Retained messages are not sent again for the filters a resumed session
            # already had: only a new subscription gets them [MQTT-3.3.1-6] (amqtt sent
            # them at every reconnect, for every client's filters: fault 2).
            inbox = inbox_topic(caller.user) if caller is not None else None
            if caller is not None and inbox is not None and inbox in self._filters_of(session):
                # A resumed session (clean_session=0, "session present") keeps
                # its inbox subscription [MQTT-3.1.2-4]; the client need not
                # SUBSCRIBE again, so link it now (tests/test_connection_lifecycle.py).
                granted = next((q for s, q in self._subscriptions.get(inbox, []) if s is session), QOS_1)
                self._link_device(caller, inbox, handler, granted)
            await self._client_message_loop(session, handler)
        finally:
            session.attributes.pop(RESUMING, None)
            if self._live.get(client_id) is asyncio.current_task():
                del self._live[client_id]

    # --- ACL -------------------------------------------------------------------

    # Chat topics (u/...): PROTOCOL.md, in code, whatever the config says. Other
    # topics: the generic ACL (broker/acl.py), empty unless the config opens some.

    def _acl(self, session: Session) -> TopicAcl:
        acl = session.attributes.get(ACL)
        if acl is None:
            rules = self.settings.anonymous_acl if session.username is None else self.settings.acl
            acl = TopicAcl.build(rules, session.username, session.client_id or "") if rules else NO_ACCESS
            session.attributes[ACL] = acl
        return cast("TopicAcl", acl)

    def _may_publish(self, session: Session, topic: str) -> bool:
        if is_chat_topic(topic):
            caller = _chat_identity(session)
            return caller is not None and uplink_kind(caller.user, topic) is not None
        return self._acl(session).may_publish(topic)

    def _may_subscribe(self, session: Session, topic_filter: str) -> bool:
        if topic_filter.split("/", 1)[0] == "u":
            # A device reads its own inbox, nothing else under u/.
            caller = _chat_identity(session)
            return caller is not None and may_subscribe(caller.user, topic_filter)
        # Wildcard filters such as "#" are generic: chat traffic never reaches them,
        # since it is not routed through subscriptions and nothing under u/ is retained.
        return self._acl(session).may_subscribe(topic_filter)

    def _may_receive(self, session: Session, topic: str) -> bool:
        if is_chat_topic(topic):
            caller = _chat_identity(session)
            return caller is not None and topic == inbox_topic(caller.user)
        return self._acl(session).may_receive(topic)

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if action == Action.PUBLISH:
            return self._may_publish(session, topic)
        if action == Action.SUBSCRIBE:
            return self._may_subscribe(session, topic)
        return self._may_receive(session, topic)

    # --- retained messages (fault 2) ---------------------------------------------

    async def retain_message(
        self, source_session: Session | None, topic_name: str | None, data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        if topic_name is not None and is_chat_topic(topic_name):
            return  # PROTOCOL.md: retained messages are never kept on u/... topics
        await super().retain_message(source_session, topic_name, data, qos)

    # Retained messages for a new subscription: ConformantBroker, through _may_receive.

    # --- the per-connection message loop -------------------------------------------

    async def _client_message_loop(self, client_session: Session, handler: Any) -> None:
        """amqtt's loop, without its four waiter Tasks and an asyncio.wait per event.

        The same events in the same order of checks (disconnect, subscriptions,
        unsubscriptions, deliveries), polled from the handler; when none is
        pending, one future that the handler resolves (ChatProtocolHandler.event_waiter).
        """
        disconnect = handler.disconnect_future()
        try:
            while True:
                if disconnect.done():
                    # What the connection received before its end is handed on first: a
                    # PUBLISH acknowledged (or released) and then DISCONNECT, a close or a
                    # takeover is delivered [MQTT-4.3.2-2, MQTT-4.3.3-2, MQTT-3.3.1-5].
                    while (message := handler.next_delivery()) is not None:
                        await self._handle_message_delivery(client_session, handler, _resolved(message))
                    await self._handle_disconnect(client_session, handler, disconnect)
                    return
                if (subscription := handler.next_subscription()) is not None:
                    await self._handle_subscription(client_session, handler, _resolved(subscription))
                elif (unsubscription := handler.next_unsubscription()) is not None:
                    await self._handle_unsubscription(client_session, handler, _resolved(unsubscription))
                elif (message := handler.next_delivery()) is not None:
                    if not await self._handle_message_delivery(client_session, handler, _resolved(message)):
                        return
                else:
                    try:
                        await handler.event_waiter(disconnect)
                    finally:
                        handler.end_wait(disconnect)
        except asyncio.CancelledError:
            log.debug("%s: message loop cancelled", client_session.client_id)  # amqtt ends the loop quietly too

    # --- subscriptions tell the bridge who is online -----------------------------

    async def _handle_subscription(self, client_session: Session, handler: Any, subscribe_waiter: Any) -> None:
        subscriptions = subscribe_waiter.result()
        codes = [await self.add_subscription(sub, client_session) for sub in subscriptions.topics]
        await handler.mqtt_acknowledge_subscription(subscriptions.packet_id, codes)
        caller = _chat_identity(client_session)
        for (topic_filter, _), code in zip(subscriptions.topics, codes, strict=True):
            if code == SUBACK_FAILURE:
                continue
            if caller is not None and topic_filter == inbox_topic(caller.user):
                self._link_device(caller, topic_filter, handler, code)
            else:
                # At the granted QoS (the code), for anonymous clients too [MQTT-3.3.1-6].
                await self._publish_retained_messages_for_subscription((topic_filter, code), client_session)

    def _link_device(self, caller: Caller, inbox: str, handler: ChatProtocolHandler, granted: int) -> None:
        current = self._links.get(caller.client_id)
        if current is not None and current.serves(handler):
            # A repeated SUBSCRIBE on the same connection (Paho re-subscribes after every connect,
            # apps when they come to the foreground): only its QoS may change [MQTT-3.8.4-3]. A new
            # link would re-send every unacked item and end the device's presence watch list.
            current.regrant(granted)
            return
        link = SessionLink(caller.client_id, inbox, handler, granted)
        self._links[caller.client_id] = link
        self.bridge.device_online(caller.user, link)

    async def _handle_unsubscription(self, client_session: Session, handler: Any, unsubscribe_waiter: Any) -> None:
        caller = _chat_identity(client_session)
        unsubscription = unsubscribe_waiter.result()
        for topic in unsubscription.topics:
            self._del_subscription(topic, client_session)
            if caller is not None and topic == inbox_topic(caller.user):
                self._bridge_offline(caller)
        await handler.mqtt_acknowledge_unsubscription(unsubscription.packet_id)

    def _bridge_offline(self, caller: Caller) -> None:
        link = self._links.pop(caller.client_id, None)
        if link is not None:
            self.bridge.device_offline(caller.user, link)

    # --- publishes: chat topics go to the bridge -----------------------------------

    async def _handle_message_delivery(self, client_session: Session, handler: Any, wait_deliver: Any) -> bool:
        message = wait_deliver.result()
        if message is None:
            return True
        topic = message.topic
        if not topic or "#" in topic or "+" in topic:
            log.warning("%s published to invalid topic %r: closing [MQTT-3.3.2-2]", client_session.client_id, topic)
            # Returning False (amqtt's way) only left the message loop: the socket
            # stayed open and the session "connected" and linked until the process
            # ended (tests/test_fuzz_uplink.py). End it as an abnormal disconnect.
            await handler.handle_connection_closed()
            return True
        retain = bool(message.publish_packet and message.publish_packet.retain_flag)
        await self._dispatch(client_session, topic, bytes(message.data), message.qos, retain)
        return True

    def _chat_uplink(self, session: Session, caller: Caller, topic: str, data: bytes) -> None:
        """A chat device's publish on ``u/...`` (also ChatProtocolHandler.handle_publish's fast path)."""
        hand_uplink(self.bridge, self.counters, caller, topic, data)

    def _refuse_publish(self, session: Session, caller: Caller | None, topic: str) -> None:
        refuse_publish(self.bridge, self.counters, session.client_id or "", caller, topic)

    async def _dispatch(self, session: Session, topic: str, data: bytes, qos: int | None, retain: bool) -> None:
        caller = _chat_identity(session)
        if is_chat_topic(topic):
            if caller is not None:
                self._chat_uplink(session, caller, topic, data)
                return
        elif self._acl(session).may_publish(topic):
            self.counters.publish("generic")
            # A generic topic the ACL opens: amqtt's broadcast path; each subscriber gets
            # it at min(qos, its granted QoS) (ConformantBroker._run_broadcast).
            await self._broadcast_message(session, topic, data, qos)
            if retain:
                await self.retain_message(session, topic, data, qos)  # [MQTT-3.3.1-5, -10, -11]
            return
        self._refuse_publish(session, caller, topic)

    async def _handle_disconnect(self, client_session: Session, handler: Any, disconnect_waiter: Any) -> None:
        result = disconnect_waiter.result()
        log.info("disconnected: %s%s", client_session.client_id,
                 "" if isinstance(result, DisconnectPacket) else " (without DISCONNECT)")
        caller = _chat_identity(client_session)
        if caller is not None:
            self._bridge_offline(caller)
        if not isinstance(result, DisconnectPacket) and client_session.will_flag and client_session.will_topic:
            # MQTT-3.1.2-8: the will goes out on abnormal disconnect, through the
            # same ACL and routing as any publish of this client.
            await self._dispatch(client_session, client_session.will_topic, bytes(client_session.will_message or b""),
                                 client_session.will_qos, bool(client_session.will_retain))
        await self._stop_handler(handler)
        client_session.transitions.disconnect()
        if client_session.clean_session:
            # [MQTT-3.1.2-6]: the session ends with the connection. amqtt left it for
            # its once-a-second monitor, and a quick CONNECT with clean_session=0 got
            # it back with "session present" and its subscriptions.
            self._discard_session(client_session)

    # --- shutdown ------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop accepting first, then close sessions (amqtt), then drain the bridge."""
        for server in self._servers.values():
            instance = server.instance
            if instance is not None:
                instance.close()
        if self.lean is not None:
            self.lean.close_all()
        await super().shutdown()
        await self.bridge.close()


def _anonymous_login(client_id: str, address: str) -> LoginResult:
    """``mqtt.allow_anonymous``: a CONNECT without user name, for generic topics only.

    Client ids of the form ``{user}.{device}`` belong to chat devices, existing or
    not: an anonymous client with one could take over (and, with clean_session=0,
    resume) a device's session, so it is refused with 0x02 (identifier rejected).
    """
    if split_client_id(client_id) is not None:
        log.warning("anonymous login refused from %s: client id %r has the form of a chat device", address, client_id)
        return LoginResult(IDENTIFIER_REJECTED, None, None, "client id reserved for chat devices")
    log.info("anonymous login: %s from %s", client_id, address)
    return LoginResult(ACCEPTED, None, None, "anonymous")


def _serving(instance: Any) -> bool:
    # asyncio.Server and websockets' Server both have is_serving().
    is_serving = getattr(instance, "is_serving", None)
    return bool(is_serving()) if callable(is_serving) else False


async def _close_quietly(writer: WriterAdapter) -> None:
    with contextlib.suppress(OSError, ConnectionError, RuntimeError):
        await close_writer(writer)

