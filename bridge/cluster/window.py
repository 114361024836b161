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
4. Write-back (bridge/cluster/writeback.py): the node may hand a device an item it holds in memory,
   with a *local* seq of its own, once the device is caught up: a block of seqs was reserved for
   this link (``set_base``) and a read started after that came back short, so every store seq below
   the block has been read. A local seq is above the block's base and every seq read, and below
   ``SEQ_STRIDE`` above the higher of them, so every store seq not read yet is above it: the device
   gets seqs in increasing order whichever kind comes first. When ``SEQ_STRIDE - 1`` local seqs
   were given since the last read moved the cursor, there is none left: the item goes through the
   store instead.
5. A local item written to the store later has a store seq too (an *alias*): the store copy is not
   sent again on this link, and the device's ack of the local seq acks the store copy. A read may
   return the copy before the writer says so (``alias``): it is recognised by what it is (the
   message's sender and id, or the receipt), and its seq stays known as an alias after the local
   seq is acked, until the read cursor passes it (the store ack of the copy may not have landed
   when the next read runs). Either way, sent twice it was (``bench scale``: 58 repeats).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from bridge.busy import BusyDevices
from bridge.cluster.store import SEQ_STRIDE, QueuedItem
from chatproto import GroupItem, MsgItem, ReceiptItem

ItemKey = tuple[str, ...]


class Alias(enum.Enum):
    SET = "set"  # the device's ack of the local seq acks the store copy
    ACKED = "acked"  # the device acked the local seq already: the caller acks the store copy
    GONE = "gone"  # the device left (or linked again): the store copy is for its next link


def item_key(item: MsgItem | ReceiptItem | GroupItem) -> ItemKey:
    """What an item is, whichever seq it has: a message by its sender and id, a receipt by its content, a
    group item by its group and gseq (never held: no local item has that key)."""
    if isinstance(item, GroupItem):
        return ("group", item.group, str(item.gseq))
    if isinstance(item, MsgItem):
        return ("msg", item.sender, item.id) if item.gseq is None else ("group", item.to, str(item.gseq))
    return ("receipt", item.status, item.peer, *item.ids)


@dataclass(slots=True)
class DeviceWindow:
    last_read: int = 0  # the highest seq read from the queue
    buffer: deque[QueuedItem] = field(default_factory=deque)  # read, not sent yet
    inflight: dict[int, tuple[float, QueuedItem]] = field(default_factory=dict)  # seq -> (sent at, item)
    reading: bool = False
    behind: bool = True  # the queue may hold items after last_read
    link: int = 0  # which link of the device this window is (aliases are only for the same link)
    reads: int = 0  # reads started
    base: int = 0  # rule 4: the link's block of local seqs (0: none yet)
    caught_up_after: int = -1  # rule 4: a short read numbered above this catches the device up (-1: no base)
    caught_up: bool = False
    local_last: int = 0  # the last local seq given
    local: set[int] = field(default_factory=set)  # local seqs buffered or in flight
    aliases: dict[int, int] = field(default_factory=dict)  # rule 5: local seq -> store seq
    aliased: set[int] = field(default_factory=set)  # store seqs that are aliases
    local_keys: dict[ItemKey, int] = field(default_factory=dict)  # rule 5: what each local item is -> its seq
    local_key_of: dict[int, ItemKey] = field(default_factory=dict)  # ... and back


@dataclass(slots=True)
class WindowOutcome:
    sends: list[tuple[str, MsgItem | ReceiptItem | GroupItem]] = field(default_factory=list)
    reads: list[tuple[str, int]] = field(default_factory=list)  # (client id, after seq) to read now


class Windows:
    def __init__(self, window: int, redeliver_after_s: float) -> None:
        self.window = window
        self.redeliver_after_s = redeliver_after_s
        self._devices: dict[str, DeviceWindow] = {}
        self._sending = BusyDevices()  # devices with items in flight, for ``redeliver``
        self._per_user: dict[str, int] = {}  # user -> devices linked here
        self._links = 0
        self.redeliveries = 0

    def __contains__(self, client_id: str) -> bool:
        return client_id in self._devices

    def __len__(self) -> int:
        return len(self._devices)

    def clients(self) -> list[str]:
        return list(self._devices)

    def online(self, client_id: str, now: float) -> WindowOutcome:
        """Rule 1: a fresh window; everything in the queue goes again."""
        self._links += 1
        if client_id not in self._devices:
            user = client_id.partition(".")[0]
            self._per_user[user] = self._per_user.get(user, 0) + 1
        self._devices[client_id] = DeviceWindow(link=self._links)
        return self._pump(client_id, now)

    def has_user(self, user: str) -> bool:
        """Whether a device of ``user`` is linked here (write-back asks Redis nothing otherwise)."""
        return user in self._per_user

    def link(self, client_id: str) -> int | None:
        box = self._devices.get(client_id)
        return None if box is None else box.link

    def set_base(self, client_id: str, link: int, base: int, now: float) -> WindowOutcome:
        """Rule 4: the store reserved the block above ``base`` for this link; read again to catch up."""
        box = self._devices.get(client_id)
        if box is None or box.link != link:
            return WindowOutcome()
        box.base, box.caught_up_after, box.behind = base, box.reads, True
        return self._pump(client_id, now)

    def can_hold(self, client_id: str) -> bool:
        """Rule 4: whether the device can get a held item now (caught up, a local seq left, and
        room in its window: held items wait in memory no more than a window's worth)."""
        return self._next_local(client_id) is not None

    def read_past(self, client_id: str, tail: int) -> bool:
        """Whether the device's window has read its queue up to ``tail`` (a held item may then follow
        everything staged before it)."""
        box = self._devices.get(client_id)
        return box is not None and box.last_read >= tail

    def local_seq(self, client_id: str) -> int | None:
        """Rule 4: the next local seq of the device, or None (``can_hold`` is False)."""
        seq = self._next_local(client_id)
        if seq is not None:
            self._devices[client_id].local_last = seq
        return seq

    def _next_local(self, client_id: str) -> int | None:
        box = self._devices.get(client_id)
        if box is None or not box.caught_up or len(box.buffer) + len(box.inflight) >= self.window:
            return None
        cursor = max(box.base, box.last_read)
        seq = max(box.local_last, cursor) + 1
        return seq if seq < cursor + SEQ_STRIDE else None

    def push_local(self, client_id: str, queued: QueuedItem, now: float) -> WindowOutcome:
        """Rule 4: send a held item (its seq from ``local_seq``) after what is buffered."""
        box = self._devices[client_id]
        box.local.add(queued.seq)
        key = item_key(queued.item)
        box.local_keys[key] = queued.seq
        box.local_key_of[queued.seq] = key
        box.buffer.append(queued)
        return self._pump(client_id, now)

    def alias(self, client_id: str, link: int, local: int, stored: int) -> Alias:
        """Rule 5: the local item ``local`` of this link is in the store as ``stored``."""
        box = self._devices.get(client_id)
        if box is None or box.link != link:
            return Alias.GONE
        box.aliased.add(stored)
        if local not in box.local:
            return Alias.ACKED
        box.aliases[local] = stored
        return Alias.SET

    def split_ack(self, client_id: str, seqs: list[int]) -> tuple[list[int], list[int]]:
        """An ack's seqs: (local seqs, store seqs -- with aliases in place of their local seqs)."""
        box = self._devices.get(client_id)
        if box is None:
            return [], seqs
        local = [s for s in seqs if s in box.local]
        stored = [s for s in seqs if s not in box.local]
        stored += [box.aliases[s] for s in local if s in box.aliases]
        return local, stored

    def sent_items(self, client_id: str, seqs: list[int]) -> list[QueuedItem]:
        """The items of ``seqs`` in flight to the device (what an ack of them acks, as far as this link sent it)."""
        box = self._devices.get(client_id)
        return [] if box is None else [box.inflight[seq][1] for seq in seqs if seq in box.inflight]

    def offline(self, client_id: str) -> None:
        if self._devices.pop(client_id, None) is not None:
            user = client_id.partition(".")[0]
            left = self._per_user[user] - 1
            if left:
                self._per_user[user] = left
            else:
                del self._per_user[user]

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
                local = box.local_keys.get(item_key(queued.item))
                if local is not None and queued.seq not in box.aliased:  # rule 5: read before alias() said so
                    box.aliases[local] = queued.seq
                    box.aliased.add(queued.seq)
                if queued.seq not in box.aliased:  # rule 5: here already under its local seq
                    box.buffer.append(queued)
                box.last_read = queued.seq
        box.aliased = {seq for seq in box.aliased if seq > box.last_read}  # never read again
        if len(items) >= limit:
            box.behind = True
        elif 0 <= box.caught_up_after < box.reads:
            box.caught_up = True
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
            if seq in box.local:
                box.local.discard(seq)
                box.aliases.pop(seq, None)  # (its store seq stays in ``aliased``: rule 5)
                key = box.local_key_of.pop(seq, None)
                if key is not None and box.local_keys.get(key) == seq:
                    del box.local_keys[key]
        if box.buffer and any(q.seq in seqs for q in box.buffer):  # acked while buffered (sent by an earlier link)
            box.buffer = deque(q for q in box.buffer if q.seq not in seqs)
        return self._pump(client_id, now)

    def redeliver(self, now: float) -> WindowOutcome:
        """Rule 2: items unacked too long go again, in the order they were sent."""
        out = WindowOutcome()
        for client_id in self._sending.still(self._in_flight):
            box = self._devices[client_id]
            stale = [seq for seq, (sent, _) in box.inflight.items() if now - sent >= self.redeliver_after_s]
            for seq in stale:
                _, queued = box.inflight.pop(seq)
                box.inflight[seq] = (now, queued)  # to the end: in-flight order is send order
                self.redeliveries += 1
                out.sends.append((client_id, queued.item))
        return out

    def _in_flight(self, client_id: str) -> dict[int, tuple[float, QueuedItem]] | None:
        box = self._devices.get(client_id)
        return box.inflight if box is not None else None

    def depth(self, client_id: str) -> int:
        """Items read and not acked yet (a lower bound of the device's queue)."""
        box = self._devices.get(client_id)
        return 0 if box is None else len(box.buffer) + len(box.inflight)

    def depths(self) -> list[int]:
        """``depth`` of each device that has any: only devices with items in flight can (``_pump`` fills
        the flight before it leaves anything in the buffer), so idle devices cost nothing."""
        return [n for client_id in self._sending if (n := self.depth(client_id))]

    def linked(self) -> int:
        """Devices linked here."""
        return len(self._devices)

    def _pump(self, client_id: str, now: float, out: WindowOutcome | None = None) -> WindowOutcome:
        out = out if out is not None else WindowOutcome()
        box = self._devices[client_id]
        while box.buffer and len(box.inflight) < self.window:
            queued = box.buffer.popleft()
            box.inflight[queued.seq] = (now, queued)
            self._sending.add(client_id)
            out.sends.append((client_id, queued.item))
        if box.behind and not box.reading and len(box.buffer) + len(box.inflight) < self.window:
            box.reading, box.behind = True, False
            box.reads += 1
            out.reads.append((client_id, box.last_read))
        return out
