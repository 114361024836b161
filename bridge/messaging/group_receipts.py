"""Receipts of group messages (docs/PROTOCOL.md section 11, "Receipts"): per member ``delivered`` and
``seen``, kept only until complete and coalesced for the sender. Pure: the caller
(``GroupStaging``, bridge/messaging/groups.py) passes the time and a ``ReceiptWrites`` to record
what the next commit must write; it stages the receipts themselves with the one-to-one machinery.

Rules:
1. A group message is tracked from its staging, by its ``mid``. It waits for its *target members*:
   the users with a device among its targets, but the sender (a member whose every device was
   skipped for a full queue is not waited for). None: not tracked. ``seen`` is tracked too if the
   group had at most ``seen_max`` members (the sender counted) when it was sent; 0: never.
2. A member has the message (``delivered``) at the first ack by any of its devices, as for one
   user in one-to-one; a member saw it at the first seen report naming it, which implies
   ``delivered``. Ids of a seen report match every tracked message of that group with that id
   that waits for the reporter (ids are unique per sender; two senders' equal ids both match).
3. The step that makes the last member have it completes ``delivered`` (the sender's devices get
   ``delivered`` once, "delivered to all"); the step that makes the last one see it completes
   ``seen`` ("seen by all"), never before ``delivered``.
4. Complete -- every member has it and, if tracked, saw it -- or past the message's expiry: the
   message is forgotten, in memory and (``ReceiptWrites.done``) on disk.
5. A sender has at most ``max_per_sender`` tracked messages: a new one forgets the sender's
   oldest, which then never completes. Memory per sender is bounded by that times the group size.
"""

from __future__ import annotations

import bisect
import weakref
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final


class Roster:
    """The members a message waits for, sorted by name: shared by the tracked messages with the same
    members (a sender's messages to one group, until it changes). Sorted, not indexed by a dict: 8
    bytes a member, and a bisection finds a member among 1,024 in 10 steps."""

    __slots__ = ("__weakref__", "users")

    def __init__(self, users: tuple[str, ...]) -> None:
        self.users = users

    def place(self, user: str) -> int | None:
        n = bisect.bisect_left(self.users, user)
        return n if n < len(self.users) and self.users[n] == user else None


@dataclass(slots=True, eq=False)
class Tracking:
    """One tracked group message; times are server ms, 0 while a member has not."""

    mid: int
    sender: str
    msg_id: str
    group: str
    expires_ms: int
    roster: Roster
    delivered: array[int]
    seen: array[int] | None  # None: seen is not tracked for this message (rule 1)
    missing_delivered: int
    missing_seen: int

    def complete(self) -> bool:
        return self.missing_delivered == 0 and (self.seen is None or self.missing_seen == 0)


@dataclass(frozen=True, slots=True)
class TrackedRow:
    """A tracked message as its store row keeps it: ``members`` sorted, ``marks`` maps members to
    (delivered ms, seen ms), 0: not."""

    mid: int
    sender: str
    msg_id: str
    group: str
    expires_ms: int
    members: tuple[str, ...]
    seen_tracked: bool
    marks: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(slots=True)
class ReceiptWrites:
    """What the next commit writes (``FlushBatch.receipts``): new tracked messages, member marks
    (mid, member, delivered ms, seen ms; 0 leaves a time as it is), forgotten mids. Written in this
    order, in the commit's transaction."""

    new: list[TrackedRow] = field(default_factory=list)
    marks: list[tuple[int, str, int, int]] = field(default_factory=list)
    done: list[int] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.new or self.marks or self.done)

    def put_back(self, older: ReceiptWrites) -> None:
        """``older`` (of a failed commit) is written with these, first: marks only fill times in,
        and a message forgotten since is in ``done``, which is written last."""
        self.new[:0] = older.new
        self.marks[:0] = older.marks
        self.done[:0] = older.done


@dataclass(frozen=True, slots=True)
class Completed:
    """A step that completed ``delivered`` and/or ``seen`` of ``tracking`` (rule 3)."""

    tracking: Tracking
    delivered: bool
    seen: bool


DEFAULT_SEEN_MAX: Final = 256
"""Seen is tracked for groups of at most this many members (``groups.seen_receipts``)."""
DEFAULT_MAX_PER_SENDER: Final = 1000
"""Tracked messages per sender (``groups.max_tracked_per_user``)."""


