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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bridge.directory import Directory
from bridge.keys.core import KeyedDevices
from bridge.limits import RateLimiter, RecentIds
from bridge.messaging.admission import Refused
from bridge.messaging.core import Staging, written_first
from bridge.messaging.records import FlushBatch, Item, Rules, StagingOutcome, event_row
from chatproto import MEGOLM_TYPE, ChatMessage, ErrorCode, ErrorItem, GroupItem


class GroupStaging(Staging):
    def __init__(self, rules: Rules, boot: int, directory: Directory, rate: RateLimiter, recent: RecentIds,
                 keyed: KeyedDevices | None = None) -> None:
        super().__init__(rules, boot, directory, rate, recent, keyed)
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
            if len(self._box(device).items) < self.rules.max_queue:
                targets.append(device)
            else:  # a member's full queue must not cost the others their message: that device misses it
                self.counters.group_skipped += 1
        self._fan_out(origin, sender, message, targets, now_ms, now, out, gseq)
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
