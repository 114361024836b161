"""The state of the staging core and the bookkeeping on it that no delivery rule decides: the
per-device queues and the live messages, their restore after a restart, what the next commit takes
(``take_flush``) or puts back, and the figures for the metrics. ``Staging``
(bridge/messaging/core.py) adds the rules on top; nothing here stages an item or settles a message.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from bridge.busy import BusyDevices
from bridge.counters import BridgeCounters
from bridge.directory import Directory
from bridge.keys.core import KeyedDevices
from bridge.limits import RateLimiter, RecentIds
from bridge.messaging.admission import Holds
from bridge.messaging.records import (
    DURABLE,
    SEQ_SPAN,
    VOLATILE,
    WRITING,
    DeviceBox,
    Figures,
    FlushBatch,
    Item,
    Rules,
    StagedMessage,
    StagingOutcome,
)
from chatproto import ErrorCode, ErrorItem


class StagingState:
    """What ``Staging`` keeps, with its rule-free bookkeeping (a base class, so that the hot paths of
    ``Staging`` reach all of it as attributes of ``self``, with no call in between)."""

    def __init__(self, rules: Rules, boot: int, directory: Directory, rate: RateLimiter, recent: RecentIds,
                 keyed: KeyedDevices | None = None) -> None:
        self.rules = rules
        self.directory = directory
        self.keyed = keyed if keyed is not None else KeyedDevices()
        self._rate = rate
        self._recent = recent
        self._seq_base = boot * SEQ_SPAN
        self._next_mid = boot * SEQ_SPAN
        self.boxes: dict[str, DeviceBox] = {}
        self._counters: dict[str, int] = {}  # per device, for this boot; never reset (seqs must not repeat)
        self.live: dict[tuple[str, str], StagedMessage] = {}
        self._by_mid: dict[int, StagedMessage] = {}
        self._waiting_bodies: set[str] = set()
        self._sending = BusyDevices()  # devices with items in flight, for ``redeliver``
        self._holding = BusyDevices()  # devices with staged items, for ``expire``
        self._volatile: deque[Item] = deque()  # in creation order: flush deadlines ascend
        self._pending = FlushBatch()  # deletions and flags waiting for the next commit
        self._pending_due: float | None = None
        # origin -> (id of its message refused for a transient reason, until): later messages of that
        # device are refused too until it re-sends that one, so a retry cannot land behind newer ones.
        self._holds = Holds()
        self.counters = BridgeCounters()  # read by chatserver.metrics at scrape time

    # --- restore -----------------------------------------------------------------

    def restore(self, messages: Iterable[StagedMessage], items: Iterable[Item]) -> None:
        """Load what the store holds (all durable) after a restart."""
        by_mid = {}
        for message in messages:
            message.state, message.sent_notified = DURABLE, True
            by_mid[message.mid] = message
            self._remember(message)
        for item in items:
            item.state, item.settled = DURABLE, True
            if item.message is not None:
                item.message = by_mid.get(item.message.mid, item.message)
                item.message.targets.add(item.device)
            self._box(item.device).items[item.seq] = item
            self._holding.add(item.device)

    def remember_ids(self, rows: Iterable[tuple[str, str, int]]) -> None:
        for sender, msg_id, expires in rows:
            self._recent.add((sender, msg_id), expires)

    def _box(self, device: str) -> DeviceBox:
        box = self.boxes.get(device)
        if box is None:
            box = self.boxes[device] = DeviceBox()
        return box

    def _queued(self, device: str) -> int:
        """Items staged for ``device`` (a box is made only for an item: an empty offline one is never swept)."""
        box = self.boxes.get(device)
        return len(box.items) if box is not None else 0

    def _new_seq(self, device: str) -> int:
        count = self._counters.get(device, 0) + 1
        self._counters[device] = count
        return self._seq_base + count

    def _remember(self, message: StagedMessage) -> None:
        self.live[(message.sender, message.msg_id)] = message
        self._by_mid[message.mid] = message

    def _online(self, device: str) -> bool:
        return (box := self.boxes.get(device)) is not None and box.online

    def _wanted_online(self, message: StagedMessage) -> bool:
        return any(box.online for box in (self.boxes.get(t) for t in message.targets) if box is not None)

    # --- flushing ----------------------------------------------------------------------

    def next_flush_at(self, now: float) -> float | None:
        """When the next commit is due (None: nothing waits). Deletions wait up to ``flush_s`` too,
        so that acks are deleted in groups rather than one commit each."""
        while self._volatile and (self._volatile[0].acked or self._volatile[0].state != VOLATILE):
            self._volatile.popleft()
        due = self._volatile[0].due if self._volatile else None
        if not self._pending.empty():
            if self._pending_due is None:
                self._pending_due = now + self.rules.flush_s
            due = self._pending_due if due is None else min(due, self._pending_due)
        return due

    def take_flush(self, now: float) -> FlushBatch | None:
        """Everything due for the disk now (all of it if ``now`` is infinite)."""
        batch, self._pending = self._pending, FlushBatch()
        self._pending_due = None
        keep: deque[Item] = deque()
        # Scan them all: an adopted item is due at once although staged behind
        # others, and must commit with the deletion of the row it replaces.
        for item in self._volatile:
            if item.acked or item.state != VOLATILE:
                continue
            if item.due > now:
                keep.append(item)
                continue
            item.state = WRITING
            batch.items.append(item)
            message = item.message
            if message is not None:
                message.writing += 1
                if message.state == VOLATILE:
                    message.state = WRITING
                    batch.bodies.append(message)
        self._volatile = keep
        return None if batch.empty() else batch

    def _pend_again(self, batch: FlushBatch) -> None:
        """The deletions and marks of an unwritten ``batch`` wait for the next commit, ahead of newer ones
        (``GroupStaging`` adds the groups' marks)."""
        self._pending.deleted_items[:0] = batch.deleted_items
        self._pending.deleted_bodies[:0] = batch.deleted_bodies
        self._pending.delivered[:0] = batch.delivered
        self._pending.dedup[:0] = batch.dedup

    def drop_unwritable(self, part: FlushBatch) -> StagingOutcome:
        """A part of a commit (``FlushBatch.parts``) that failed on its own again and again -- what
        it holds, not the disk: its items leave their queues rather than hold back every later
        commit. A message is forgotten without ``sent`` and without remembering its id (a re-send
        is taken anew); its sender gets ``internal``. The part's deletions and marks stay pending."""
        out = StagingOutcome()
        for message in part.bodies:
            for device in list(message.targets):  # items of it not in this part too
                box = self.boxes.get(device)
                for item in list(box.items.values()) if box is not None else ():
                    if item.message is message and item not in part.items:
                        part.items.append(item)
        for item in part.items:
            item.acked, item.body = True, None
            box = self.boxes.get(item.device)
            if box is not None and box.items.get(item.seq) is item:
                del box.items[item.seq]
                box.inflight.pop(item.seq, None)
        for message in part.bodies:
            message.targets.clear()
            message.writing, message.body = 0, None
            if self.live.get((message.sender, message.msg_id)) is message:
                del self.live[(message.sender, message.msg_id)]
            self._by_mid.pop(message.mid, None)
            out.notices.append((message.origin, ErrorItem(
                ErrorCode.INTERNAL, "the server could not store this message and dropped it; send it again",
                message.msg_id)))
        self._pend_again(part)
        return out

    # --- figures --------------------------------------------------------------------------

    def staged_count(self) -> int:
        return sum(len(box.items) for box in self.boxes.values())

    def figures(self) -> Figures:
        """What is staged now, for the metrics: O(devices with staged items + messages), read at scrape
        time only (every device with items is marked in ``_holding``)."""
        queues = [box.items for device in self._holding if (box := self.boxes.get(device)) is not None and box.items]
        depths = [len(items) for items in queues]
        # A queue's head is its oldest item (seq order), but for items a first device adopted.
        heads = [next(iter(items.values())).expires_ms for items in queues]
        oldest = min(heads) - self.rules.ttl_ms if heads else None
        return Figures(sum(depths), len(self._by_mid), sum(m.size for m in self._by_mid.values()), oldest, depths,
                       len(self.boxes))
