"""amqtt's ``Broker`` with its MQTT 3.1.1 subscription and delivery faults fixed.

``ChatBroker`` (broker/server.py) builds on this class; this layer knows
nothing of chat, users or the bridge. It fixes, each at the rule cited:

- delivered QoS: amqtt sends every message at the subscription's QoS; here it
  is min(publish QoS, granted QoS) [MQTT-3.8.4-6, section 3.3.5];
- re-subscribing to the same filter keeps amqtt's old QoS; here it replaces the
  subscription [MQTT-3.8.4-3];
- offline queue of a persistent session: amqtt delivers it on reconnect with the
  retain flag set and waits for every ack before serving the client; here it
  goes out with RETAIN=0 [MQTT-3.3.1-9: retain is 1 only for retained messages
  sent because of a new subscription], behind the re-sent in-flight messages and
  ahead of anything newer [MQTT-4.6.0-1], without holding the connection up;
- QoS 1/2 messages held per session (in flight + offline) are bounded by
  ``mqtt.max_queued_messages`` (amqtt's queue is unbounded);
- retained messages on resume: amqtt re-sends every retained message matching
  the session's filters at each reconnect; they are sent only for a new
  subscription [MQTT-3.3.1-6] (and never without the RECEIVE check);
- subscriptions are indexed per session, so dropping a session's subscriptions
  costs its own filters, not a scan of every filter of every client;
- amqtt logs ``repr(self._subscriptions)`` after every SUBSCRIBE, with debug
  logging off too: every login cost the repr of every client's subscriptions
  (quadratic login storms, bench/results/analysis.md section 3). The table's
  repr is now its size.

Sending is done by tasks created in order: each reaches the handler's FIFO write
lock without awaiting first, so the order on the wire is the order of creation.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import ApplicationMessage, OutgoingApplicationMessage, Session

from broker.acl import is_valid_filter

log = logging.getLogger(__name__)

SUBACK_FAILURE = 0x80
FILTERS = "broker.filters"  # Session.attributes key: the session's topic filters
RESUMING = "broker.resuming"  # Session.attributes key: set while a resumed session's backlog is queued


class SubscriptionTable(dict[str, list[tuple[Session, int]]]):
    """amqtt's filter -> subscribers table with an O(1) ``repr`` (amqtt builds it per SUBSCRIBE)."""

    def __repr__(self) -> str:
        return f"<{len(self)} topic filters>"


