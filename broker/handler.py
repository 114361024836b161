"""amqtt's per-connection protocol handler, with the keepalive it lacks.

amqtt 0.12.1 reads with a timeout of the keepalive but its broker handler
ignores the timeout (``handle_read_timeout`` is a no-op): a phone that lost its
network stays "connected" forever and its will is never sent. MQTT 3.1.1
section 3.1.2.10 says the server must disconnect a client that sends nothing
for one and a half times its keepalive; ``keepalive_deadline`` (broker/mqtt/connection.py) gives that
figure and ``handle_read_timeout`` ends the connection, which then takes the
abnormal-disconnect path (will published, bridge told the device left).
The silence is watched by one timer for all connections (``watch_silence``,
broker/silence.py), not by a timeout on every read: amqtt's ``wait_for`` per read
costs a Task per packet and ~2 KiB per idle connection, so amqtt reads without a
timeout here.

It also keeps outgoing QoS 1/2 messages in the session until they are
acknowledged (MQTT 3.1.1 section 4.4). amqtt waits 5 s for PUBACK/PUBREC/PUBCOMP,
then forgets the message, and drops it when the connection ends; a slow phone
that acks after 6 s, or reconnects, never gets it again. Here the wait still
ends after ``ACK_WAIT_S`` (no task is held per message), but the message stays
in ``session.inflight_out``: an acknowledgement that arrives later completes it
(``handle_puback`` ...), and on a resumed session ``_retry_deliveries`` re-sends
every unacknowledged PUBLISH with DUP=1 and its packet id, and every PUBREL,
in the original order [MQTT-4.4.0-1, MQTT-3.3.1-1, MQTT-4.6.0-1]. Chat topics
(``u/...``) are the exception: the bridge's staging store redelivers those
(PROTOCOL.md), so a chat message is forgotten as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet as kind
from amqtt.mqtt import packet_class
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.mqtt.subscribe import SubscribePacket
from amqtt.mqtt.unsubscribe import UnsubscribePacket
from amqtt.session import (
    INCOMING,
    OUTGOING,
    ApplicationMessage,
    IncomingApplicationMessage,
    OutgoingApplicationMessage,
    Session,
)

from broker.downlink import (
    DownlinkPolicy,
    DownlinkWriter,
    PacketIds,
    close_writer,
    streams_bytes,
)
from broker.lazy_queue import LazyEvent, LazyQueue
from broker.mqtt.encoding import encode_puback, encode_publish
from broker.silence import SilenceWatch
from broker.wire import PacketGate
from chatproto import is_chat_topic

T = TypeVar("T")
log = logging.getLogger(__name__)
ACK_WAIT_S = 5.0
"""How long a publish task waits for its acknowledgement (amqtt's figure); a later ack still completes it."""


def _next(queue: asyncio.Queue[T]) -> T | None:
    """The queue's next item, or None; a lazy queue emptied gives its memory back."""
    if queue.empty():
        return None
    item = queue.get_nowait()
    if isinstance(queue, LazyQueue) and queue.empty():
        queue.shrink()
    return item


# amqtt's reader loop: packet type -> the handler method it runs in a task of its own. Not CONNECT:
# PacketGate refuses a second one (MQTT-3.1.0-2) before it gets here.
_HANDLERS = {
    kind.CONNACK: "handle_connack", kind.SUBSCRIBE: "handle_subscribe", kind.UNSUBSCRIBE: "handle_unsubscribe",
    kind.SUBACK: "handle_suback", kind.UNSUBACK: "handle_unsuback", kind.PUBACK: "handle_puback",
    kind.PUBREC: "handle_pubrec", kind.PUBREL: "handle_pubrel", kind.PUBCOMP: "handle_pubcomp",
    kind.PINGREQ: "handle_pingreq", kind.PINGRESP: "handle_pingresp", kind.PUBLISH: "handle_publish",
    kind.DISCONNECT: "handle_disconnect",
}
# Cancelled, or the end of the stream (as amqtt's read_or_raise counts it): the loop ends quietly.
_LOOP_ENDS = (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError)


class ChatProtocolHandler(BrokerProtocolHandler):
    _stopping: asyncio.Future[None] | None = None
    _chat_ids: PacketIds | None = None
    _downlink: DownlinkWriter | None = None
    chat_uplink: Callable[[str, bytes], None] | None = None
    """Set by the broker for an authenticated chat device: takes its QoS 0/1 publishes on ``u/...``."""
    _wake: asyncio.Future[None] | None = None
    _packet_tasks: set[asyncio.Task[None]] | None = None
    """Handler tasks of packets still running; None while there are none (most of an idle connection's life)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # An idle connection never uses these (broker/lazy_queue.py).
        self._pending_subscriptions = LazyQueue()
        self._pending_unsubscriptions = LazyQueue()

    # --- events for the broker's message loop (ChatBroker._client_message_loop) ---------------
    # amqtt's loop keeps four Tasks per connection waiting on three queues and the
    # disconnect future, and builds an asyncio.wait over them per event. Here the
    # loop polls those and, when all are empty, waits on one future that every
    # producer below resolves.

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def disconnect_future(self) -> asyncio.Future[Any]:
        """The future the connection's end resolves (a done one if the handler has none: amqtt's wait_disconnect)."""
        waiter = self._disconnect_waiter
        if waiter is None:
            waiter = self._loop.create_future()
            waiter.set_result(None)
        return waiter

    def next_subscription(self) -> Any:
        return _next(self._pending_subscriptions)

    def next_unsubscription(self) -> Any:
        return _next(self._pending_unsubscriptions)

    def next_delivery(self) -> ApplicationMessage | None:
        session = self.session
        if session is None or not self._is_attached():
            return None
        return _next(session.delivered_message_queue)

    def event_waiter(self, disconnect: asyncio.Future[Any]) -> asyncio.Future[None]:
        """A future that a producer (``_notify``) or ``disconnect`` resolves; the caller awaits it, then
        calls ``end_wait(disconnect)`` and polls again.

        Not a coroutine with a closure (amqtt's loop had Tasks): on an idle connection this wait
        is what lasts, so it is a future and a bound-method callback, ~400 bytes less.
        """
        wake = self._wake = self._loop.create_future()
        disconnect.add_done_callback(self._disconnected)
        return wake

    def end_wait(self, disconnect: asyncio.Future[Any]) -> None:
        disconnect.remove_done_callback(self._disconnected)  # bound methods compare equal: this one goes
        self._wake = None

    def _disconnected(self, _: asyncio.Future[Any]) -> None:
        self._notify()

    async def handle_subscribe(self, subscribe: SubscribePacket) -> None:
        await super().handle_subscribe(subscribe)
        self._notify()

    async def handle_unsubscribe(self, unsubscribe: UnsubscribePacket) -> None:
        await super().handle_unsubscribe(unsubscribe)
        self._notify()

    async def _handle_message_flow(self, app_message: IncomingApplicationMessage | OutgoingApplicationMessage) -> None:
        await super()._handle_message_flow(app_message)
        if app_message.direction == INCOMING:
            self._notify()  # the message is in session.delivered_message_queue now

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        # A chat publish goes straight to the bridge (in arrival order: the reader
        # starts these tasks in order and nothing here awaits first) and is
        # acknowledged at once. amqtt's path costs an IncomingApplicationMessage,
        # a queue hop and a Task + asyncio.wait in its message loop per publish.
        # Anything else, and wildcard/empty topics (which close the connection),
        # keep amqtt's path.
        uplink, topic, data = self.chat_uplink, publish_packet.topic_name, publish_packet.data
        if (uplink is None or (publish_packet.qos or 0) > 1 or not topic or data is None or not is_chat_topic(topic)
                or "+" in topic or "#" in topic or not streams_bytes(self.writer)):
            await super().handle_publish(publish_packet)
            return
        uplink(topic, bytes(data))
        if publish_packet.qos == 1 and self.writer is not None and publish_packet.variable_header is not None:
            # Written now, not buffered: PUBACKs leave in the order the PUBLISHes came [MQTT-4.6.0-2].
            self.writer.write(encode_puback(publish_packet.variable_header.packet_id or 0))

    def send_chat(self, topic: bytes, payload: bytes, qos: int) -> bool:
        """Queue a chat downlink PUBLISH without a task (broker/downlink.py), in call order.

        False when this connection cannot take that path (a WebSocket, or not
        attached): the caller then uses ``mqtt_publish``.
        """
        session = self.session
        if session is None or not streams_bytes(self.writer):
            return False
        if self._downlink is None or not self._downlink.writes_to(self.writer):
            assert self.writer is not None  # streams_bytes() said so; for mypy
            self._downlink = DownlinkWriter(self.writer, self._loop)
        if self._chat_ids is None:
            self._chat_ids = PacketIds(lambda: session.next_packet_id, self.downlink_policy.max_unacked)
        packet_id = self._chat_ids.take() if qos else None
        if qos and packet_id is None:
            self._drop_unacked()
            return True
        self._downlink.write(encode_publish(topic, payload, qos, packet_id))
        return True

    downlink_policy = DownlinkPolicy()
    """Set by the broker with ``chat_uplink`` (``limits.max_unacked_downlinks``; its counters)."""

    def unacked_over(self) -> bool:
        """True while this connection leaves ``max_unacked`` chat deliveries without PUBACK."""
        return self._chat_ids is not None and self._chat_ids.full

    def _drop_unacked(self) -> None:
        policy = self.downlink_policy
        if policy.counters is not None:
            policy.counters.downlink_dropped += 1
        gate = self.reader
        if isinstance(gate, PacketGate) and gate.unacked_over is None:
            # The first drop on this connection: from now on it is read slowly while over the cap
            # (honest connections never get here and pay nothing per packet). Logged once: the
            # client may be hostile, and its log lines cost too.
            gate.unacked_over = self.unacked_over
            log.warning("%s leaves %d deliveries without PUBACK: further ones are not sent until it acknowledges "
                        "(staged items are redelivered later)", self.session.client_id if self.session else "?",
                        policy.max_unacked)

    async def start(self) -> None:
        self._stopping = None
        await super().start()
        # amqtt made these two Events in start() and nothing waits on them while the
        # connection is idle: lazy ones, in the same state (broker/lazy_queue.py). Only if nothing waits
        # (a stop() may): asyncio.Event has no public count of its waiters, so its private deque is read,
        # and if a Python lacks it the Event is kept (tests/test_connection_lifecycle.py checks the swap).
        for name in ("_reader_ready", "_reader_stopped"):
            event = getattr(self, name)
            if (isinstance(event, asyncio.Event) and not isinstance(event, LazyEvent)
                    and not getattr(event, "_waiters", True)):
                lazy = LazyEvent()
                if event.is_set():
                    lazy.set()
                setattr(self, name, lazy)

    async def _reader_loop(self) -> None:
        """amqtt's ``ProtocolHandler._reader_loop`` (same packets, handler tasks, order and endings), leaner.

        An idle connection waits in ``PacketGate.next_packet``: four coroutine frames,
        where amqtt's loop keeps eleven suspended (its ``wait_for``, header parse and
        read layers: ~2 KiB per connection). The handler tasks are kept in a set that
        exists only while one runs; amqtt's deque (760 bytes) also held the last
        packet's finished task for as long as the connection stayed idle.
        """
        gate, session = self.reader, self.session
        if not isinstance(gate, PacketGate) or session is None or self._reader_ready is None or session.keep_alive > 0:
            await super()._reader_loop()  # not through our gate, or with amqtt's read timeout
            return
        # Set once (amqtt set it on every turn; nothing clears it), and not held in a local:
        # start() swaps it for a LazyEvent, and the old Event must not stay alive with this frame.
        self._reader_ready.set()
        while True:
            try:
                if not gate.buffered():
                    await gate.next_packet()
                fixed_header = await MQTTFixedHeader.from_stream(gate)
                if fixed_header is None:
                    break
                packet = await packet_class(fixed_header).from_stream(gate, fixed_header=fixed_header)
                await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=session)
                if (name := _HANDLERS.get(fixed_header.packet_type)) is not None:
                    self._run_packet_task(getattr(self, name)(packet))
                else:
                    self.logger.warning(f"{session.client_id} Unhandled packet type: {fixed_header.packet_type}")
            except (MQTTError, NoDataError):  # as amqtt: logged, and on to the next packet (or the end)
                self.logger.debug("Message discarded")
            except _LOOP_ENDS:
                break
            except TimeoutError:
                self.handle_read_timeout()
            except Exception as e:  # amqtt's loop: any other error ends the connection
                self.logger.warning(f"{type(self).__name__} Unhandled exception in reader coro: {e!r}")
                break
        if self._packet_tasks:
            # Handler tasks of the last packets read may not have run yet (the stream
            # ended in the same turn). Each queues its message for delivery in its first
            # step: let them take it before the rest is cancelled, or a PUBLISH followed
            # at once by a close is lost [MQTT-4.3.2-2, MQTT-4.3.3-2].
            await asyncio.sleep(0)
        tasks, self._packet_tasks = self._packet_tasks, None
        for task in tasks or ():
            task.cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    def _run_packet_task(self, handling: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(handling)
        if self._packet_tasks is None:
            self._packet_tasks = set()
        self._packet_tasks.add(task)  # a strong reference until done: the loop only keeps weak ones
        task.add_done_callback(self._packet_task_done)

    def _packet_task_done(self, task: asyncio.Task[None]) -> None:
        tasks = self._packet_tasks
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                self._packet_tasks = None

    async def stop(self) -> None:
        # amqtt calls stop() from several places at once (session clean-up at
        # shutdown, disconnect handling, the reader's own exit). A second call
        # cancels the reader while it is finishing, so it never sets
        # _reader_stopped and both callers wait forever (seen as a hung
        # shutdown). One stop per connection, shared by every caller.
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_once())
        await asyncio.shield(self._stopping)

    async def _stop_once(self) -> None:
        """amqtt's ProtocolHandler.stop + BrokerProtocolHandler.stop, with a reader stop that cannot hang."""
        self._stop_waiters()
        if self._keepalive_task:
            self._keepalive_task.cancel()
        if self._watch is not None:
            self._watch.forget(self)
            self._watch = None
        reader = self._reader_task
        if reader is not None and reader is not asyncio.current_task():
            # Python 3.11's asyncio.wait_for swallows a cancellation that lands
            # as its inner read completes (fixed in 3.12); amqtt's reader loop
            # then keeps reading. Cancel again until the reader has stopped.
            while not reader.done() and not self._reader_stopped.is_set():
                reader.cancel()
                stopped = asyncio.ensure_future(self._reader_stopped.wait())
                await asyncio.wait({stopped, reader}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
            if not self._reader_stopped.is_set():  # cancelled before it could report the closed connection
                await self.handle_connection_closed()
        if self.writer is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, OSError):
                await close_writer(self.writer)
        if self._disconnect_waiter is not None and not self._disconnect_waiter.done():
            self._disconnect_waiter.set_result(None)
        self._disconnect_waiter = None
        while not self._pending_subscriptions.empty():
            self._pending_subscriptions.get_nowait()
        while not self._pending_unsubscriptions.empty():
            self._pending_unsubscriptions.get_nowait()

    _watch: SilenceWatch | None = None
    _silence_s = 0.0

    def watch_silence(self, watch: SilenceWatch, deadline_s: float) -> None:
        """Have ``watch`` end the connection once nothing was read for ``deadline_s`` (0: keepalive off), or
        a packet stays incomplete past its deadline (until ``stop``). Only for connections read by a PacketGate."""
        self._watch = watch
        if deadline_s:
            self._silence_s = deadline_s
        watch.watch(self)

    def overdue_at(self) -> float:
        """Loop time from which the connection is overdue (``SilenceWatch``): silent past its keepalive
        deadline, or in the middle of a packet past the packet deadline."""
        reader = self.reader
        if not isinstance(reader, PacketGate):
            return math.inf
        at = reader.last_read + self._silence_s if self._silence_s else math.inf
        return min(at, reader.packet_overdue_at())

    def handle_read_timeout(self) -> None:
        # Cancelling the reader task ends its loop, which then reports the
        # connection as closed (no DISCONNECT: abnormal).
        if self._reader_task is not None and not self._reader_task.done():
            client = self.session.client_id if self.session else "?"
            reader = self.reader
            if isinstance(reader, PacketGate) and reader.packet_overdue_at() <= self._loop.time():
                self.logger.info("%s: closing the connection: a packet not completed within its deadline "
                                 "(mqtt.packet_deadline_s)", client)
            else:
                self.logger.info("%s silent for 1.5 x keepalive: disconnecting [MQTT-3.1.2-24]", client)
            self._reader_task.cancel()

    @property
    def connected(self) -> bool:
        return self._reader_task is not None and not self._reader_task.done()

    # --- outgoing QoS 1/2: kept until acknowledged (MQTT 3.1.1 section 4.4) ----------

    def _own_session(self) -> Session:
        if self.session is None:
            raise AMQTTError("Session is not initialized.")
        return self.session

    def _forget_unacked(self, message: OutgoingApplicationMessage) -> bool:
        """Chat downlink is redelivered by the bridge (new packet id); MQTT keeps the rest."""
        return is_chat_topic(message.topic)

    async def _handle_qos1_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction != OUTGOING or not isinstance(app_message, OutgoingApplicationMessage):
            await super()._handle_qos1_message_flow(app_message)
            return
        session = self._own_session()
        packet_id = app_message.packet_id
        if packet_id is None:
            raise ValueError("Packet ID is not set")
        session.inflight_out[packet_id] = app_message
        # Registered before PUBLISH goes out: amqtt registered it after the write, so a
        # fast PUBACK could find no waiter and the message then "timed out".
        waiter: asyncio.Future[PubackPacket] = self._loop.create_future()
        self._puback_waiters[packet_id] = waiter
        acked = False
        try:
            packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)  # [MQTT-3.3.1-1]
            await self._send_packet(packet)
            app_message.publish_packet = packet
            app_message.puback_packet = await asyncio.wait_for(waiter, ACK_WAIT_S)
            acked = True
        finally:
            if self._puback_waiters.get(packet_id) is waiter:
                del self._puback_waiters[packet_id]
            if acked or self._forget_unacked(app_message):
                session.inflight_out.pop(packet_id, None)

    async def _handle_qos2_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction != OUTGOING or not isinstance(app_message, OutgoingApplicationMessage):
            await super()._handle_qos2_message_flow(app_message)
            return
        session = self._own_session()
        packet_id = app_message.packet_id
        if packet_id is None:
            raise ValueError("Packet ID is not set")
        session.inflight_out[packet_id] = app_message
        completed = False
        try:
            if app_message.pubrec_packet is None:
                pubrec: asyncio.Future[PubrecPacket] = self._loop.create_future()
                self._pubrec_waiters[packet_id] = pubrec
                try:
                    packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
                    await self._send_packet(packet)
                    app_message.publish_packet = packet
                    app_message.pubrec_packet = await asyncio.wait_for(pubrec, ACK_WAIT_S)
                finally:
                    if self._pubrec_waiters.get(packet_id) is pubrec:
                        del self._pubrec_waiters[packet_id]
            pubcomp: asyncio.Future[PubcompPacket] = self._loop.create_future()
            self._pubcomp_waiters[packet_id] = pubcomp
            try:
                app_message.pubrel_packet = PubrelPacket.build(packet_id)
                await self._send_packet(app_message.pubrel_packet)
                app_message.pubcomp_packet = await asyncio.wait_for(pubcomp, ACK_WAIT_S)
                completed = True
            finally:
                if self._pubcomp_waiters.get(packet_id) is pubcomp:
                    del self._pubcomp_waiters[packet_id]
        finally:
            if completed or self._forget_unacked(app_message):
                session.inflight_out.pop(packet_id, None)

    async def handle_puback(self, puback: PubackPacket) -> None:
        packet_id = puback.variable_header.packet_id if puback.variable_header else None
        if packet_id is not None and self._chat_ids is not None and self._chat_ids.release(packet_id):
            return  # a chat downlink: the bridge tracks delivery by the chat ack, not by PUBACK
        if packet_id is not None and packet_id not in self._puback_waiters:
            message = self._own_session().inflight_out.get(packet_id)
            if message is not None and message.qos == 1:
                del self._own_session().inflight_out[packet_id]  # acknowledged after the wait [MQTT-4.3.2-1]
                return
        await super().handle_puback(puback)

    async def handle_pubrec(self, pubrec: PubrecPacket) -> None:
        packet_id = pubrec.packet_id
        if packet_id not in self._pubrec_waiters:
            message = self._own_session().inflight_out.get(packet_id)
            if message is not None and message.qos == 2:
                # Late, or after a re-sent PUBLISH: the sender answers PUBREC with PUBREL [MQTT-4.3.3-1].
                message.pubrec_packet = pubrec
                message.pubrel_packet = PubrelPacket.build(packet_id)
                await self._send_packet(message.pubrel_packet)
                return
        await super().handle_pubrec(pubrec)

    async def handle_pubcomp(self, pubcomp: PubcompPacket) -> None:
        packet_id = pubcomp.packet_id
        if packet_id not in self._pubcomp_waiters:
            message = self._own_session().inflight_out.get(packet_id)
            if message is not None and message.qos == 2 and message.pubrec_packet is not None:
                del self._own_session().inflight_out[packet_id]  # the QoS 2 flow is complete [MQTT-4.3.3-1]
                return
        await super().handle_pubcomp(pubcomp)

    async def handle_pubrel(self, pubrel: PubrelPacket) -> None:
        # The message is released here, in this task's first step, not by the QoS 2 flow
        # waiting for this PUBREL (amqtt's way): that flow resumes only later, and a
        # DISCONNECT or close right after the PUBREL cancelled it first, so a released
        # message was never delivered [MQTT-4.3.3-2]. The flow's waiter is cancelled
        # (it then ends quietly). Also the path for a PUBREL no flow waits for: re-sent
        # after a reconnect [MQTT-4.4.0-1] (amqtt ignored it), or repeated because our
        # PUBCOMP was lost. The message is released once; PUBCOMP always answers.
        packet_id = pubrel.packet_id
        waiter = self._pubrel_waiters.pop(packet_id, None)
        if waiter is not None and not waiter.done():
            waiter.cancel()
        session = self._own_session()
        message = session.inflight_in.pop(packet_id, None)
        if message is not None:
            message.pubrel_packet = pubrel
            session.delivered_message_queue.put_nowait(message)
            self._notify()
        await self._send_packet(PubcompPacket.build(packet_id))

    async def _retry_deliveries(self) -> None:
        """On a resumed session, re-send what the client has not acknowledged [MQTT-4.4.0-1].

        amqtt re-ran each flow and waited (up to 10 s) for all the acks before the
        connection was served, then dropped what was still unacked. Here each
        PUBLISH goes out again with DUP=1 and its packet id, each PUBREL again, in
        the original order [MQTT-4.6.0-1]; the acks complete them as they come.
        """
        session = self._own_session()
        for message in list(session.inflight_out.values()):
            if message.qos == 2 and message.pubrec_packet is not None:
                message.pubrel_packet = PubrelPacket.build(message.packet_id or 0)
                await self._send_packet(message.pubrel_packet)
            else:
                packet = message.build_publish_packet(dup=True)  # [MQTT-3.3.1-1]
                await self._send_packet(packet)
                message.publish_packet = packet
