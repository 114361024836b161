"""The shared store of cluster mode: every device's staging queue, held in a Redis Cluster so that
any broker node can stage for any device and the node a device is connected to delivers it.

``ClusterMessaging`` (bridge/cluster/messaging.py) is typed against ``QueueStore``;
``storage/redis/queues.py`` implements it. Each call touches the keys of one user (one hash slot),
so each is one atomic Lua script: nothing is half-staged, half-acked or half-adopted. A failing
backend raises ``bridge.store.StoreError`` (after riding out a master failover).

The model (docs/ARCHITECTURE.md, "Cluster mode"):
- each device (client id ``user.device``; ``user.*`` is the placeholder of a user with no device
  yet) has a queue of items in ``seq`` order; seqs come from a counter per device that never goes
  back, so a device never sees a seq twice whichever node staged it;
- a plain message's body is kept once per recipient user, with a count of the items referring to
  it; an olm message's ciphertext is kept on each device's item;
- a message staged with ``delivery=True`` keeps a delivery record (sender, id, delivered yet,
  expired notified yet) until its last item is gone: the first ack by any of the user's devices
  reports it once (``ack``), as does ``mark_delivered`` (a ``seen`` before any ack);
- a dedup mark ``(sender, id)`` kept ``dedup_until_ms`` makes a repeat answer ``DUPLICATE``; a
  recipient user keeps at most ``max_dedup`` marks (oldest forgotten first), so a flood costs the
  flooded user's memory a bounded amount;
- seqs of a device are at least ``SEQ_STRIDE`` apart: the gaps are the seqs a node gives the items
  it delivers before (or without) writing them (write-back, bridge/cluster/writeback.py).
Every script is safe to run twice (a reply lost in a failover is retried by the client): a second
stage of the same dedup key is a ``DUPLICATE``, a second ack or removal finds nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from bridge.cluster.group_store import GroupAck, GroupExpiry, GroupFan, LogEntry
from chatproto import GroupItem, MsgItem, ReceiptItem

SEQ_STRIDE = 1024
"""Every seq the store gives a device is at least this much above the one before (and above the
base ``seq_block`` returned): the seqs between are a node's for items it delivers itself."""


@dataclass(frozen=True, slots=True)
class MessageEntry:
    """A message as it is staged: ``body`` for every target (plain), or ``bodies`` (olm: client id ->
    that device's ciphertext; a target without one is skipped)."""

    sender: str
    msg_id: str
    recipient: str
    type: str
    ts: int
    dev: str  # the sending device's id (MsgItem.dev)
    body: str | None = None
    bodies: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Stage:
    """Items for devices of one ``user``, staged atomically in that user's slot.

    ``devices``: client ids to stage for (each must be a current device of ``user``; others are
    skipped), or None: every current device of the user at staging time, or the user's placeholder
    ``user.*`` if the user has none. Exactly one of ``message`` and ``receipt`` is set; the store
    gives each copy its device's next seq. Refused whole (``QUEUE_FULL``, nothing staged) if any
    target queue already holds ``max_queue`` items."""

    user: str
    expires_ms: int
    max_queue: int
    devices: tuple[str, ...] | None = None
    message: MessageEntry | None = None
    receipt: ReceiptItem | None = None
    dedup_until_ms: int = 0  # > 0: remember (sender, msg_id) of the message until then
    delivery: bool = False  # keep a delivery record (a message to its recipient)
    writeback: bool = False  # the write-back of a message ``reserve`` admitted: its pending mark is no duplicate
    # The same token on a retry of this stage answers the first run's reply (within the store's
    # replay time) instead of staging again: a receipt (no dedup mark) retried after a failed WAIT
    # was staged twice. "": a fresh one.
    token: str = ""


class StageStatus(StrEnum):
    STAGED = "staged"
    DUPLICATE = "duplicate"  # the dedup mark was there: nothing staged (the first one was)
    QUEUE_FULL = "queue_full"
    PENDING = "pending"  # another node delivers this message itself and has not written it yet: retry later
    CHANGED = "changed"  # reserve: ``devices`` are not the user's devices now; stage it instead


@dataclass(frozen=True, slots=True)
class StageResult:
    status: StageStatus
    targets: tuple[tuple[str, int], ...] = ()  # (client id, seq) of each item staged


@dataclass(frozen=True, slots=True)
class Reservation:
    status: StageStatus
    tails: Mapping[str, int] = field(default_factory=dict)  # STAGED: target client id -> its highest queued seq


@dataclass(frozen=True, slots=True)
class QueuedItem:
    """One staged item as its device gets it (``item.seq`` is its seq)."""

    item: MsgItem | ReceiptItem | GroupItem
    expires_ms: int

    @property
    def seq(self) -> int:
        if self.item.seq is None:
            raise ValueError("a queued item always has its seq")
        return self.item.seq


