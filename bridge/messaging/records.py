"""The records of the staging core (bridge/messaging/core.py): what it is configured with
(``Rules``), what it keeps (``StagedMessage``, ``Item``, ``DeviceBox``, ``Hold``), and what it
hands to the shell (``StagingOutcome``: what to send; ``FlushBatch``: what to write; ``Figures``).
Shared with the SQLite store (storage/sqlite/messages.py), which writes and reads them back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any

from bridge.messaging.group_receipts import ReceiptWrites
from chatproto import RECEIPT_DELIVERED, RECEIPT_SENT, ErrorItem, GroupItem, MsgItem, ReceiptItem

SEQ_SPAN = 1_000_000_000
"""Seqs are ``boot * SEQ_SPAN + n``: every boot starts above all seqs of earlier boots."""
VOLATILE, WRITING, DURABLE = 0, 1, 2
"""Where a message or item is: in memory only, in a commit under way, on disk."""


@dataclass(frozen=True, slots=True)
class Rules:
    flush_s: float
    ttl_ms: int
    window: int
    redeliver_after_s: float
    max_queue: int
    dedup_window_ms: int
    require_encryption: bool = False


@dataclass(slots=True, eq=False)
class StagedMessage:
    mid: int
    sender: str
    msg_id: str
    recipient: str
    type: str
    body: str | None
    ts: int
    expires_ms: int
    origin: str
    dev: str = ""  # the sending device's id (origin may change on a re-send; the ciphertexts may not)
    olm: bool = False  # the body is per device, on each Item
    targets: set[str] = field(default_factory=set)
    unsettled: int = 0
    writing: int = 0
    state: int = VOLATILE
    delivered: bool = False
    sent_notified: bool = False
    expired_notified: bool = False
    store_failed: bool = False
    size: int = 0  # body bytes (UTF-8), for the metrics
    # A 'delivered' receipt held back until 'sent' (found by tests/chaos): the SDK drops a message from
    # its outbox on 'delivered', so sending it before the message is safe for every target loses it
    # for a device that has not acked yet if the server crashes in between. (ms, time) of the first ack.
    delivered_held: tuple[int, float] | None = None
    # A 'seen' reported before 'sent' went out: staged right after 'sent' and 'delivered' (rule 11).
    seen_held: tuple[int, float] | None = None
    gseq: int | None = None  # a group message (recipient: the group id): its place in the group


@dataclass(slots=True, eq=False)
class Item:
    device: str
    seq: int
    expires_ms: int
    due: float
    message: StagedMessage | None = None
    # A staged receipt as its row keeps it: {"status", "ids", "peer", "ts"} (JSON in the store);
    # the ReceiptItem sent is built from it with the item's seq.
    receipt: dict[str, Any] | None = None
    body: str | None = None  # this device's ciphertext of an olm message (None: not in memory)
    # A staged group event (docs/PROTOCOL.md section 11): the GroupItem's fields but seq, as its row
    # keeps them (JSON in the store); the GroupItem sent is built from it with the item's seq.
    event: dict[str, Any] | None = None
    state: int = VOLATILE
    acked: bool = False
    settled: bool = False


@dataclass(slots=True)
class Hold:
    """A device's messages refused in a row: re-sends are taken only in this order (rule 4)."""

    ids: list[str]
    code: str
    until: float
    full: bool = False  # an id was refused without being remembered (admission.MAX_HELD_IDS)


@dataclass(slots=True)
class DeviceBox:
    # Plain dicts (insertion-ordered, 64 bytes empty), not OrderedDicts (128): one box per device.
    items: dict[int, Item] = field(default_factory=dict)
    online: bool = False
    # Seqs still to send while online; None when there are none (an empty deque is 760 bytes,
    # and most connected devices are idle: bench/results/probe-memory.md).
    unsent: deque[int] | None = None
    inflight: dict[int, float] = field(default_factory=dict)

    def queue(self, seq: int) -> None:
        if self.unsent is None:
            self.unsent = deque()
        self.unsent.append(seq)


