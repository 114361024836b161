"""One chat device's connection on the lean path: an ``asyncio.Protocol`` over the sans-IO core.

``data_received`` feeds ``broker.mqtt.ServerConnection``; its events drive everything else,
and what it answers is written through the transport at the end of each call (a downlink
burst from the bridge is written once per loop iteration). No task per packet, no queue:
the core's buffer is the only one, and reading stops (``pause_reading``) while the client
does not read what it is sent (``pause_writing``), while it is logged in, while it publishes
faster than ``limits.publishes_per_s``, and while it leaves ``limits.max_unacked_downlinks``
downlinks without PUBACK (then it is read slowly). While it does not read, downlinks are written at once
and dropped past ``limits.max_unread_downlink_bytes`` waiting for it (a QoS 0 inbox has no PUBACK to cap).
Keepalive, the packet deadline and the CONNECT deadline are the core's ``deadline()``, watched by the
broker's one ``SilenceWatch``.

The session is also the device's inbox link (``broker.port.InboxLink``): the bridge calls
``send`` once the device has subscribed to ``u/{me}/in``. Login, takeover, routing and the
hand-off of a CONNECT that is not a chat session are the hub's (``SessionHub``: ``broker.lean.LeanSessions``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal, Protocol, cast

from broker.chat_rules import grant, hand_uplink
from broker.counters import BrokerCounters
from broker.downlink import CLOSE_FLUSH_S, WRITE_BUFFER_HIGH
from broker.mqtt.connection import ServerConnection, State
from broker.mqtt.errors import ConnectRefused, ProtocolViolation
from broker.mqtt.events import (
    Closed,
    Connect,
    Disconnect,
    Event,
    NotHandled,
    Publish,
    Subscribe,
    Unsubscribe,
    Will,
)
from broker.mqtt.limits import WireLimits
from broker.pacing import Pacer
from broker.port import ChatPort
from broker.wire import OVER_UNACKED_READ_S
from chatproto import Caller, inbox_topic

log = logging.getLogger(__name__)

# Why reading is stopped (bits of ChatSession._holds).
WRITING = 1  # the transport's buffer is over WRITE_BUFFER_HIGH
LOGIN = 2  # the CONNECT is being checked
PACING = 4  # too many publishes, or too many downlinks unacked: a pause
NOT_PARSED = WRITING | PACING  # holds under which buffered packets are not parsed either

Dropped = Literal["unacked", "unread"]
"""Why a downlink was not sent: ``max_unacked`` left without PUBACK; or over ``max_unread`` bytes wait for a
client that does not read."""


class SessionHub(Protocol):
    """What a session needs of the broker's lean layer (``broker.lean.LeanSessions``)."""

    limits: WireLimits
    connect_timeout_s: float
    max_unacked: int
    max_unread: int
    """Bytes that may wait for a client that does not read (``limits.max_unread_downlink_bytes``)."""
    bridge: ChatPort
    counters: BrokerCounters

    def now(self) -> float: ...

    def opened(self, session: ChatSession) -> bool:
        """A connection was accepted; False: close it at once."""

    def route(self, session: ChatSession, connect: Connect) -> bool:
        """The CONNECT came: True if this session serves it (a login starts), False if it was handed off."""

    def remember_inbox(self, session: ChatSession, qos: int | None) -> None: ...

    def dropped(self, session: ChatSession, why: Dropped) -> None:
        """A downlink was not sent: the unacked cap, or the unread one."""

    def ended(self, session: ChatSession) -> None: ...

    def lost(self, session: ChatSession) -> None: ...


