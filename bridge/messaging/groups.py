"""The staging core with groups (rule 11 of bridge/messaging/core.py; docs/PROTOCOL.md section 11).
Pure, like ``Staging``: the caller (bridge/groups/service.py through bridge/messaging/service.py)
passes the members and the time, and holds changes of the group off while it calls in.

Rules:
1. A group message from a member takes the group's next gseq and is staged once, with an item for
   every member device but the sending one (the sender's other devices get the history copy).
   A device whose queue is full is skipped (the others get it); a non-member is refused
   ``forbidden``. It costs the sender one send token, whatever the group's size.
2. With ``require_encryption``, a group message must have type ``megolm``.
3. A group event is staged for every device of the users it names, in the order given. The
   change that makes events costs its actor one send token too (``charge``): a rename loop would
   otherwise fill every member's queue for free.
4. Each group's highest staged gseq is written with the next commit (``FlushBatch.gseqs``);
   ``written_gseqs`` are those the commits of this boot wrote.
5. Group items are due at once and go to a device only once written (``written_first``).
6. Group receipts (bridge/messaging/group_receipts.py): a group message is tracked per member; when
   it completes ``delivered`` or ``seen``, that receipt is staged for every device of the sender with
   the group as ``peer``, through the one-to-one machinery (``_mark_delivered``, ``_mark_seen``): after
   ``sent``, ``delivered`` before ``seen``. A group seen report costs a send token, as a one-to-one one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bridge.directory import Directory
from bridge.keys.core import KeyedDevices
from bridge.limits import RateLimiter, RecentIds
from bridge.messaging.admission import Refused
from bridge.messaging.core import Staging, written_first
from bridge.messaging.group_receipts import Completed, GroupReceipts, TrackedRow
from bridge.messaging.records import FlushBatch, Item, Rules, StagingOutcome, event_row
from chatproto import (
    MEGOLM_TYPE,
    RECEIPT_DELIVERED,
    RECEIPT_SEEN,
    ChatMessage,
    ErrorCode,
    ErrorItem,
    GroupItem,
)


class GroupStaging(Staging):
    def __init__(self, rules: Rules, boot: int, directory: Directory, rate: RateLimiter, recent: RecentIds,
                 keyed: KeyedDevices | None = None, receipts: GroupReceipts | None = None) -> None:
        super().__init__(rules, boot, directory, rate, recent, keyed)
        self.receipts = receipts if receipts is not None else GroupReceipts()
        self.gseqs: dict[str, int] = {}  # group id -> the highest gseq staged (restored from the store)
        self.written_gseqs: dict[str, int] = {}  # ... and as written by this boot's commits

    def submit_group(self, origin: str, sender: str, message: ChatMessage, members: Sequence[str] | None,
                     now_ms: int, now: float) -> StagingOutcome:
        """A message of ``sender`` to the group ``message.to``, whose members are ``members`` now (None:
        ``sender`` is not one). The caller keeps changes of the group off until this returns."""
        out = StagingOutcome()
        if self._repeat(origin, sender, message, now_ms, out):
            return out
        try:
            if members is None:
                raise Refused(ErrorItem(ErrorCode.FORBIDDEN, "you are not a member of this group", message.id))
            self._holds.check(origin, message.id, now)
            if self.rules.require_encryption and message.type != MEGOLM_TYPE:
                raise Refused(ErrorItem(ErrorCode.ENCRYPTION_REQUIRED, "this server accepts only end-to-end "
                                        f"encrypted group messages (type {MEGOLM_TYPE!r})", message.id))
            if not self._rate.allow(sender, now):
                self._holds.hold(origin, message.id, ErrorCode.RATE_LIMITED, now)
                raise Refused(ErrorItem(ErrorCode.RATE_LIMITED, "sending too fast; retry later", message.id))
        except Refused as refused:
            out.notices.append((origin, refused.item))
            return out
        gseq = self.gseqs.get(message.to, 0) + 1
        self._mark_gseq(message.to, gseq)
        targets = []
        for device in (d for member in members for d in self.directory.targets(member) if d != origin):
            if self._queued(device) < self.rules.max_queue:
                targets.append(device)
            else:  # a member's full queue must not cost the others their message: that device misses it
                self.counters.group_skipped += 1
        self._fan_out(origin, sender, message, targets, now_ms, now, out, gseq)
        reached = {device.partition(".")[0] for device in targets}  # rule 6: the members it waits for
        self.receipts.track(self._next_mid, sender, message.id, message.to, len(members),  # _fan_out's mid
                            [m for m in members if m in reached and m != sender], now_ms + self.rules.ttl_ms,
                            self._pending.receipts)
        return out

    def ack(self, device: str, seqs: Iterable[int], now_ms: int, now: float) -> StagingOutcome:
        """As ``Staging.ack``; a group message acked by a member's device counts for its receipts (rule 6)."""
        seqs, box = list(seqs), self.boxes.get(device)
        mids = [] if box is None else [item.message.mid for seq in seqs if (item := box.items.get(seq)) is not None
                                       and item.message is not None and item.message.gseq is not None]
        out = super().ack(device, seqs, now_ms, now)
        if mids:  # a group message among them (one-to-one ones: nothing more to do)
            member = device.partition(".")[0]
            writes = self._pending.receipts
            self._report([step for mid in mids if (step := self.receipts.delivered(mid, member, now_ms, writes))],
                         now_ms, now, out)
        return out

    def seen_group(self, by_user: str, group: str, ids: Iterable[str], origin: str, now_ms: int,
                   now: float) -> StagingOutcome:
        """``by_user`` displayed ``ids`` of ``group`` (rule 6). Ids that no tracked message of the group
        waits for are ignored (not its own, complete, expired, seen not tracked)."""
        out = StagingOutcome()
        if not self._rate.allow(by_user, now):
            out.notices.append((origin, ErrorItem(ErrorCode.RATE_LIMITED, "sending too fast; retry later")))
            return out
        self._report(self.receipts.seen(group, by_user, ids, now_ms, self._pending.receipts), now_ms, now, out)
        return out

    def _report(self, steps: list[Completed], now_ms: int, now: float, out: StagingOutcome) -> None:
        """Stage what ``steps`` completed: one receipt per sender, group and status, ``delivered`` first."""
        ready: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
        for step in steps:
            tracking = step.tracking
            delivered, seen = ready.setdefault((tracking.sender, tracking.group), ([], []))
            message = self._by_mid.get(tracking.mid)
            if message is None:  # forgotten: every item acked, so 'sent' went out long ago
                delivered.extend([tracking.msg_id] if step.delivered else [])
                seen.extend([tracking.msg_id] if step.seen else [])
            elif step.seen:
                self._mark_seen(message, now_ms, now, delivered, seen)
            else:
                self._mark_delivered(message, now_ms, now, delivered)
        for status, n in ((RECEIPT_DELIVERED, 0), (RECEIPT_SEEN, 1)):
            for (sender, group), lists in ready.items():
                if lists[n]:
                    self._stage_receipt(sender, status, lists[n], group, now_ms, now, out)

    def restore_receipts(self, rows: Iterable[TrackedRow], now_ms: int) -> None:
        """Load the tracked group messages the store holds (after ``restore``); expired ones are forgotten."""
        self.receipts.restore(rows)
        self.receipts.expire(now_ms, self._pending.receipts)

    def drop_unwritable(self, part: FlushBatch) -> StagingOutcome:
        out = super().drop_unwritable(part)
        for message in part.bodies:  # forgotten without 'sent': no receipts either
            self.receipts.drop(message.mid, self._pending.receipts)
        return out

    def expire(self, now_ms: int, now: float) -> StagingOutcome:
        out = super().expire(now_ms, now)
        self.receipts.expire(now_ms, self._pending.receipts)
        return out

    def charge(self, user: str, now: float) -> bool:
        """Take one of ``user``'s send tokens for a group change; False (nothing taken) if there is none."""
        return self._rate.allow(user, now)

    def stage_group_events(self, events: Sequence[GroupItem], users: Iterable[str], now_ms: int,
                           now: float) -> StagingOutcome:
        """Each of ``events`` (one group's, in gseq order) for every device of ``users``."""
        out = StagingOutcome()
        devices = [device for user in users for device in self.directory.targets(user)]
        for event in events:
            row = event_row(event)
            for device in devices:
                self._stage(device, Item(device, 0, now_ms + self.rules.ttl_ms, now, event=row), now, out)
            self._mark_gseq(event.group, event.gseq)
        out.flush_due = True
        return out

    def _pend_again(self, batch: FlushBatch) -> None:
        super()._pend_again(batch)
        for group, gseq in batch.gseqs.items():
            self._mark_gseq(group, gseq)
        self._pending.receipts.put_back(batch.receipts)

    def _mark_gseq(self, group: str, gseq: int) -> None:
        self.gseqs[group] = max(gseq, self.gseqs.get(group, 0))
        self._pending.gseqs[group] = max(gseq, self._pending.gseqs.get(group, 0))

    def flush_done(self, batch: FlushBatch, now: float | None = None) -> StagingOutcome:
        """``batch`` is written; with ``now``, the devices waiting for a group item of it get it."""
        out = super().flush_done(batch)
        for group, gseq in batch.gseqs.items():
            self.written_gseqs[group] = max(gseq, self.written_gseqs.get(group, 0))
        if now is not None:  # rule 5: what waited for this write goes out now
            for device in {item.device for item in batch.items if written_first(item)}:
                box = self.boxes.get(device)
                if box is not None:
                    self._pump(device, box, now, out)
        return out
