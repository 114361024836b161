"""The hardened embedded broker: amqtt's ``Broker`` with narrow overrides.

Each override says which amqtt 0.12.1 fault it fixes (see
``../shared/notes/amqtt-0.12.1.md`` and docs/ARCHITECTURE.md):

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
  on chat topics go to the bridge, not through amqtt's broadcast loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from functools import partial
from typing import Any, cast

import websockets
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, Server
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.session import Session
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from bridge.requests import Caller
from bridge.service import Bridge
from broker.auth import Authenticator
from broker.config import Settings, parse_bind
from broker.handler import ChatProtocolHandler, keepalive_deadline
from client_sdk.protocol import inbox_topic, is_chat_topic, may_subscribe, split_client_id, uplink_kind

log = logging.getLogger(__name__)

WS_PATH = "/mqtt"
SUBACK_FAILURE = 0x80
TAKEOVER_WAIT_S = 5.0


class ListenerError(Exception):
    """A listener could not be started; the message names the config key."""


class LoginRefusedError(Exception):
    pass


class SessionLink:
    """``bridge.links.DeviceLink`` over an amqtt connection (QoS 1, in call order)."""

    def __init__(self, client_id: str, topic: str, handler: ChatProtocolHandler) -> None:
        self._client_id = client_id
        self._topic = topic
        self._handler = handler
        self._pending: set[asyncio.Task[Any]] = set()

    @property
    def client_id(self) -> str:
        return self._client_id

    def send(self, payload: bytes) -> None:
        # mqtt_publish reaches the handler's FIFO write lock without awaiting
        # first, so tasks created in order write in order.
        task = asyncio.ensure_future(self._handler.mqtt_publish(self._topic, payload, QOS_1, retain=False))
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("downlink to %s not acknowledged: %r", self._client_id, task.exception())


def _chat_identity(session: Session) -> Caller | None:
    parts = split_client_id(session.client_id or "")
    if parts is None or parts[0] != session.username:
        return None
    return Caller(parts[0], parts[1])


class ChatBroker(Broker):
    def __init__(self, settings: Settings, authenticator: Authenticator, bridge: Bridge) -> None:
        # Listeners are started by _start_listeners below; amqtt's own listener
        # table only needs its mandatory "default" entry, unbound. No plugins:
        # auth and ACL are methods of this class, not options to forget.
        super().__init__({"listeners": {"default": {"bind": None}}, "plugins": {}})
        self.settings = settings
        self._auth = authenticator
        self.bridge = bridge
        self._live: dict[str, asyncio.Task[Any]] = {}
        self._links: dict[str, SessionLink] = {}

    # --- listeners --------------------------------------------------------------

    async def start(self) -> None:
        # Bind first: a port in use or a bad certificate raises ListenerError
        # here, instead of amqtt logging a traceback and wrapping it.
        await self._open_listeners()
        await super().start()

    async def _start_listeners(self) -> None:
        """amqtt's hook; our listeners are already open (see ``start``)."""

    async def _open_listeners(self) -> None:
        lst = self.settings.listeners
        specs: list[tuple[str, str | None, str, str | None, str | None, int]] = [
            ("tcp", lst.tcp.bind, "tcp", None, None, lst.tcp.max_connections),
            ("tls", lst.tls.bind, "tcp", lst.tls.certfile, lst.tls.keyfile, lst.tls.max_connections),
            ("ws", lst.ws.bind, "ws", None, None, lst.ws.max_connections),
            ("wss", lst.wss.bind, "ws", lst.wss.certfile, lst.wss.keyfile, lst.wss.max_connections),
        ]
        for name, bind, kind, certfile, keyfile, max_connections in specs:
            if bind is None:
                continue
            host, port = parse_bind(bind)
            tls = _tls_context(name, certfile, keyfile) if name in ("tls", "wss") else None
            try:
                instance: Any
                if kind == "tcp":
                    instance = await asyncio.start_server(
                        partial(self.stream_connected, listener_name=name), host, port, ssl=tls, reuse_address=True
                    )
                else:
                    instance = await websockets.serve(
                        partial(self.ws_connected, listener_name=name), host, port, ssl=tls,
                        subprotocols=[websockets.Subprotocol("mqtt")], process_request=_only_mqtt_path,
                    )
            except OSError as exc:
                raise ListenerError(f"listeners.{name}.bind: cannot listen on {bind}: {exc.strerror or exc}") from None
            self._servers[name] = Server(name, instance, max_connections)
            log.info("listening: %s on %s", name, self.bound_addresses()[name])

    def bound_addresses(self) -> dict[str, tuple[str, int]]:
        """Listener name -> the (host, port) actually bound (port 0 resolves here)."""
        result: dict[str, tuple[str, int]] = {}
        for name, server in self._servers.items():
            sockets = getattr(server.instance, "sockets", None) or []
            if sockets:
                host, port = sockets[0].getsockname()[:2]
                result[name] = (str(host), int(port))
        return result

    # --- connection: authenticate first, then session --------------------------

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        server = self._servers.get(listener_name)
        if server is None:
            await writer.close()
            return
        await server.acquire_connection()
        try:
            peer = writer.get_peer_info()
            if peer is None:
                await writer.close()
                return
            try:
                handler, session = await asyncio.wait_for(
                    self._accept_connect(reader, writer, peer[0], peer[1]),
                    timeout=self.settings.limits.connect_timeout_s,
                )
            except TimeoutError:
                log.info("no CONNECT from %s:%d within %.0fs: closing", peer[0], peer[1],
                         self.settings.limits.connect_timeout_s)
                await _close_quietly(writer)
                return
            # OSError, not just ConnectionError: amqtt's own refusals (protocol
            # level, id-less persistent session) close the socket unguarded, and a
            # client that already reset it raises ENOTCONN there (tests/test_auth.py).
            except (LoginRefusedError, AMQTTError, MQTTError, NoDataError, OSError, ValueError) as exc:
                log.debug("connection from %s:%d refused: %r", peer[0], peer[1], exc)
                await _close_quietly(writer)
                return
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
        result = await self._auth.login(incoming.username, incoming.password, client_id, address)
        if result.ok and incoming.will_flag and not self._may_publish(incoming, incoming.will_topic or ""):
            log.warning("login refused: %s set a will on %r, which it may not publish to", client_id,
                        incoming.will_topic)
            result = type(result)(0x05, result.user, None, "will topic not allowed")
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
        """MQTT-3.1.4-2: a new authenticated connection closes the old one first."""
        old_task = self._live.get(client_id)
        if old_task is None or old_task.done():
            return
        log.info("%s reconnected: closing its previous connection", client_id)
        old = self._sessions.get(client_id)
        if old is not None:
            await old[1].handle_connection_closed()
        await asyncio.wait({old_task}, timeout=TAKEOVER_WAIT_S)

    def _session_for(self, incoming: Session) -> Session:
        """amqtt's session cache logic (MQTT-3.1.2-4..6), run only after authentication."""
        client_id = incoming.client_id or ""
        existing = self._sessions.get(client_id)
        if incoming.clean_session or existing is None or existing[0].transitions.is_connected():
            if existing is not None:
                self._sessions.pop(client_id, None)
                self._drop_subscriptions(existing[0])
                existing[0].clear_queues()
            incoming.parent = 0
            session = incoming
        else:
            session = existing[0]
            for attr in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password", "remote_address", "remote_port"):
                setattr(session, attr, getattr(incoming, attr))
            session.parent = 1
        session.keep_alive = keepalive_deadline(incoming.keep_alive)
        return session

    def _drop_subscriptions(self, session: Session) -> None:
        for topic_filter in [f for f, subs in self._subscriptions.items() if any(s is session for s, _ in subs)]:
            remaining = [(s, q) for s, q in self._subscriptions[topic_filter] if s is not session]
            if remaining:
                self._subscriptions[topic_filter] = remaining
            else:
                del self._subscriptions[topic_filter]

    async def _serve_client(
        self, reader: ReaderAdapter, writer: WriterAdapter, session: Session, handler: ChatProtocolHandler
    ) -> None:
        client_id = session.client_id or ""
        session.transitions.connect()
        handler.attach(session, reader, writer)
        self._sessions[client_id] = (session, handler)
        self._live[client_id] = asyncio.current_task()  # type: ignore[assignment]
        try:
            await handler.mqtt_connack_authorize(True)
            await handler.start()
            await self._publish_session_retained_messages(session)
            caller = _chat_identity(session)
            for topic_filter, subscribers in list(self._subscriptions.items()):
                for subscriber, qos in subscribers:
                    if subscriber is not session:  # fault 2: only this session's own filters
                        continue
                    if caller is not None and topic_filter == inbox_topic(caller.user):
                        # A resumed session (clean_session=0, "session present") keeps
                        # its inbox subscription [MQTT-3.1.2-4]; the client need not
                        # SUBSCRIBE again, so link it now (tests/test_connection_lifecycle.py).
                        self._link_device(caller, topic_filter, handler)
                    else:
                        await self._publish_retained_messages_for_subscription((topic_filter, qos), session)
            await self._client_message_loop(session, handler)
        finally:
            if self._live.get(client_id) is asyncio.current_task():
                del self._live[client_id]

    # --- ACL -------------------------------------------------------------------

    def _may_publish(self, session: Session, topic: str) -> bool:
        caller = _chat_identity(session)
        return caller is not None and uplink_kind(caller.user, topic) is not None

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        caller = _chat_identity(session)
        if caller is None:
            return False
        if action == Action.PUBLISH:
            return uplink_kind(caller.user, topic) is not None
        # SUBSCRIBE and RECEIVE: a device reads its own inbox, nothing else.
        return may_subscribe(caller.user, topic)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        if not await self._topic_filtering(session, subscription[0], Action.SUBSCRIBE):
            log.info("%s may not subscribe to %r", session.client_id, subscription[0])
            return SUBACK_FAILURE
        return await super().add_subscription(subscription, session)

    # --- retained messages (fault 2) ---------------------------------------------

    async def retain_message(
        self, source_session: Session | None, topic_name: str | None, data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        if topic_name is not None and is_chat_topic(topic_name):
            return  # PROTOCOL.md: retained messages are never kept on u/... topics
        await super().retain_message(source_session, topic_name, data, qos)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        handler = self._get_handler(session)
        if handler is None:
            return
        topic_filter, qos = subscription
        for topic, retained in list(self._retained_messages.items()):
            if self._matches(topic, topic_filter) and await self._topic_filtering(session, topic, Action.RECEIVE):
                await handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)

    # --- subscriptions tell the bridge who is online -----------------------------

    async def _handle_subscription(self, client_session: Session, handler: Any, subscribe_waiter: Any) -> None:
        subscriptions = subscribe_waiter.result()
        codes = [await self.add_subscription(sub, client_session) for sub in subscriptions.topics]
        await handler.mqtt_acknowledge_subscription(subscriptions.packet_id, codes)
        caller = _chat_identity(client_session)
        for (topic_filter, qos), code in zip(subscriptions.topics, codes, strict=True):
            if code == SUBACK_FAILURE or caller is None:
                continue
            if topic_filter == inbox_topic(caller.user):
                self._link_device(caller, topic_filter, handler)
            else:
                await self._publish_retained_messages_for_subscription((topic_filter, qos), client_session)

    def _link_device(self, caller: Caller, inbox: str, handler: ChatProtocolHandler) -> None:
        link = SessionLink(caller.client_id, inbox, handler)
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

    async def _dispatch(self, session: Session, topic: str, data: bytes, qos: int | None, retain: bool) -> None:
        caller = _chat_identity(session)
        if caller is None:
            return
        kind = uplink_kind(caller.user, topic)
        if kind is not None:
            self.bridge.on_uplink(caller, kind, data)
        else:
            log.info("%s may not publish to %r", caller.client_id, topic)
            self.bridge.refuse_topic(caller, topic)

    async def _handle_disconnect(self, client_session: Session, handler: Any, disconnect_waiter: Any) -> None:
        result = disconnect_waiter.result()
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

    # --- shutdown ------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop accepting first, then close sessions (amqtt), then drain the bridge."""
        for server in self._servers.values():
            instance = server.instance
            if instance is not None:
                instance.close()
        await super().shutdown()
        await self.bridge.close()


