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

import asyncio
import contextlib
import math

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler


def keepalive_deadline(keepalive_s: int) -> int:
    """Seconds of silence after which a client is dropped (0: keepalive off)."""
    return math.ceil(keepalive_s * 1.5) if keepalive_s > 0 else 0


class ChatProtocolHandler(BrokerProtocolHandler):
    _stopping: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self._stopping = None
        await super().start()

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
                await self.writer.close()
        if self._disconnect_waiter is not None and not self._disconnect_waiter.done():
            self._disconnect_waiter.set_result(None)
        self._disconnect_waiter = None
        while not self._pending_subscriptions.empty():
            self._pending_subscriptions.get_nowait()
        while not self._pending_unsubscriptions.empty():
            self._pending_unsubscriptions.get_nowait()

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