@dataclass(frozen=True, slots=True)
class MessageRef:
    """A message named by its sender and id, and its recipient (for receipts)."""

    sender: str
    msg_id: str
    recipient: str


@dataclass(slots=True)
class Swept:
    expired: list[MessageRef] = field(default_factory=list)  # messages whose sender gets 'expired' (once each)
    items: int = 0  # items dropped
    groups: list[GroupExpiry] = field(default_factory=list)  # group message items (their receipts: the group's)


class QueueStore(Protocol):
    async def stage(self, stage: Stage) -> StageResult:
        """Stage the items; ``PENDING`` while a reservation of the message holds (unless
        ``stage.writeback``: that is its own write-back, which replaces the pending mark)."""

    async def reserve(self, stage: Stage, hold_ms: int, *, whole_user: bool) -> Reservation:
        """Admit a message its node delivers itself first (write-back), writing no item: answers
        ``DUPLICATE``, ``PENDING`` or ``QUEUE_FULL`` as ``stage`` would, ``CHANGED`` if
        ``whole_user`` and ``stage.devices`` are not exactly the user's current devices; else sets a
        pending mark of (sender, id) kept ``hold_ms`` (a repeat meanwhile answers ``PENDING``) and
        answers ``STAGED`` with each target's tail (see ``tails``). The node then stages it
        (``writeback=True``) or settles it."""

    async def tails(self, user: str, client_ids: list[str]) -> dict[str, int]:
        """The highest seq queued for each of these devices of ``user`` (0: none). A node hands a
        device a held item only once it has read up to its tail: an item staged before (an earlier
        message of the same sender, through Redis) must not arrive after a later one."""

    async def settle(self, stage: Stage) -> None:
        """A reserved message every target acked before it was written: its pending mark becomes the
        dedup mark (until ``stage.dedup_until_ms``), written like a stage (replicas acknowledge)."""

    async def seq_block(self, client_id: str) -> int:
        """Reserve ``SEQ_STRIDE`` seqs of the device: returns ``base``; every seq the store gave it
        before is below ``base`` and every later one is at least ``base + SEQ_STRIDE``."""

    async def read(self, client_id: str, after_seq: int, limit: int) -> list[QueuedItem]:
        """Up to ``limit`` items of the device's queue with seq > ``after_seq``, in seq order."""

    async def ack(self, client_id: str, seqs: list[int]) -> list[MessageRef | GroupAck]:
        """Remove the items; returns the messages this ack delivers for the first time (items staged
        with ``delivery``, acked by a device of their recipient), and a ``GroupAck`` per group message
        item removed (by a device, not the placeholder; each ack: the group's tracking keeps the first).
        Unknown seqs are ignored."""

    async def mark_delivered(self, recipient: str, sender: str, msg_ids: list[str]) -> list[str]:
        """``recipient`` has seen these messages of ``sender``: those still recorded and not delivered
        yet are marked so (an ack will not report them) and returned, in the order given."""

    async def remove_device(self, client_id: str) -> int:
        """Drop the device's queue (``devices.remove``); returns the items dropped. Its seq counter
        stays: a device id installed again keeps counting up, never repeating a seq."""

    async def adopt_placeholder(self, user: str, client_id: str) -> int:
        """Move the items of ``user.*`` to ``client_id`` (the user's first device), in order, with
        new seqs of that device; returns how many moved."""

    async def expire(self, client_id: str, now_ms: int) -> Swept:
        """Drop the device's items with ``expires_ms <= now_ms``."""

    async def due(self, now_ms: int, limit: int) -> list[str]:
        """Client ids whose queue may hold an item expired by ``now_ms`` (from an index sharded over
        the cluster, so no node scans every queue); ``expire`` clears them from it."""

    async def depth(self, client_id: str) -> int: ...

    async def stage_group(self, user: str, entries: list[LogEntry], max_queue: int) -> GroupFan:
        """Stage each of ``entries`` (one group's log, in gseq order) for every device of ``user`` (but a
        message's sending device; the placeholder if the user has none), skipping a device whose queue
        holds ``max_queue`` items, and only entries above the gseq this user was staged up to in that
        group: run again (a fanner that died, two fanners), it stages nothing twice and never an
        entry below one staged. A message's items refer to its body in the group's slot."""

    async def allow(self, user: str, bucket: str, rate_per_s: float, burst: int, now_ms: int) -> bool:
        """Take one token of ``user``'s bucket ``bucket`` (shared by every node): False if empty."""

    async def refund(self, user: str, bucket: str, rate_per_s: float, burst: int, now_ms: int) -> None:
        """Give one token back (at most ``burst``): what ``allow`` took for an uplink refused after it."""

    async def close(self) -> None: ...
