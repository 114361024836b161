"""amqtt's per-connection protocol handler, with the keepalive it lacks.

amqtt 0.12.1 reads with a timeout of the keepalive but its broker handler
ignores the timeout (``handle_read_timeout`` is a no-op): a phone that lost its
network stays "connected" forever and its will is never sent. MQTT 3.1.1
section 3.1.2.10 says the server must disconnect a client that sends nothing
for one and a half times its keepalive; ``keepalive_deadline`` gives that
figure and ``handle_read_timeout`` ends the connection, which then takes the
abnormal-disconnect path (will published, bridge told the device left).
"""

from __future__ import annotations

import math

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler


def keepalive_deadline(keepalive_s: int) -> int:
    """Seconds of silence after which a client is dropped (0: keepalive off)."""
    return math.ceil(keepalive_s * 1.5) if keepalive_s > 0 else 0


class ChatProtocolHandler(BrokerProtocolHandler):
    def handle_read_timeout(self) -> None:
        # Called from inside the reader task; cancelling it ends the reader loop,
        # which then reports the connection as closed (no DISCONNECT: abnormal).
        if self._reader_task is not None and not self._reader_task.done():
            client = self.session.client_id if self.session else "?"
            self.logger.info("%s silent for 1.5 x keepalive: disconnecting [MQTT-3.1.2-24]", client)
            self._reader_task.cancel()

    @property
    def connected(self) -> bool:
        return self._reader_task is not None and not self._reader_task.done()