def _only_mqtt_path(connection: ServerConnection, request: Request) -> Response | None:
    if request.path.split("?", 1)[0] != WS_PATH:
        return Response(404, "Not Found", Headers({"Content-Type": "text/plain"}), b"MQTT is served on /mqtt\n")
    return None


def _tls_context(listener: str, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    if not certfile or not keyfile:
        raise ListenerError(f"listeners.{listener}: certfile and keyfile are both required for TLS")
    # ssl's FileNotFoundError carries no file name (the CLI said "cannot read None"):
    # open each file first, so the message names the key and the file (tests/test_cli.py).
    for key, path in (("certfile", certfile), ("keyfile", keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ListenerError(f"listeners.{listener}.{key}: cannot read {path}: {exc.strerror or exc}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as exc:
        raise ListenerError(f"listeners.{listener}: cannot read {exc.filename}: no such file") from None
    except PermissionError as exc:
        raise ListenerError(f"listeners.{listener}: cannot read {exc.filename}: permission denied") from None
    except (ssl.SSLError, OSError) as exc:
        raise ListenerError(
            f"listeners.{listener}: certfile {certfile} / keyfile {keyfile} is not a usable PEM pair: {exc}"
        ) from None
    return context


async def _close_quietly(writer: WriterAdapter) -> None:
    with contextlib.suppress(OSError, ConnectionError, RuntimeError):
        await writer.close()

