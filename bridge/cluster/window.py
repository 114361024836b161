"""What a node sends to each of its connected devices in cluster mode. Pure: no I/O; the caller
passes the time and what it read from the shared queue (bridge/cluster/store.py).

Rules (the single-node rule 6, over a queue that other nodes add to):
1. A device that links its inbox gets everything in its queue again, in seq order: its window
   starts empty and reads from the start.
2. At most ``window`` items are unacked at a time; an item unacked ``redeliver_after_s`` after it
   was sent goes again, in send order.
3. The node reads the queue only after the last seq it has read, one read at a time per device,
   and only while fewer than ``window`` items are buffered or in flight. A nudge (or the node's
   own staging) marks the device *behind*; a read that comes back full or while behind reads
   again. Seqs are given in commit order by the store, so an item never appears below one read.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from bridge.cluster.store import QueuedItem
from chatproto import MsgItem, ReceiptItem


@dataclass(slots=True)
class DeviceWindow:
    last_read: int = 0  # the highest seq read from the queue
    buffer: deque[QueuedItem] = field(default_factory=deque)  # read, not sent yet
    inflight: dict[int, tuple[float, QueuedItem]] = field(default_factory=dict)  # seq -> (sent at, item)
    reading: bool = False
    behind: bool = True  # the queue may hold items after last_read


@dataclass(slots=True)
class WindowOutcome:
    sends: list[tuple[str, MsgItem | ReceiptItem]] = field(default_factory=list)
    reads: list[tuple[str, int]] = field(default_factory=list)  # (client id, after seq) to read now


class Windows:
    def __init__(self, window: int, redeliver_after_s: float) -> None:
        self.window = window
        self.redeliver_after_s = redeliver_after_s
        self._devices: dict[str, DeviceWindow] = {}
        self.redeliveries = 0

    def __contains__(self, client_id: str) -> bool:
        return client_id in self._devices

    def __len__(self) -> int:
        return len(self._devices)

    def clients(self) -> list[str]:
        return list(self._devices)

    def online(self, client_id: str, now: float) -> WindowOutcome:
        """Rule 1: a fresh window; everything in the queue goes again."""
        self._devices[client_id] = DeviceWindow()
        return self._pump(client_id, now)

    def offline(self, client_id: str) -> None:
        self._devices.pop(client_id, None)

    def behind(self, client_ids: list[str], now: float) -> WindowOutcome:
        """New items may be in these devices' queues (a nudge, a local stage, the periodic look)."""
        out = WindowOutcome()
        for client_id in client_ids:
            box = self._devices.get(client_id)
            if box is not None:
                box.behind = True
                self._pump(client_id, now, out)
        return out

    def read_done(self, client_id: str, after: int, items: list[QueuedItem], limit: int, now: float) -> WindowOutcome:
        """A read of ``limit`` items after ``after`` came back with ``items`` (seq order)."""
        box = self._devices.get(client_id)
        if box is None:
            return WindowOutcome()
        if after != box.last_read:  # of an earlier link of the device: its fresh window has a read of its own
            return WindowOutcome()
        box.reading = False
        for queued in items:
            if queued.seq > box.last_read:
                box.buffer.append(queued)
                box.last_read = queued.seq
        if len(items) >= limit:
            box.behind = True
        return self._pump(client_id, now)

    def read_failed(self, client_id: str) -> None:
        """The read failed: the device stays behind; the next nudge, ack or periodic look reads again."""
        box = self._devices.get(client_id)
        if box is not None:
            box.reading = False
            box.behind = True

    def acked(self, client_id: str, seqs: list[int], now: float) -> WindowOutcome:
        box = self._devices.get(client_id)
        if box is None:
            return WindowOutcome()
        for seq in seqs:
            box.inflight.pop(seq, None)
        if box.buffer and any(q.seq in seqs for q in box.buffer):  # acked while buffered (sent by an earlier link)
            box.buffer = deque(q for q in box.buffer if q.seq not in seqs)
        return self._pump(client_id, now)

    def redeliver(self, now: float) -> WindowOutcome:
        """Rule 2: items unacked too long go again, in the order they were sent."""
        out = WindowOutcome()
        for client_id, box in self._devices.items():
            stale = [seq for seq, (sent, _) in box.inflight.items() if now - sent >= self.redeliver_after_s]
            for seq in stale:
                _, queued = box.inflight.pop(seq)
                box.inflight[seq] = (now, queued)  # to the end: in-flight order is send order
                self.redeliveries += 1
                out.sends.append((client_id, queued.item))
        return out

    def depth(self, client_id: str) -> int:
        """Items read and not acked yet (a lower bound of the device's queue)."""
        box = self._devices.get(client_id)
        return 0 if box is None else len(box.buffer) + len(box.inflight)

    def _pump(self, client_id: str, now: float, out: WindowOutcome | None = None) -> WindowOutcome:
        out = out if out is not None else WindowOutcome()
        box = self._devices[client_id]
        while box.buffer and len(box.inflight) < self.window:
            queued = box.buffer.popleft()
            box.inflight[queued.seq] = (now, queued)
            out.sends.append((client_id, queued.item))
        if box.behind and not box.reading and len(box.buffer) + len(box.inflight) < self.window:
            box.reading, box.behind = True, False
            out.reads.append((client_id, box.last_read))
        return out
