"""The dispatcher: the one thread that hands events to the app, and acks.

Work arrives in a FIFO queue, in the order items arrived from the server:
an ephemeral event, "item ``seq`` is stored" or "ack ``seq`` (a duplicate)".
The thread hands each event over (``deliver`` blocks until the app is done
with it), records staged items as handed, and publishes their acks in
batches: when the queue is momentarily empty or ``ack_batch`` seqs are waiting
(one ack names at most ``MAX_IDS_PER_ITEM`` seqs).
The first task is "hand over everything stored": items stored by an earlier
run and never handed over go to the app before anything new. Uplink items
that must follow the acks (seen reports) are queued here too.

Because it is one thread, events reach the app one at a time, in arrival
order, and paho's network thread never waits for the app.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Final

from chatproto import MAX_IDS_PER_ITEM
from client_sdk.events import Event
from client_sdk.inbox import Inbox

RETRY_HAND_OVER_S: Final = 1.0  # after a failed hand-over (a key fetch that timed out, ...)
log = logging.getLogger(__name__)

_EVENT: Final = "event"
_STORED: Final = "stored"
_ACK: Final = "ack"
_AFTER_ACKS: Final = "after_acks"
_STOP: Final = "stop"


class Dispatcher:
    """Call ``start()`` once; feed it from any thread; ``stop()`` once."""

    def __init__(
        self,
        inbox: Inbox,
        deliver: Callable[[Event], bool],
        publish_acks: Callable[[list[int]], None],
        name: str = "chat-dispatch",
        ack_batch: int = 100,
    ) -> None:
        self._inbox = inbox
        self._deliver = deliver
        self._publish_acks = publish_acks
        self._name = name
        self._ack_batch = min(ack_batch, MAX_IDS_PER_ITEM)
        self._tasks: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._acks: list[int] = []
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def start(self) -> None:
        if self._thread is not None:
            return
        left = self._inbox.highest_staged()
        if left:  # hand over what an earlier run stored (and nothing newer) first
            self._tasks.put((_STORED, left))
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def event(self, event: Event) -> None:
        """Hand ``event`` over (ephemeral: not stored, not acked)."""
        self._tasks.put((_EVENT, event))

    def stored(self, seq: int) -> None:
        """Item ``seq`` is in the inbox: hand it (and any lower stored one) over, then ack."""
        self._tasks.put((_STORED, seq))

    def duplicate(self, seq: int) -> None:
        """Item ``seq`` was handed over before: ack it again."""
        self._tasks.put((_ACK, seq))

    def after_acks(self, publish: Callable[[], None]) -> None:
        """Run ``publish`` once everything handed over before now is acked.

        Used for seen reports, so that "seen" never overtakes the ack (and so
        the ``delivered`` receipt) of the very messages it names.
        """
        self._tasks.put((_AFTER_ACKS, publish))

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the event being handed over, publish waiting acks, end the thread.

        Events still queued are not handed over; staged ones stay in the store
        for the next run. Safe to call from inside ``deliver`` (it does not wait then).
        """
        self._stopped.set()
        self._tasks.put((_STOP, None))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # --- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                kind, value = self._tasks.get()
                if kind == _STOP or not self._step(kind, value):
                    break
                if self._acks and self._tasks.empty():
                    self._flush()
        finally:
            self._flush()

    def _step(self, kind: str, value: Any) -> bool:
        """Do one task; False when the app can no longer take events (closing)."""
        try:
            if kind == _EVENT:
                return self._deliver(value)
            if kind == _STORED:
                return self._inbox.hand_over(self._deliver, self._handed, value)
            if kind == _ACK:
                self._handed(value)
            elif kind == _AFTER_ACKS:
                self._flush()
                value()
        except Exception:
            if self._stopped.is_set():
                return False  # the store was closed under us: the item stays for the next run
            log.exception("%s: handing over failed; the item stays stored", self._name)
            if kind == _STORED:
                # e.g. the sender's keys could not be fetched (the connection dropped): try the
                # stored items again soon, not only when the next item arrives.
                retry = threading.Timer(RETRY_HAND_OVER_S, self._tasks.put, args=((_STORED, value),))
                retry.daemon = True
                retry.start()
        return True

    def _handed(self, seq: int) -> None:
        self._acks.append(seq)
        if len(self._acks) >= self._ack_batch:
            self._flush()

    def _flush(self) -> None:
        while self._acks:
            batch, self._acks = self._acks[:MAX_IDS_PER_ITEM], self._acks[MAX_IDS_PER_ITEM:]
            try:
                self._publish_acks(batch)
            except Exception:
                log.exception("%s: publishing an ack failed; the server will send the items again", self._name)