class GroupReceipts:
    def __init__(self, seen_max: int = DEFAULT_SEEN_MAX, max_per_sender: int = DEFAULT_MAX_PER_SENDER) -> None:
        self.seen_max = seen_max
        self.max_per_sender = max_per_sender
        self._by_mid: dict[int, Tracking] = {}  # in creation order: expiries ascend (one TTL)
        self._by_sender: dict[str, dict[int, Tracking]] = {}  # each in creation order (rule 5)
        self._by_id: dict[tuple[str, str], list[Tracking]] = {}  # (group, msg_id): what a seen report names
        self._rosters: weakref.WeakValueDictionary[tuple[str, ...], Roster] = weakref.WeakValueDictionary()

    def __len__(self) -> int:
        return len(self._by_mid)

    # --- tracking --------------------------------------------------------------------------

    def track(self, mid: int, sender: str, msg_id: str, group: str, group_size: int, members: Sequence[str],
              expires_ms: int, writes: ReceiptWrites) -> None:
        """A group message staged for ``members`` (rule 1: its target members) in a group of ``group_size``."""
        if not members:
            return
        row = TrackedRow(mid, sender, msg_id, group, expires_ms, tuple(sorted(members)),
                         self.seen_max > 0 and group_size <= self.seen_max)
        self._add(row)
        writes.new.append(row)
        mine = self._by_sender[sender]
        while len(mine) > self.max_per_sender:
            self._forget(next(iter(mine.values())), writes)

    def restore(self, rows: Iterable[TrackedRow]) -> None:
        """What the store held (``GroupReceiptStore.group_receipts``), in creation order."""
        for row in rows:
            self._add(row)

    def _add(self, row: TrackedRow) -> None:
        roster = self._rosters.get(row.members)
        if roster is None:
            roster = self._rosters[row.members] = Roster(row.members)
        size = len(row.members)
        delivered = array("q", (row.marks.get(u, (0, 0))[0] for u in row.members))
        seen = array("q", (row.marks.get(u, (0, 0))[1] for u in row.members)) if row.seen_tracked else None
        tracking = Tracking(row.mid, row.sender, row.msg_id, row.group, row.expires_ms, roster, delivered, seen,
                            size - sum(1 for t in delivered if t), size - sum(1 for t in seen or () if t))
        self._by_mid[row.mid] = tracking
        self._by_sender.setdefault(row.sender, {})[row.mid] = tracking
        self._by_id.setdefault((row.group, row.msg_id), []).append(tracking)

    # --- steps ---------------------------------------------------------------------------------

    def delivered(self, mid: int, member: str, now_ms: int, writes: ReceiptWrites) -> Completed | None:
        """A device of ``member`` acked the message ``mid``; what that completed, if anything."""
        tracking = self._by_mid.get(mid)
        place = tracking.roster.place(member) if tracking is not None else None
        if tracking is None or place is None or tracking.delivered[place]:
            return None
        tracking.delivered[place] = now_ms
        tracking.missing_delivered -= 1
        writes.marks.append((mid, member, now_ms, 0))
        return self._step(tracking, tracking.missing_delivered == 0, False, writes)

    def seen(self, group: str, member: str, ids: Iterable[str], now_ms: int,
             writes: ReceiptWrites) -> list[Completed]:
        """``member`` reported ``ids`` of ``group`` seen; what that completed (rule 2)."""
        completed = []
        for msg_id in dict.fromkeys(ids):
            for tracking in list(self._by_id.get((group, msg_id), ())):
                place = tracking.roster.place(member)
                if place is None or tracking.seen is None or tracking.seen[place]:
                    continue
                was_delivered = tracking.missing_delivered == 0
                if not tracking.delivered[place]:
                    tracking.delivered[place] = now_ms
                    tracking.missing_delivered -= 1
                tracking.seen[place] = now_ms
                tracking.missing_seen -= 1
                writes.marks.append((tracking.mid, member, tracking.delivered[place], now_ms))
                step = self._step(tracking, not was_delivered and tracking.missing_delivered == 0,
                                  tracking.missing_seen == 0, writes)
                if step is not None:
                    completed.append(step)
        return completed

    def _step(self, tracking: Tracking, delivered: bool, seen: bool, writes: ReceiptWrites) -> Completed | None:
        if tracking.complete():
            self._forget(tracking, writes)
        return Completed(tracking, delivered, seen) if delivered or seen else None

    def drop(self, mid: int, writes: ReceiptWrites) -> None:
        """Forget the message ``mid`` if tracked: it was dropped unwritten (its re-send is a new one)."""
        tracking = self._by_mid.get(mid)
        if tracking is not None:
            self._forget(tracking, writes)

    def expire(self, now_ms: int, writes: ReceiptWrites) -> None:
        """Forget the messages past their expiry (rule 4). Creation order is expiry order, but for a
        TTL changed across a restart: those wait for the ones ahead of them (a sweep or so)."""
        while self._by_mid:
            tracking = next(iter(self._by_mid.values()))
            if tracking.expires_ms > now_ms:
                break
            self._forget(tracking, writes)

    def _forget(self, tracking: Tracking, writes: ReceiptWrites) -> None:
        del self._by_mid[tracking.mid]
        mine = self._by_sender[tracking.sender]
        del mine[tracking.mid]
        if not mine:
            del self._by_sender[tracking.sender]
        same = self._by_id[(tracking.group, tracking.msg_id)]
        same.remove(tracking)
        if not same:
            del self._by_id[(tracking.group, tracking.msg_id)]
        writes.done.append(tracking.mid)

    # --- group.receipts --------------------------------------------------------------------------

    def find(self, group: str, msg_id: str) -> list[Tracking]:
        """The tracked messages of ``group`` with id ``msg_id`` (any sender), oldest first."""
        return list(self._by_id.get((group, msg_id), ()))


def detail(tracking: Tracking) -> dict[str, Any]:
    """The ``group.receipts`` result for a tracked message: per member (by name) when it had the
    message and when it saw it (ms; null: not yet, or seen not tracked)."""
    seen = tracking.seen
    members = {user: {"delivered": tracking.delivered[n] or None, "seen": seen[n] or None if seen else None}
               for n, user in enumerate(tracking.roster.users)}
    return {"group": tracking.group, "id": tracking.msg_id, "tracked": True, "seen_tracked": seen is not None,
            "members": members}
