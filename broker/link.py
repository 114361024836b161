"""A connected chat device's inbox, as the bridge sees it: ``SessionLink``.

The broker makes one when a device subscribes to ``u/{me}/in`` and hands it to the
bridge (``broker.port.ChatPort.device_online``); the bridge only calls ``send``
(``bridge.links.DeviceLink``), which must not block and must keep call order.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.mqtt.constants import QOS_1

from broker.handler import ChatProtocolHandler

log = logging.getLogger(__name__)


class SessionLink:
    """``bridge.links.DeviceLink`` over an amqtt connection (QoS 1, in call order).

    ``qos`` is min(1, the QoS granted to the inbox subscription) [MQTT-3.8.4-6]: a
    device that subscribed at QoS 0 gets its items at QoS 0 (the chat protocol's own
    ack and redelivery still apply).
    """

    def __init__(self, client_id: str, topic: str, handler: ChatProtocolHandler, qos: int = QOS_1) -> None:
        self._client_id = client_id
        self._topic = topic
        self._handler = handler
        self._qos = min(qos, QOS_1)
        self._topic_bytes = topic.encode()
        self._pending: set[asyncio.Task[Any]] | None = None  # WebSocket sends in flight; made on first use

    @property
    def client_id(self) -> str:
        return self._client_id

    def serves(self, handler: ChatProtocolHandler) -> bool:
        """True if this link writes to ``handler``'s connection."""
        return self._handler is handler

    def regrant(self, qos: int) -> None:
        """The inbox was subscribed again on the same connection, at ``qos``."""
        self._qos = min(qos, QOS_1)

    def send(self, payload: bytes) -> None:
        if self._handler.send_chat(self._topic_bytes, payload, self._qos):
            return
        # A WebSocket connection: amqtt's path. mqtt_publish reaches the handler's FIFO write lock without awaiting
        # first, so tasks created in order write in order.
        task = asyncio.ensure_future(self._handler.mqtt_publish(self._topic, payload, self._qos, retain=False))
        if self._pending is None:
            self._pending = set()
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        if self._pending is not None:
            self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("downlink to %s not acknowledged: %r", self._client_id, task.exception())