class ChatSession(asyncio.Protocol):
    __slots__ = (
        "_flush_at",
        "_holds",
        "_hub",
        "_inbox",
        "_pacer",
        "_qos",
        "_resume",
        "caller",
        "conn",
        "eof",
        "head",
        "listener",
        "peer",
        "proxied",
        "transport",
    )

    def __init__(self, hub: SessionHub, listener: str, client: tuple[str, int] | None = None) -> None:
        """``client``: the address a PROXY header named (broker/front.py), in place of the socket's peer."""
        self._hub = hub
        self.listener = listener
        self.eof = False
        self.transport: asyncio.Transport | None = None
        self.proxied = client is not None
        self.peer = client or ("", 0)
        self.conn: ServerConnection | None = None
        self.head: list[bytes] | None = []
        """The bytes received until the CONNECT is routed: what amqtt gets on a hand-off."""
        self.caller: Caller | None = None
        self._inbox = b""  # the inbox topic once linked (the bridge sends through ``send``)
        self._qos = 1
        self._holds = 0
        self._flush_at: asyncio.Handle | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._pacer: Pacer | None = None

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # a stream server's (uvloop's is no subclass)
        peer = transport.get_extra_info("peername")
        if not self.proxied:
            self.peer = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("", 0)
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        hub = self._hub
        self.conn = ServerConnection(hub.limits, hub.now(), connect_timeout_s=hub.connect_timeout_s,
                                     max_unacked=hub.max_unacked)
        if not hub.opened(self):
            self.conn.close("refused at accept")
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            return
        if self.head is not None:
            self.head.append(data)
        conn.receive_data(data, self._hub.now())
        self._pump()

    def eof_received(self) -> bool:
        self.eof = True
        if self.conn is not None:
            self.conn.receive_data(b"", self._hub.now())
            self._pump()
        # TCP: the close is ours to make, once the packets before the end are handled (reading may be
        # paused). TLS closes on its own after this (and warns if told otherwise).
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None and (closed := self.conn.close("the connection was lost", "MQTT-3.1.2-8")):
            self._end(closed.will, closed.reason, lost=True)
        self.transport = None
        self._hub.lost(self)

    def pause_writing(self) -> None:
        self._hold(WRITING)

    def resume_writing(self) -> None:
        self._release(WRITING)

    # --- the inbox link (broker.port.InboxLink) -----------------------------------

    @property
    def client_id(self) -> str:
        return self.caller.client_id if self.caller is not None else ""

    def send(self, payload: bytes) -> None:
        """A downlink item for the device's inbox (the bridge's ``DeviceLink.send``), in call order."""
        conn = self.conn
        if conn is None or conn.state is not State.CONNECTED or not self._inbox:
            return  # gone: a staged item is redelivered on its next connection
        # While the client does not read what it is sent (the transport paused writing), an item is dropped past
        # ``max_unread`` bytes waiting for it (broker/downlink.py ``UNREAD_DOWNLINK_MAX`` says why), else written
        # at once, so that the transport's buffer holds all that waits (the core keeps nothing back to count):
        # no syscall, that buffer is not empty and the bytes are only appended to it.
        unread = self.transport if self._holds & WRITING else None
        if unread is not None and unread.get_write_buffer_size() > self._hub.max_unread:
            self._hub.dropped(self, "unread")
            return
        if conn.publish(self._inbox, payload, self._qos) is None:
            self._hub.dropped(self, "unacked")
            return
        if unread is not None:
            unread.write(conn.data_to_send())
        else:
            self._flush_soon()

    # --- what the core says ---------------------------------------------------------

    def _pump(self) -> None:
        conn = self.conn
        assert conn is not None
        while not self._holds & NOT_PARSED:
            try:
                event = conn.next_event()
            except ConnectRefused as exc:
                log.info("%s:%d refused: %s", *self.peer, exc)
                self._end(None, str(exc))
                return
            except ProtocolViolation as exc:
                log.info("%s:%d: closing the connection: %s", *self.peer, exc)
                self._end(conn.will, str(exc))
                return
            if event is None:
                break
            if not self._on_event(conn, event):
                return
        self._flush_soon()

    def _on_event(self, conn: ServerConnection, event: Event) -> bool:
        """Act on one event; False: stop here (the session ended or was handed off)."""
        caller = self.caller
        if isinstance(event, Publish):
            if caller is not None:
                hand_uplink(self._hub.bridge, self._hub.counters, caller, event.topic, event.payload)
            if event.qos == 1:
                conn.puback(event.packet_id or 0)  # QoS 1 has one
            self._pace(conn, published=True)
        elif isinstance(event, Subscribe) and caller is not None:
            self._subscribe(conn, caller, event)
        elif isinstance(event, Unsubscribe) and caller is not None:
            if self._inbox and inbox_topic(caller.user) in event.filters:
                self._unlink()
                self._hub.remember_inbox(self, None)
            conn.unsuback(event.packet_id)
        elif isinstance(event, Connect):
            return self._hub.route(self, event)
        elif isinstance(event, Disconnect):
            self._end(None, "DISCONNECT")
            return False
        elif isinstance(event, Closed):
            self._end(event.will, event.reason)
            return False
        elif isinstance(event, NotHandled):  # QoS 2: chat devices never use it (PROTOCOL.md)
            closed = conn.close("QoS 2 on a chat session")
            self._end(closed.will if closed else None, "QoS 2 on a chat session")
            return False
        else:  # a PUBACK
            self._pace(conn, published=False)
        return True

    def _subscribe(self, conn: ServerConnection, caller: Caller, event: Subscribe) -> None:
        codes = [grant(caller, topic_filter, qos) for topic_filter, qos in event.filters]
        conn.suback(event.packet_id, codes)
        for (topic_filter, _), code in zip(event.filters, codes, strict=True):
            if code <= 1:
                self.link(code)
                self._hub.remember_inbox(self, code)
            else:
                log.info("%s may not subscribe to %r", caller.client_id, topic_filter)

    def _pace(self, conn: ServerConnection, published: bool) -> None:
        """Read more slowly: past ``limits.publishes_per_s``, and while over the unacked cap (its PUBACKs may
        be queued behind its own publishes, so it is read, slowly)."""
        limits = self._hub.limits
        if published and limits.publishes_per_s > 0:
            now = self._hub.now()
            if self._pacer is None:
                self._pacer = Pacer(limits.publishes_per_s, limits.publish_burst, now)
            delay = self._pacer.wait_s(now)
            if delay > 0:
                self._pause(delay)
                return
        if conn.over_unacked:
            self._pause(OVER_UNACKED_READ_S)

    # --- the hub's commands ----------------------------------------------------------

    def accepted(self, caller: Caller, session_present: bool, inbox_qos: int | None) -> bool:
        """The login succeeded: CONNACK, then what the client sent after CONNECT; False if it had gone."""
        conn = self.conn
        assert conn is not None
        conn.accept(session_present)
        if conn.state is not State.CONNECTED:
            return False
        self.caller = caller
        if inbox_qos is not None:  # a resumed session keeps its inbox subscription [MQTT-3.1.2-4]
            self.link(inbox_qos)
        self._release(LOGIN)
        self._pump()
        return True

    def refused(self, code: int, reason: str) -> None:
        if self.conn is not None:
            self.conn.refuse(code)
        self._end(None, reason)

    def link(self, qos: int) -> None:
        """The inbox is subscribed at ``qos``: the bridge sends through this session (again: only the QoS)."""
        self._qos = qos
        if not self._inbox and self.caller is not None:
            self._inbox = inbox_topic(self.caller.user).encode()
            self._hub.bridge.device_online(self.caller.user, self)

    def _unlink(self) -> None:
        if self._inbox and self.caller is not None:
            self._inbox = b""
            self._hub.bridge.device_offline(self.caller.user, self)

    def end(self, reason: str) -> None:
        """Our side ends it (a takeover, a removed device, shutdown): as an abnormal disconnect."""
        if self.conn is not None and (closed := self.conn.close(reason)) is not None:
            self._end(closed.will, reason)

    def handle_read_timeout(self) -> None:
        """``SilenceWatch``: a deadline has passed (keepalive, packet, CONNECT)."""
        if self.conn is not None and (closed := self.conn.check_time(self._hub.now())) is not None:
            log.info("%s:%d %s: %s", *self.peer, self.client_id, closed.reason)
            self._end(closed.will, closed.reason)

    def overdue_at(self) -> float:
        return self.conn.deadline() if self.conn is not None else 0.0

    def hold(self) -> None:
        """Stop reading while the CONNECT is checked."""
        self._hold(LOGIN)

    # --- the end ---------------------------------------------------------------------

    def _end(self, will: Will | None, reason: str, lost: bool = False) -> None:
        """The connection ends: the link goes, the will is published, what is queued is flushed (unless the
        transport is ``lost``: a write to a closed uvloop transport raises)."""
        if self.transport is None:
            return
        log.debug("%s:%d %s ended: %s", *self.peer, self.client_id, reason)
        self._unlink()
        self._hub.ended(self)
        if will is not None and self.caller is not None:  # [MQTT-3.1.2-8]; checked at login (chat_rules.may_will)
            hand_uplink(self._hub.bridge, self._hub.counters, self.caller, will.topic, will.message)
        for handle in (self._flush_at, self._resume):
            if handle is not None:
                handle.cancel()
        self._flush_at = self._resume = None
        if lost:
            self.transport = None
            return
        self._flush()
        transport, self.transport = self.transport, None
        if transport.get_write_buffer_size():
            transport.close()  # flushes what is queued, for at most CLOSE_FLUSH_S
            asyncio.get_running_loop().call_later(CLOSE_FLUSH_S, transport.abort)
        else:
            transport.close()

    # --- reading and writing ------------------------------------------------------------

    def _flush_soon(self) -> None:
        """Write once the loop has run the callbacks it has ready: the PUBACKs of every read this round and
        what the bridge sends from them leave in one write per connection (each write is a syscall)."""
        if self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_at = None
        transport, conn = self.transport, self.conn
        if transport is not None and conn is not None and (data := conn.data_to_send()):
            transport.write(data)

    def _hold(self, why: int) -> None:
        if not self._holds and self.transport is not None:
            self.transport.pause_reading()
        self._holds |= why

    def _release(self, why: int) -> None:
        if not self._holds & why:
            return
        self._holds &= ~why
        if not self._holds and self.transport is not None:
            self.transport.resume_reading()
            self._pump()

    def _pause(self, delay_s: float) -> None:
        if self._holds & PACING:
            return
        self._hold(PACING)
        self._resume = asyncio.get_running_loop().call_later(delay_s, self._paused_enough)

    def _paused_enough(self) -> None:
        self._resume = None
        self._release(PACING)