@dataclass(slots=True)
class StagingOutcome:
    """What the shell does after a call into the core: items to send (``deliveries``: staged ones,
    sent only to a connected device; ``notices``: not staged), bodies to read back, a commit to wake."""

    deliveries: list[tuple[str, MsgItem | ReceiptItem | GroupItem]] = field(default_factory=list)
    notices: list[tuple[str, ReceiptItem | ErrorItem]] = field(default_factory=list)
    need_bodies: list[int] = field(default_factory=list)
    need_item_bodies: list[tuple[str, int]] = field(default_factory=list)  # olm ciphertexts, by (device, seq)
    staged: list[str] = field(default_factory=list)  # devices a message item was staged for (push: bridge/push/)
    folded: list[ReceiptItem] = field(default_factory=list)  # 'sent' notices a 'delivered' delivery stands for
    flush_due: bool = False

    def fold_sent(self) -> None:
        """Rule 11: ``delivered`` implies ``sent``. A ``sent`` notice whose ids all reach its device in a
        ``delivered`` receipt of this outcome is left out (into ``folded``): that receipt, sent right where
        ``sent`` would have gone, stands for both -- two packets fewer per message that every target acked
        before its flush, the common case. A ``delivered`` that waits (the window, a backlog) folds nothing:
        ``sent`` goes out at once as before."""
        if not self.notices or not self.deliveries:
            return
        covered = {(device, msg_id) for device, item in self.deliveries
                   if isinstance(item, ReceiptItem) and item.status == RECEIPT_DELIVERED for msg_id in item.ids}
        if not covered:
            return
        kept: list[tuple[str, ReceiptItem | ErrorItem]] = []
        for device, notice in self.notices:
            if (isinstance(notice, ReceiptItem) and notice.status == RECEIPT_SENT
                    and all((device, msg_id) in covered for msg_id in notice.ids)):
                self.folded.append(notice)
            else:
                kept.append((device, notice))
        self.notices = kept


@dataclass(slots=True)
class FlushBatch:
    bodies: list[StagedMessage] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    deleted_items: list[tuple[str, int]] = field(default_factory=list)
    deleted_bodies: list[int] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    dedup: list[tuple[str, str, int]] = field(default_factory=list)
    # group id -> the highest gseq staged (an event or a message): written with the items, so that
    # a restart knows which logged group events are staged already and where each group's gseq is.
    gseqs: dict[str, int] = field(default_factory=dict)
    receipts: ReceiptWrites = field(default_factory=ReceiptWrites)  # of group messages (group_receipts.py)

    def empty(self) -> bool:
        return not (self.bodies or self.items or self.deleted_items or self.deleted_bodies
                    or self.delivered or self.dedup or self.gseqs or not self.receipts.empty())

    def parts(self) -> list[FlushBatch]:
        """The batch cut into writes that can fail alone: each new message with its items, each
        other new item (a receipt) alone, and last the rest -- deletions, marks, and items of
        messages already on disk (an adopted item goes with the deletion of the row it replaces).
        Written in this order, a part that fails can leave a duplicate row, never lose one."""
        own: dict[StagedMessage, FlushBatch] = {message: FlushBatch(bodies=[message]) for message in self.bodies}
        singles: list[FlushBatch] = []
        rest = FlushBatch(deleted_items=self.deleted_items, deleted_bodies=self.deleted_bodies,
                          delivered=self.delivered, dedup=self.dedup, gseqs=self.gseqs, receipts=self.receipts)
        for item in self.items:
            part = own.get(item.message) if item.message is not None else None
            if part is not None:
                part.items.append(item)
            elif item.message is None:
                singles.append(FlushBatch(items=[item]))
            else:
                rest.items.append(item)
        return [*own.values(), *singles, *([] if rest.empty() else [rest])]


@dataclass(frozen=True, slots=True)
class Figures:
    items: int
    messages: int
    body_bytes: int
    oldest_ms: int | None
    """Server time (ms) at which the oldest queued item was staged; None when nothing is staged."""
    depths: list[int]
    """Items queued per device that has any (read from the devices marked busy, not from every box: a
    scrape costs what is queued, not what is connected)."""
    devices: int
    """Devices with a queue or online: those not in ``depths`` have nothing queued."""


def event_row(event: GroupItem) -> dict[str, Any]:
    """A group event as its item keeps it (JSON in the store): the GroupItem's fields but ``seq``."""
    return {f.name: list(v) if isinstance(v := getattr(event, f.name), tuple) else v
            for f in fields(GroupItem) if f.name != "seq"}


def event_item(seq: int, row: dict[str, Any]) -> GroupItem:
    """The GroupItem a device gets for a staged event ``row`` (``event_row``) under its ``seq``."""
    values: dict[str, Any] = {key: tuple(v) if isinstance(v, list) else v for key, v in row.items()}
    return GroupItem(seq, **values)


def wire_item(item: Item) -> MsgItem | ReceiptItem | GroupItem:
    """What a device gets for a staged ``item``, under the item's seq."""
    message = item.message
    if message is not None:
        body = item.body if message.olm else message.body
        return MsgItem(item.seq, message.msg_id, message.sender, message.recipient, message.type,
                       body or "", message.ts, message.dev, message.gseq)
    if item.event is not None:
        return event_item(item.seq, item.event)
    receipt = item.receipt or {}
    return ReceiptItem(receipt["status"], tuple(receipt["ids"]), receipt["peer"], receipt["ts"], item.seq)
