"""The staging core: messages and receipts waiting for devices. Pure: no I/O,
the caller passes the time; every method returns a ``StagingOutcome`` saying what to
send, and ``take_flush`` / ``flush_done`` say what to write. Its state and the bookkeeping no
rule decides are ``StagingState`` (bridge/messaging/state.py), its base class.

Rules (PROTOCOL.md "Delivery rules"):
1. An accepted message gets one item per target device, each with that
   device's next ``seq``. Items start in memory only (volatile).
2. An item still unacked ``flush_ms`` after it was staged is written to disk
   with everything else that is due (one transaction: group commit).
3. ``receipt sent`` goes to the publishing device once every item of the
   message is written or acked (it then survives a crash); a ``delivered``
   receipt that reaches that device in the same outcome stands for it instead
   (``StagingOutcome.fold_sent``). A repeat of a known (from, id) is not staged again; it is
   answered ``sent`` once settled.
4. The first ack of a message by a device of the recipient stages a
   ``receipt delivered`` for each device of the sender.
5. When every target device acked, the message is forgotten: memory now, and
   its rows in the next commit (the store then truncates its WAL).
6. A device receives its items in ``seq`` order, at most ``window`` unacked at
   a time; an item unacked for ``redeliver_after`` while connected is sent again.
7. Items older than the TTL are dropped; the sender of an expired message gets
   ``receipt expired``.
8. An olm message (``bodies``) must carry exactly one ciphertext for each device
   in the required devices (bridge/messaging/admission.py): the recipient's devices with published keys and the
   sender's other such devices (history sync). Each of them gets an item with
   only its own ciphertext, kept on that item (memory and disk) and gone with
   it when that device acks. Only a device of the recipient triggers
   ``delivered``. A mismatch (a device missing, extra, or -- when the message
   states ``keys`` -- encrypted to an identity key the device has since
   replaced: ``stale``) is refused and holds the device's later messages like
   ``queue_full``; a recipient without keys gets ``no_keys``.
9. A seen report costs a send token like a message and is refused when a
   target queue is full. A waiting ``seen`` receipt at the tail of a device's
   queue, same peer, is replaced by one with the ids merged (at most 1000).
10. Per message, the sender's devices get ``sent``, ``delivered``, ``seen`` in
   that order: ``delivered`` and ``seen`` wait on the message for ``sent``, and a
   ``seen`` before any ack stages ``delivered`` first (once).
11. Group items (``GroupStaging``, bridge/messaging/groups.py) are written at once
   and sent only once written (no write-back): a gseq a device has seen is never
   given to another message after a crash.
Seqs are ``boot * SEQ_SPAN + n``: every boot starts above all seqs of earlier
boots, so seqs increase across restarts without a disk write per seq.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable

from bridge.directory import is_placeholder, placeholder
from bridge.messaging.admission import Refused, olm_targets
from bridge.messaging.records import (
    DURABLE,
    VOLATILE,
    DeviceBox,
    FlushBatch,
    Item,
    StagedMessage,
    StagingOutcome,
    wire_item,
)
from bridge.messaging.state import StagingState
from chatproto import (
    MAX_IDS_PER_ITEM,
    RECEIPT_DELIVERED,
    RECEIPT_EXPIRED,
    RECEIPT_SEEN,
    RECEIPT_SENT,
    ChatMessage,
    ErrorCode,
    ErrorItem,
    ReceiptItem,
)

BODY_PREFETCH = 256  # bodies read back per store query when a device drains a backlog


class Staging(StagingState):
    # --- messages ------------------------------------------------------------------

    def submit(self, origin: str, sender: str, message: ChatMessage, now_ms: int, now: float) -> StagingOutcome:
        """A chat message published by ``origin`` (client id) of ``sender``."""
        out = StagingOutcome()
        if self._repeat(origin, sender, message, now_ms, out):
            return out
        try:
            targets = self._admit(origin, sender, message, now)
        except Refused as refused:
            out.notices.append((origin, refused.item))
            return out
        self._fan_out(origin, sender, message, targets, now_ms, now, out)
        return out

    def _repeat(self, origin: str, sender: str, message: ChatMessage, now_ms: int, out: StagingOutcome) -> bool:
        """True if ``message`` is a repeat of a known (from, id) (rule 3): answered, not staged again."""
        key = (sender, message.id)
        known = self.live.get(key)
        if known is not None:
            known.origin = origin
            if known.sent_notified:
                out.notices.append((origin, self._sent_item(known, now_ms)))
            return True  # not settled yet: 'sent' goes to the new origin when it is
        if self._recent.contains(key, now_ms):
            out.notices.append((origin, ReceiptItem(RECEIPT_SENT, (message.id,), message.to, now_ms)))
            return True
        return False

    def _fan_out(self, origin: str, sender: str, message: ChatMessage, targets: list[str], now_ms: int, now: float,
                 out: StagingOutcome, gseq: int | None = None) -> None:
        """Stage an accepted message: its body once, an item per target device."""
        self._next_mid += 1
        bodies = message.bodies
        size = sum(map(_utf8_len, bodies.values())) if bodies is not None else _utf8_len(message.body)
        staged = StagedMessage(self._next_mid, sender, message.id, message.to, message.type,
                               "" if bodies is not None else message.body, now_ms, now_ms + self.rules.ttl_ms,
                               origin, dev=origin.partition(".")[2], olm=bodies is not None, size=size, gseq=gseq)
        self._remember(staged)
        if not targets:  # a group of one device: nothing to store, it is safe now
            staged.sent_notified = True
            out.notices.append((origin, self._sent_item(staged, None)))
            self._maybe_forget(staged, out)
        for device in targets:
            staged.targets.add(device)
            staged.unsettled += 1
            body = message.bodies[device] if message.bodies is not None else None
            due = now + self.rules.flush_s if gseq is None else now  # rule 11: a group item is written at once
            self._stage(device, Item(device, 0, staged.expires_ms, due, message=staged, body=body), now, out)
        out.flush_due = True

    def _admit(self, origin: str, sender: str, message: ChatMessage, now: float) -> list[str]:
        """The target devices of a new message; raises ``Refused`` (a transient refusal holds the
        device's later messages until it re-sends this one)."""
        if not self.directory.exists(message.to):
            raise Refused(ErrorItem(ErrorCode.UNKNOWN_RECIPIENT, f"no user {message.to!r}", message.id))
        self._holds.check(origin, message.id, now)
        if message.bodies is None and self.rules.require_encryption:
            raise Refused(ErrorItem(ErrorCode.ENCRYPTION_REQUIRED,
                                    "this server accepts only end-to-end encrypted messages ('bodies')", message.id))
        if message.bodies is None:
            targets = self.directory.targets(message.to)
        else:
            targets = olm_targets(self.keyed, self._holds, origin, sender, message, now)
        try:
            self._check_room(sender, targets, message.to, message.id, now)
        except Refused as refused:
            self._holds.hold(origin, message.id, refused.item.code, now)
            raise
        return targets

    def _check_room(self, sender: str, targets: list[str], to: str, ref: str | None, now: float) -> None:
        """Raises ``Refused`` for an uplink that stages items for ``targets`` (a message, a seen report)
        if it may not: the target queues' bound first (no token spent then), then the sender's send rate."""
        if any(self._queued(t) >= self.rules.max_queue for t in targets):
            raise Refused(ErrorItem(ErrorCode.QUEUE_FULL, f"{to} has too many undelivered items", ref))
        if not self._rate.allow(sender, now):
            raise Refused(ErrorItem(ErrorCode.RATE_LIMITED, "sending too fast; retry later", ref))

    def _stage(self, device: str, item: Item, now: float, out: StagingOutcome) -> None:
        box = self._box(device)
        item.seq = self._new_seq(device)
        box.items[item.seq] = item
        self._holding.add(device)
        self._volatile.append(item)
        if item.message is not None:
            out.staged.append(device)
        if box.online:
            box.queue(item.seq)
            self._pump(device, box, now, out)

    def _stage_receipt(self, user: str, status: str, ids: list[str], peer: str, now_ms: int, now: float,
                       out: StagingOutcome) -> None:
        for device in self.directory.targets(user):
            merged = self._coalesce(device, status, ids, peer, out) if status == RECEIPT_SEEN else ids
            receipt = {"status": status, "ids": merged, "peer": peer, "ts": now_ms}
            self._stage(device, Item(device, 0, now_ms + self.rules.ttl_ms, now + self.rules.flush_s,
                                     receipt=receipt), now, out)
        out.flush_due = True

    def _coalesce(self, device: str, status: str, ids: list[str], peer: str, out: StagingOutcome) -> list[str]:
        """Rule 11: the ids of a new receipt merged with those of the device's last item, if that is a
        receipt of the same status and peer not sent yet (it is dropped: the merged one takes its place
        at the tail, so nothing overtakes anything). At most MAX_IDS_PER_ITEM ids, each once."""
        box = self.boxes.get(device)
        tail = next(reversed(box.items.values()), None) if box is not None else None
        if box is None or tail is None or tail.receipt is None or tail.seq in box.inflight:
            return ids
        if tail.receipt["status"] != status or tail.receipt["peer"] != peer:
            return ids
        merged = list(dict.fromkeys([*tail.receipt["ids"], *ids]))
        if len(merged) > MAX_IDS_PER_ITEM:
            return ids
        del box.items[tail.seq]
        self._drop_item(tail, out)  # its row (if written) is deleted in the commit that writes the new one
        self.counters.receipts_coalesced += 1
        return merged

    def seen(self, by_user: str, to_user: str, ids: Iterable[str], origin: str, now_ms: int,
             now: float) -> StagingOutcome:
        """``by_user`` displayed ``ids`` from ``to_user``: a staged ``receipt seen`` for ``to_user``'s devices,
        after ``sent`` and ``delivered`` for each of those messages (rule 11). Costs a send token."""
        out = StagingOutcome()
        if not self.directory.exists(to_user):
            out.notices.append((origin, ErrorItem(ErrorCode.UNKNOWN_RECIPIENT, f"no user {to_user!r}")))
            return out
        try:
            self._check_room(by_user, self.directory.targets(to_user), to_user, None, now)
        except Refused as refused:
            out.notices.append((origin, refused.item))
            return out
        now_ids: list[str] = []
        delivered: list[str] = []
        for msg_id in dict.fromkeys(ids):
            message = self.live.get((to_user, msg_id))
            if message is None or message.recipient != by_user:
                now_ids.append(msg_id)  # long delivered and forgotten (or not by_user's): nothing to wait for
            else:
                self._mark_seen(message, now_ms, now, delivered, now_ids)
        if delivered:  # seen implies delivered: it goes first, once
            self._stage_receipt(to_user, RECEIPT_DELIVERED, delivered, by_user, now_ms, now, out)
        if now_ids:
            self._stage_receipt(to_user, RECEIPT_SEEN, now_ids, by_user, now_ms, now, out)
        return out

    # --- acks ------------------------------------------------------------------------

    def ack(self, device: str, seqs: Iterable[int], now_ms: int, now: float) -> StagingOutcome:
        out = StagingOutcome()
        box = self.boxes.get(device)
        if box is None:
            return out
        delivered: dict[tuple[str, str], list[str]] = {}
        for seq in seqs:
            item = box.items.pop(seq, None)
            if item is None:
                continue  # a repeated ack, or not this device's item
            box.inflight.pop(seq, None)
            self._drop_item(item, out)
            message = item.message
            if message is not None and not is_placeholder(device) and _user_of(device) == message.recipient:
                self._mark_delivered(message, now_ms, now,
                                     delivered.setdefault((message.sender, message.recipient), []))
        for (sender, recipient), ids in delivered.items():
            if ids:
                self._stage_receipt(sender, RECEIPT_DELIVERED, ids, recipient, now_ms, now, out)
        self._pump(device, box, now, out)
        out.fold_sent()
        return out

    def _mark_delivered(self, message: StagedMessage, now_ms: int, now: float, ids: list[str]) -> None:
        """A device of the recipient has the message (first time only): its id joins ``ids`` (the
        ``delivered`` receipt to stage now), or the receipt waits for ``sent`` (rule 11)."""
        if message.delivered:
            return
        message.delivered = True
        self.counters.delivered_latency.observe(max(0, now_ms - message.ts) / 1000)
        if message.state == DURABLE:
            self._pending.delivered.append(message.mid)
        if message.sent_notified:
            ids.append(message.msg_id)
        else:  # rule 1 before rule 5: _settle stages it once the message is safe
            message.delivered_held = (now_ms, now)

    def _mark_seen(self, message: StagedMessage, now_ms: int, now: float, delivered: list[str],
                   seen: list[str]) -> None:
        """The message was seen: ``delivered`` first (``_mark_delivered``), then its id joins ``seen``,
        or that receipt waits for ``sent`` too (staged by ``_settle``, rule 10)."""
        self._mark_delivered(message, now_ms, now, delivered)
        if message.sent_notified:
            seen.append(message.msg_id)
        else:
            message.seen_held = message.seen_held or (now_ms, now)

    def _drop_item(self, item: Item, out: StagingOutcome) -> None:
        """The item leaves its device's queue (acked, expired or removed); an olm ciphertext goes with it."""
        item.acked = True
        item.body = None
        if item.state == DURABLE:
            self._pending.deleted_items.append((item.device, item.seq))
            out.flush_due = True
        self._settle(item, out)
        message = item.message
        if message is not None:
            message.targets.discard(item.device)
            self._maybe_forget(message, out)

    def _settle(self, item: Item, out: StagingOutcome) -> None:
        if item.settled:
            return
        item.settled = True
        message = item.message
        if message is None:
            return
        message.unsettled -= 1
        if message.unsettled == 0 and not message.sent_notified:
            message.sent_notified = True
            out.notices.append((message.origin, self._sent_item(message, None)))
            for status in (RECEIPT_DELIVERED, RECEIPT_SEEN):  # rule 11: in this order, after 'sent'
                held = message.delivered_held if status == RECEIPT_DELIVERED else message.seen_held
                if held is not None:
                    self._stage_receipt(message.sender, status, [message.msg_id], message.recipient,
                                        held[0], held[1], out)
            message.delivered_held = message.seen_held = None

    def _sent_item(self, message: StagedMessage, now_ms: int | None) -> ReceiptItem:
        return ReceiptItem(RECEIPT_SENT, (message.msg_id,), message.recipient,
                           now_ms if now_ms is not None else message.ts)

    def _maybe_forget(self, message: StagedMessage, out: StagingOutcome) -> None:
        if message.targets or message.writing:
            return
        if self.live.get((message.sender, message.msg_id)) is message:
            del self.live[(message.sender, message.msg_id)]
        self._by_mid.pop(message.mid, None)
        expires = message.ts + self.rules.dedup_window_ms
        self._recent.add((message.sender, message.msg_id), expires)
        self._pending.dedup.append((message.sender, message.msg_id, expires))
        if message.state == DURABLE:
            self._pending.deleted_bodies.append(message.mid)
        message.body = None
        out.flush_due = True

    # --- devices ---------------------------------------------------------------------

    def device_online(self, device: str, now: float) -> StagingOutcome:
        """The device subscribed to its inbox: everything unacked goes out again, in seq order."""
        out = StagingOutcome()
        box = self._box(device)
        box.online = True
        box.unsent = deque(box.items.keys()) if box.items else None
        box.inflight.clear()
        self._pump(device, box, now, out)
        return out

    def device_offline(self, device: str) -> None:
        box = self.boxes.get(device)
        if box is None:
            return
        box.online = False
        box.unsent = None
        box.inflight.clear()
        for item in box.items.values():  # free bodies that are safe on disk and wanted by no live device
            message = item.message
            if message is not None and message.olm:
                if item.state == DURABLE:
                    item.body = None  # wanted by this device only
            elif message is not None and message.state == DURABLE and not self._wanted_online(message):
                message.body = None
        if not box.items:
            del self.boxes[device]

    def remove_device(self, device: str) -> StagingOutcome:
        """``devices.remove``: the device's items go (as if acked, without ``delivered``), it stops
        being a target, and a message it was held on is forgotten. Its keys are gone already."""
        out = StagingOutcome()
        self._holds.forget(device)
        self._waiting_bodies.discard(device)
        user, _, device_id = device.partition(".")
        self.directory.remove_device(user, device_id)
        box = self.boxes.pop(device, None)
        for item in box.items.values() if box is not None else ():
            self._drop_item(item, out)
        return out

    def adopt_placeholder(self, user: str, device: str, now: float) -> StagingOutcome:
        """A user's first device takes over what was held for them (new seqs, written at once)."""
        out = StagingOutcome()
        held = self.boxes.pop(placeholder(user), None)
        if held is None:
            return out
        for old in held.items.values():
            if old.state == DURABLE:
                self._pending.deleted_items.append((old.device, old.seq))
            item = Item(device, 0, old.expires_ms, now, message=old.message, receipt=old.receipt, body=old.body,
                        event=old.event)
            item.settled = old.settled
            if old.message is not None:
                old.message.targets.discard(old.device)
                old.message.targets.add(device)
            self._stage(device, item, now, out)
        out.flush_due = True
        return out

    def _pump(self, device: str, box: DeviceBox, now: float, out: StagingOutcome) -> None:
        if not box.online:
            return
        unsent = box.unsent
        while unsent and len(box.inflight) < self.rules.window:
            seq = unsent[0]
            item = box.items.get(seq)
            if item is None:
                unsent.popleft()
                continue
            if item.state != DURABLE and written_first(item):
                return  # flush_done pumps again
            if _needs_body(item):
                if device not in self._waiting_bodies:
                    self._waiting_bodies.add(device)
                    self._missing_bodies(box, unsent, out)
                return
            unsent.popleft()
            box.inflight[seq] = now
            self._sending.add(device)
            out.deliveries.append((device, wire_item(item)))
        if unsent is not None and not unsent:
            box.unsent = None

    def _missing_bodies(self, box: DeviceBox, unsent: deque[int], out: StagingOutcome) -> None:
        for seq in itertools.islice(unsent, BODY_PREFETCH):
            item = box.items.get(seq)
            if item is None or item.message is None or not _needs_body(item):
                continue
            if item.message.olm:
                out.need_item_bodies.append((item.device, item.seq))
            else:
                out.need_bodies.append(item.message.mid)

    def bodies_loaded(self, bodies: dict[int, str], now: float,
                      item_bodies: dict[tuple[str, int], str] | None = None) -> StagingOutcome:
        """Bodies (by mid) and olm ciphertexts (by device, seq) read back from the store;
        pumps every device that was waiting for one."""
        out = StagingOutcome()
        for mid, body in bodies.items():
            message = self._by_mid.get(mid)
            if message is not None and message.body is None:
                message.body = body
        for (device, seq), body in (item_bodies or {}).items():
            box = self.boxes.get(device)
            item = box.items.get(seq) if box is not None else None
            if item is not None and item.body is None:
                item.body = body
        waiting, self._waiting_bodies = self._waiting_bodies, set()
        for device in waiting:
            box = self.boxes.get(device)
            if box is not None:
                self._pump(device, box, now, out)
        return out

    def body_missing(self, mid: int, now_ms: int, now: float) -> StagingOutcome:
        """The store has no body for a staged message (should not happen): drop its items."""
        out = StagingOutcome()
        for device, box in list(self.boxes.items()):
            for seq, item in list(box.items.items()):
                if item.message is not None and item.message.mid == mid:
                    del box.items[seq]
                    self._drop_item(item, out)
            self._pump(device, box, now, out)
        return out

    def item_body_missing(self, device: str, seq: int, now: float) -> StagingOutcome:
        """The store has no ciphertext for a staged olm item (should not happen): drop that item."""
        out = StagingOutcome()
        box = self.boxes.get(device)
        item = box.items.pop(seq, None) if box is not None else None
        if box is not None and item is not None:
            self._drop_item(item, out)
            self._pump(device, box, now, out)
        return out

    # --- time-driven -------------------------------------------------------------------

    def redeliver(self, now: float) -> StagingOutcome:
        out = StagingOutcome()
        for device in self._sending.still(self._in_flight):
            box = self.boxes[device]
            stale = [seq for seq, sent in box.inflight.items() if now - sent >= self.rules.redeliver_after_s]
            for seq in stale:
                item = box.items.get(seq)
                del box.inflight[seq]
                if item is None:
                    continue
                box.inflight[seq] = now  # to the end: in-flight order is send order
                self.counters.redeliveries += 1
                out.deliveries.append((device, wire_item(item)))
        return out

    def _staged(self, device: str) -> dict[int, Item] | None:
        box = self.boxes.get(device)
        return box.items if box is not None else None

    def _in_flight(self, device: str) -> dict[int, float] | None:
        box = self.boxes.get(device)
        return box.inflight if box is not None and box.online else None

    def expire(self, now_ms: int, now: float) -> StagingOutcome:
        """Drop items past their TTL (rule 7) and forget old remembered ids."""
        out = StagingOutcome()
        expired: dict[tuple[str, str], list[str]] = {}
        for device in self._holding.still(self._staged):
            box = self.boxes[device]
            while box.items:
                seq, item = next(iter(box.items.items()))
                if item.expires_ms > now_ms:
                    break
                del box.items[seq]
                box.inflight.pop(seq, None)
                message = item.message
                if message is not None and not message.expired_notified:
                    message.expired_notified = True
                    expired.setdefault((message.sender, message.recipient), []).append(message.msg_id)
                self._drop_item(item, out)
            if not box.items and not box.online:
                del self.boxes[device]
        for (sender, recipient), ids in expired.items():
            self._stage_receipt(sender, RECEIPT_EXPIRED, ids, recipient, now_ms, now, out)
        self._recent.prune(now_ms)
        return out

    # --- flushing ----------------------------------------------------------------------

    def flush_done(self, batch: FlushBatch) -> StagingOutcome:
        out = StagingOutcome()
        for message in batch.bodies:
            message.state = DURABLE
            if not message.olm and not self._wanted_online(message):
                message.body = None  # safe on disk and no live device waits for it: read back on connect
        for item in batch.items:
            item.state = DURABLE
            if item.message is not None and item.message.olm and not self._online(item.device):
                item.body = None  # an olm ciphertext is wanted by its own device only
            if item.acked:
                self._pending.deleted_items.append((item.device, item.seq))
                out.flush_due = True
            self._settle(item, out)
            if item.message is not None:
                item.message.writing -= 1
                self._maybe_forget(item.message, out)
        out.fold_sent()
        return out

    def flush_failed(self, batch: FlushBatch) -> StagingOutcome:
        """The commit failed: everything in it is pending again; senders hear why."""
        out = StagingOutcome()
        for message in batch.bodies:
            message.state = VOLATILE
            if not message.store_failed:
                message.store_failed = True
                out.notices.append((message.origin, ErrorItem(
                    ErrorCode.INTERNAL, "the server cannot store messages right now; it keeps retrying",
                    message.msg_id)))
        for item in batch.items:
            item.state = VOLATILE
            if item.message is not None:
                item.message.writing -= 1
                self._maybe_forget(item.message, out)
        self._volatile = deque(sorted([*batch.items, *self._volatile], key=lambda i: i.due))
        self._pend_again(batch)
        return out


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _user_of(device: str) -> str:
    return device.partition(".")[0]


def written_first(item: Item) -> bool:
    """A group event or message: sent only once it is on disk (rule 11)."""
    return item.event is not None or (item.message is not None and item.message.gseq is not None)


def _needs_body(item: Item) -> bool:
    """True if the item is a message whose body (olm: this device's ciphertext) is not in memory."""
    message = item.message
    if message is None:
        return False
    return item.body is None if message.olm else message.body is None