class ConformantBroker(Broker):
    def __init__(self, config: dict[str, Any], max_queued_messages: int) -> None:
        super().__init__(config)
        self._subscriptions = SubscriptionTable(self._subscriptions)
        self._max_queued = max_queued_messages
        self._sending: set[asyncio.Task[Any]] = set()

    # --- hooks for the access rules (the chat layer overrides them) -----------------

    def _may_subscribe(self, session: Session, topic_filter: str) -> bool:
        return True

    def _may_receive(self, session: Session, topic: str) -> bool:
        return True

    # --- subscriptions ----------------------------------------------------------------

    @staticmethod
    def _filters_of(session: Session) -> set[str]:
        filters = session.attributes.get(FILTERS)
        if filters is None:
            filters = session.attributes[FILTERS] = set()
        return filters

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, qos = subscription
        if not is_valid_filter(topic_filter):
            return SUBACK_FAILURE  # [MQTT-4.7.1-2], [MQTT-4.7.1-3]: SUBACK 0x80, as amqtt
        if not self._may_subscribe(session, topic_filter):
            log.info("%s may not subscribe to %r", session.client_id, topic_filter)
            return SUBACK_FAILURE
        subscribers = self._subscriptions.setdefault(topic_filter, [])
        for index, (subscriber, _) in enumerate(subscribers):
            if subscriber is session:
                subscribers[index] = (session, qos)  # replaces the old QoS [MQTT-3.8.4-3]
                break
        else:
            subscribers.append((session, qos))
        self._filters_of(session).add(topic_filter)
        return qos

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        subscribers = self._subscriptions.get(a_filter)
        self._filters_of(session).discard(a_filter)
        if not subscribers:
            return 0
        remaining = [(s, q) for s, q in subscribers if s is not session]
        if remaining:
            self._subscriptions[a_filter] = remaining
        else:
            del self._subscriptions[a_filter]  # amqtt left empty lists behind
        return len(subscribers) - len(remaining)

    def _drop_subscriptions(self, session: Session) -> None:
        for topic_filter in list(self._filters_of(session)):
            self._del_subscription(topic_filter, session)

    async def _del_all_subscriptions(self, session: Session) -> None:
        self._drop_subscriptions(session)

    # --- routing of non-chat publishes --------------------------------------------------

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]) -> None:
        """One message from the broadcast queue to every matching subscription.

        ``broadcast["qos"]`` is the publish QoS (amqtt's "force_qos"); each copy goes
        out at min(that, the subscription's QoS) [MQTT-3.8.4-6]. No await inside the
        loop: the subscription table cannot change under it.
        """
        broadcast = await self._broadcast_queue.get()
        topic: str = broadcast["topic"]
        data: bytes = bytes(broadcast["data"] or b"")
        publish_qos: int | None = broadcast.get("qos")
        for topic_filter, subscribers in self._subscriptions.items():
            if not self._matches(topic, topic_filter):
                continue
            for target, granted in subscribers:
                qos = granted if publish_qos is None else min(publish_qos, granted)
                if not self._may_receive(target, topic):
                    continue
                self._deliver(target, topic, data, qos)

    def _deliver(self, target: Session, topic: str, data: bytes, qos: int) -> None:
        connected = target.transitions.state == "connected"
        if not connected and (target.clean_session or qos == 0):
            return  # [MQTT-3.1.2-5]: only a persistent session keeps QoS 1/2 messages while offline
        if qos > 0 and len(target.inflight_out) + target.retained_messages.qsize() >= self._max_queued:
            log.warning("%s: %d messages unacknowledged or queued (mqtt.max_queued_messages): dropping one on %r",
                        target.client_id, self._max_queued, topic)
            return
        handler = self._get_handler(target) if connected else None
        if handler is None or target.attributes.get(RESUMING):
            # Offline, or its backlog is being handed over: queue behind it [MQTT-4.6.0-1].
            target.retained_messages.put_nowait(ApplicationMessage(None, topic, qos, data, retain=False))
            return
        self._send_later(handler, topic, data, qos, retain=False)  # [MQTT-3.3.1-9]: RETAIN=0 to subscribers

    def _send_later(self, handler: BrokerProtocolHandler, topic: str, data: bytes, qos: int, retain: bool) -> None:
        task = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain))
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[Any]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # An unacked QoS 1/2 message stays in the session (broker/handler.py).
            log.debug("publish not acknowledged: %r", task.exception())

    def _resume_deliveries(self, session: Session, handler: BrokerProtocolHandler) -> None:
        """Send a resumed session's offline queue, then let new messages through.

        Call after ``handler.start()`` has re-sent the in-flight messages; nothing is
        awaited here, so no message can overtake the backlog.
        """
        queue = session.retained_messages
        while not queue.empty():
            message = queue.get_nowait()
            self._send_later(handler, message.topic, bytes(message.data), message.qos or 0, retain=False)
        session.attributes.pop(RESUMING, None)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        handler = self._get_handler(session)
        if handler is not None:
            self._resume_deliveries(session, handler)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """[MQTT-3.3.1-6]: a new subscription gets the matching retained messages, RETAIN=1 [MQTT-3.3.1-8]."""
        handler = self._get_handler(session)
        if handler is None:
            return
        topic_filter, qos = subscription
        for topic, retained in list(self._retained_messages.items()):
            if self._matches(topic, topic_filter) and self._may_receive(session, topic):
                granted = qos if retained.qos is None else min(qos, retained.qos)
                self._send_later(handler, retained.topic, bytes(retained.data), granted, retain=True)

    async def shutdown(self) -> None:
        await super().shutdown()
        for task in list(self._sending):
            task.cancel()
        if self._sending:
            await asyncio.wait(list(self._sending), timeout=5)
