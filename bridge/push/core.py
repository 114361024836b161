"""The push core: when a device is woken, and what happens to a wake-up the provider answered.
Pure: no I/O; the caller passes the wall time (ms) and carries out what the methods return
(store a queued wake-up, delete it, drop a registration). Only registered devices are watched.

Rules (docs/PUSH.md "When a phone is woken"):
1. A message item staged for a registered device with no live connection queues a wake-up.
2. A message item delivered to a connected device and not acked within ``grace_ms`` queues a
   wake-up too (the connection is dead and nobody knows yet, or the OS froze the app). Any ack
   from the device ends that wait; the next delivery starts a new one. A disconnect keeps it.
3. At most one wake-up per device per ``min_interval_ms``: a wake-up due sooner waits, queued,
   until the interval since the last one sent has passed. An ack since that push ends the
   interval (the device fetched; what comes next deserves a prompt wake-up).
4. A device holds at most one queued wake-up (they say the same: "connect and fetch"). It is
   dropped when the device connects: a connected, acking device is never pushed.
5. The queue is bounded (``max_queue`` devices); a wake-up that does not fit is dropped (counted).
6. An answer RETRY waits the provider's Retry-After when it gave one, else ``retry_min_ms``
   doubling per attempt up to ``retry_max_ms``; after ``max_attempts`` attempts, or once the
   wake-up has expired (``wake_ttl_ms`` after it was queued), it is given up.
7. GONE: the token is dead. The registration is dropped and the device marked as needing to
   register again (told when it next connects). REJECTED: given up, the registration kept.
8. Previews (only when the service passes them: ``push.include_preview``): a wake-up carries the
   newest preview of the messages it stands for -- a queued wake-up takes each newer one until it
   is being sent; one queued later (rule 2 or 3) takes the newest staged since the device last
   acked or connected. A message without a preview leaves the newest one as it is.
Receipts and group events staged for an away device do not wake it: they wait for the next
wake-up or connection (a receipt is not worth waking a phone for).
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass, field, replace

from bridge.push.provider import Outcome, PushResult, PushTarget


@dataclass(frozen=True, slots=True)
class PushRules:
    grace_ms: int
    min_interval_ms: int
    max_queue: int
    retry_min_ms: int
    retry_max_ms: int
    max_attempts: int
    wake_ttl_ms: int


@dataclass(frozen=True, slots=True)
class QueuedWake:
    """A wake-up waiting to go out: what the store keeps, so that it survives a crash."""

    client_id: str
    due_ms: int
    expires_ms: int
    attempts: int = 0
    preview: str | None = None  # rule 8: ciphertext for the device, never the server's plaintext


class Settled(enum.Enum):
    DONE = "done"  # sent, or given up: the queued wake-up is deleted
    RETRY = "retry"  # queued again (``PushCore.queue`` holds its new due time): store it
    GONE = "gone"  # delete the wake-up and the registration; mark the device


@dataclass(slots=True)
class _Device:
    connected: bool = False
    deadline_ms: int | None = None  # rule 2: a delivery not acked by then wakes the device
    last_push_ms: int | None = None  # rule 3
    preview: str | None = None  # rule 8: the newest since the last ack or connection


_GONE = _Device()  # what an unregistered device's deadline is compared with: none


@dataclass(slots=True)
class PushCore:
    rules: PushRules
    targets: dict[str, PushTarget] = field(default_factory=dict)
    queue: dict[str, QueuedWake] = field(default_factory=dict)
    _devices: dict[str, _Device] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)  # rule 7: devices to tell to register again
    _sending: set[str] = field(default_factory=set)
    # (time, client id), earliest first; an entry no longer current (its wake-up or deadline changed
    # or went) is skipped when it comes up, so nothing is ever searched for.
    _due: list[tuple[int, str]] = field(default_factory=list)
    _deadlines: list[tuple[int, str]] = field(default_factory=list)
    dropped: int = 0  # rule 5, for the metrics

    def restore(self, targets: list[PushTarget], queued: list[QueuedWake], gone: list[str]) -> None:
        """What the store holds after a restart (every device away until it connects)."""
        self.gone.update(gone)
        for target in targets:
            self.register(target)
        for wake in queued:
            if wake.client_id in self.targets:
                self._queue(wake)

    # --- registrations ------------------------------------------------------------------------

    def register(self, target: PushTarget) -> None:
        self.gone.discard(target.client_id)
        self.targets[target.client_id] = target
        self._devices.setdefault(target.client_id, _Device())

    def unregister(self, client_id: str) -> bool:
        """Forget the device (``push.unregister``, ``devices.remove``, GONE); True if it had a queued wake-up."""
        self.targets.pop(client_id, None)
        self._devices.pop(client_id, None)
        return self.queue.pop(client_id, None) is not None

    # --- what messaging reports (rules 1-4) ---------------------------------------------------

    def online(self, client_id: str) -> bool:
        """The device connected; True if its queued wake-up is to be deleted (rule 4)."""
        device = self._devices.get(client_id)
        if device is None:
            return False
        device.connected, device.deadline_ms, device.preview = True, None, None
        return self.queue.pop(client_id, None) is not None

    def offline(self, client_id: str) -> None:
        device = self._devices.get(client_id)
        if device is not None:
            device.connected = False

    def staged(self, client_id: str, now_ms: int, preview: str | None = None) -> QueuedWake | None:
        """A message item was staged for the device; a wake-up to store, if one is due (rule 1) or
        the queued one took the message's preview (rule 8)."""
        device = self._devices.get(client_id)
        if device is None:
            return None
        if preview is not None:
            device.preview = preview
            queued = self.queue.get(client_id)
            if queued is not None and client_id not in self._sending and queued.preview != preview:
                # Same due time: its heap entry holds. (Built directly: replace() costs ~4 µs here.)
                wake = self.queue[client_id] = QueuedWake(client_id, queued.due_ms, queued.expires_ms,
                                                          queued.attempts, preview)
                return wake
        return None if device.connected else self._enqueue(client_id, device, now_ms)

    def delivered(self, client_id: str, now_ms: int) -> None:
        device = self._devices.get(client_id)
        if device is not None and device.connected and device.deadline_ms is None:
            device.deadline_ms = now_ms + self.rules.grace_ms
            heapq.heappush(self._deadlines, (device.deadline_ms, client_id))

    def acked(self, client_id: str) -> None:
        device = self._devices.get(client_id)
        if device is not None:
            device.deadline_ms = None
            device.last_push_ms = None
            device.preview = None

    def overdue(self, now_ms: int) -> list[QueuedWake]:
        """Rule 2: the wake-ups of devices whose deliveries went unacked past the grace; store them."""
        queued = []
        while self._deadlines and self._deadlines[0][0] <= now_ms:
            deadline, client_id = heapq.heappop(self._deadlines)
            device = self._devices.get(client_id)
            if device is not None and device.deadline_ms == deadline:
                device.deadline_ms = None
                wake = self._enqueue(client_id, device, now_ms)
                if wake is not None:
                    queued.append(wake)
        return queued

    def _enqueue(self, client_id: str, device: _Device, now_ms: int) -> QueuedWake | None:
        if client_id in self.queue:
            return None  # rule 4
        if len(self.queue) >= self.rules.max_queue:
            self.dropped += 1
            return None
        due = now_ms if device.last_push_ms is None else max(now_ms, device.last_push_ms + self.rules.min_interval_ms)
        return self._queue(QueuedWake(client_id, due, due + self.rules.wake_ttl_ms, preview=device.preview))

    def _queue(self, wake: QueuedWake) -> QueuedWake:
        self.queue[wake.client_id] = wake
        heapq.heappush(self._due, (wake.due_ms, wake.client_id))
        return wake

    def _current(self, entry: tuple[int, str]) -> bool:
        wake = self.queue.get(entry[1])
        return wake is not None and wake.due_ms == entry[0] and entry[1] not in self._sending

    # --- sending ---------------------------------------------------------------------------

    def next_due_ms(self) -> int | None:
        """When the next wake-up or grace deadline falls due (None: nothing waits)."""
        while self._due and not self._current(self._due[0]):
            heapq.heappop(self._due)
        while self._deadlines and self._devices.get(self._deadlines[0][1], _GONE).deadline_ms != self._deadlines[0][0]:
            heapq.heappop(self._deadlines)
        return min([heap[0][0] for heap in (self._due, self._deadlines) if heap], default=None)

    def take_due(self, now_ms: int, limit: int) -> list[tuple[QueuedWake, PushTarget]]:
        """Up to ``limit`` wake-ups due now, each with its target; each must be ``settle``d."""
        taken: list[tuple[QueuedWake, PushTarget]] = []
        while self._due and self._due[0][0] <= now_ms and len(taken) < limit:
            entry = heapq.heappop(self._due)
            if self._current(entry):
                self._sending.add(entry[1])
                taken.append((self.queue[entry[1]], self.targets[entry[1]]))
        return taken

    def settle(self, wake: QueuedWake, target: PushTarget, result: PushResult, now_ms: int) -> Settled:
        """What the provider answered for ``wake`` sent to ``target`` (rules 3, 6, 7)."""
        client_id = wake.client_id
        self._sending.discard(client_id)
        if result.outcome is Outcome.GONE and self.targets.get(client_id) == target:  # not re-registered since
            self.unregister(client_id)
            self.gone.add(client_id)
            return Settled.GONE
        current = self.queue.get(client_id)
        if current is not wake:  # the device connected or unregistered meanwhile (its entry is gone)
            return Settled.DONE
        if result.outcome is Outcome.SENT:
            device = self._devices.get(client_id)
            if device is not None:
                device.last_push_ms = now_ms
            del self.queue[client_id]
            return Settled.DONE
        again = retried(self.rules, wake, result, now_ms)
        if again is None:
            del self.queue[client_id]
            return Settled.DONE
        device = self._devices.get(client_id)
        if device is not None and device.preview is not None:  # rule 8: the newest preview
            again = replace(again, preview=device.preview)
        self._queue(again)
        return Settled.RETRY


def retried(rules: PushRules, wake: QueuedWake, result: PushResult, now_ms: int) -> QueuedWake | None:
    """Rule 6: ``wake`` queued again after an attempt that was not SENT (a GONE whose device registered
    again since is retried to the new registration), or None: given up."""
    attempts = wake.attempts + 1
    if result.outcome is Outcome.REJECTED or attempts >= rules.max_attempts:
        return None
    due = now_ms + retry_delay_ms(rules, attempts, result.retry_after_s)
    return None if due >= wake.expires_ms else replace(wake, due_ms=due, attempts=attempts)


def retry_delay_ms(rules: PushRules, attempts: int, retry_after_s: float | None) -> int:
    """Rule 6: the wait after the ``attempts``-th failed attempt."""
    if retry_after_s is not None and retry_after_s >= 0:
        return int(retry_after_s * 1000)
    return min(rules.retry_min_ms << min(attempts - 1, 30), rules.retry_max_ms)
