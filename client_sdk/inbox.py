"""Downlink items -> what to do with them: hand over, drop as a duplicate, ack.

Rules (PROTOCOL.md delivery rules 4 and 5, and the SDK's promise to the app):

1. Items without a ``seq`` (presence, res, error, receipt ``sent``) are
   ephemeral: handed over as they arrive, never acked.
2. A staged item (it has a ``seq``) whose seq is at most the highest seq
   already handed over is a duplicate: ack it again (so the server can delete
   it), never hand it over.
3. A staged item that is already stored locally but not handed over yet is a
   pending repeat: ignore it; it is acked once the stored copy is handed over.
4. Any other staged item is stored first (crash-safe), then handed over in
   ``seq`` order.
5. At hand-over, a message whose (``from``, ``id``) was handed over before is a
   duplicate: it is recorded and acked like a handed item, but not handed over.
6. After the app returns, the item is recorded as handed (one transaction:
   row removed, ``last_seq`` raised, (``from``, ``id``) remembered), then acked.
7. On start, items stored but not handed over are handed over first: the app
   gets each item at least once across crashes, exactly once otherwise.
8. An end-to-end encrypted message (``type`` "olm") is decrypted at hand-over,
   once: the ``decrypt`` hook replaces its row with the opened form (or an
   "undecryptable" form; the row's ``RowKind`` says which) in the same
   transaction as the Olm session update, so
   a crash after that hands over the opened row, never a ciphertext whose keys
   are used up. A message that cannot be decrypted is handed over as an
   ``Undecryptable`` event and acked like any other.
9. A group message (``type`` "megolm") is decrypted at hand-over the same way, with the
   sender's group session: its row becomes a *batch* (the opened message; or nothing while
   its session key has not arrived, the message then waiting in the sender-key store; plus
   older waiting messages given up on, as ``Undecryptable``).
10. An opened message of an ``sdk.*`` type is the SDK's own (a group key share): never
   handed over; ``consume`` takes it and restages its row as the batch of the waiting
   group messages it opened, in one transaction, so a crash hands those over next time.
   Every event is recorded under its own (``from``, ``id``) (rule 5), a group change under
   (group, ``gseq``).

``classify_arrival`` and ``dedup_key`` are pure; ``Inbox`` applies them to a
``LocalStore`` and needs no network.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chatproto import (
    GROUP_PREFIX,
    MEGOLM_TYPE,
    OLM_TYPE,
    DecodeError,
    DownlinkItem,
    GroupItem,
    MsgItem,
    ReceiptItem,
    parse_downlink,
)
from client_sdk.events import (
    Event,
    GroupEvent,
    Message,
    Undecryptable,
    group_event_from,
    message_from,
    receipt_from,
)
from client_sdk.localstore import LocalStore, RowKind, StagedItem


class Arrival(enum.Enum):
    EPHEMERAL = "ephemeral"
    """No seq: hand over now, never ack."""
    STORE = "store"
    """New staged item: it has been stored; hand it over in seq order, then ack."""
    PENDING = "pending"
    """Stored earlier and not handed over yet: ignore this copy."""
    DUPLICATE = "duplicate"
    """Handed over before: ack again, do not hand over."""


def classify_arrival(seq: int | None, last_handed: int, already_stored: bool) -> Arrival:
    """Rules 1-4 for one arriving item."""
    if seq is None:
        return Arrival.EPHEMERAL
    if seq <= last_handed:
        return Arrival.DUPLICATE
    if already_stored:
        return Arrival.PENDING
    return Arrival.STORE


def dedup_key(item: DownlinkItem | None) -> tuple[str, str] | None:
    """Rule 5's key of a staged item: (from, id) of a message, (group, ``gseq.<n>``) of a group
    change (a user id never starts with ``g:``); None for anything else."""
    if isinstance(item, MsgItem):
        return item.sender, item.id
    if isinstance(item, GroupItem):
        return item.group, f"gseq.{item.gseq}"
    return None


def event_key(event: Event) -> tuple[str, str] | None:
    """``dedup_key`` of what an event was made from."""
    if isinstance(event, (Message, Undecryptable)):
        return event.sender, event.id
    if isinstance(event, GroupEvent):
        return event.group, f"gseq.{event.gseq}"
    return None


@dataclass(frozen=True, slots=True)
class Downlink:
    """One payload from ``u/{me}/in``: the parsed item (None if unreadable) and its seq."""

    item: DownlinkItem | None
    seq: int | None
    problem: str = ""


def read_downlink(payload: bytes) -> Downlink:
    """Parse a payload; an unreadable item that still carries a ``seq`` keeps it.

    Such an item (a kind added by a newer server, say) goes through rules 2-7
    like any staged item and is acked without being handed over, so it can
    never block the server's delivery window.
    """
    try:
        item = parse_downlink(payload)
    except DecodeError as exc:
        return Downlink(None, _raw_seq(payload), exc.detail)
    seq = item.seq if isinstance(item, (MsgItem, ReceiptItem, GroupItem)) else None
    return Downlink(item, seq)


def _raw_seq(payload: bytes) -> int | None:
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    seq = obj.get("seq") if isinstance(obj, dict) else None
    if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0:
        return seq
    return None


def event_for(item: DownlinkItem | None) -> Event | None:
    """The event to hand over for a staged item (None: skip it)."""
    if isinstance(item, MsgItem):
        return message_from(item)
    if isinstance(item, ReceiptItem):
        return receipt_from(item)
    if isinstance(item, GroupItem):
        return group_event_from(item)
    return None


def now_ms() -> int:
    return int(time.time() * 1000)


# --- the SDK's own row forms for decrypted messages (rules 8 and 9) ---------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the server said of a message, as the SDK's row forms keep it."""

    seq: int
    id: str
    sender: str
    to: str
    dev: str | None
    ts: int
    gseq: int | None = None

    @classmethod
    def of(cls, item: MsgItem) -> Envelope:
        return cls(item.seq, item.id, item.sender, item.to, item.dev, item.ts, item.gseq)

    def opened(self, type_: str, body: str) -> dict[str, Any]:
        return {"form": RowKind.OPENED.value, "seq": self.seq, "id": self.id, "from": self.sender, "to": self.to,
                "dev": self.dev, "type": type_, "body": body, "ts": self.ts, "gseq": self.gseq}

    def undecryptable(self, reason: str) -> dict[str, Any]:
        return {"form": RowKind.UNDECRYPTABLE.value, "seq": self.seq, "id": self.id, "from": self.sender,
                "to": self.to, "dev": self.dev, "reason": reason, "ts": self.ts}


def opened_row(seq: int, item: MsgItem, payload: dict[str, Any]) -> StagedItem:
    """The inbox row of a decrypted message: the envelope with the inner type and body."""
    return StagedItem(seq, RowKind.OPENED, json.dumps(Envelope.of(item).opened(payload["type"], payload["body"])))


def undecryptable_row(seq: int, item: MsgItem, reason: str) -> StagedItem:
    return StagedItem(seq, RowKind.UNDECRYPTABLE, json.dumps(Envelope.of(item).undecryptable(reason)))


def batch_row(seq: int, forms: list[dict[str, Any]]) -> StagedItem:
    """Rule 9: what a group message or a key share became (``Envelope.opened``/``undecryptable`` forms)."""
    return StagedItem(seq, RowKind.BATCH, json.dumps(forms))


def _event(obj: dict[str, Any]) -> Message | Undecryptable:
    if obj.get("form", RowKind.OPENED.value) == RowKind.UNDECRYPTABLE.value or "reason" in obj:
        return Undecryptable(obj["id"], obj["from"], obj["dev"], obj["to"], obj["reason"], obj["ts"], obj["seq"])
    group = obj["to"] if obj["to"].startswith(GROUP_PREFIX) else None
    return Message(obj["id"], obj["from"], obj["to"], obj["body"], obj["type"], obj["ts"], obj["seq"], obj["dev"],
                   True, group, obj.get("gseq") if group is not None else None)


def stored_events(row: StagedItem) -> list[Message | Undecryptable] | None:
    """The events of a row of the SDK's own forms; None for a ``WIRE`` row. Rows from before the
    ``kind`` column also carry a ``"kind"`` field, unread."""
    if row.kind is RowKind.WIRE:
        return None
    obj = json.loads(row.item)
    return [_event(o) for o in obj] if row.kind is RowKind.BATCH else [_event(obj)]


def stored_event(row: StagedItem) -> Message | Undecryptable | None:
    """The one event of an ``opened_row`` or ``undecryptable_row``."""
    events = stored_events(row)
    return events[0] if events else None


Decrypt = Callable[[int, MsgItem], list[Event]]
"""Rules 8 and 9: decrypt staged message ``seq`` and restage its row; returns the events to hand over."""
Consume = Callable[[int, Message], list[Event]]
"""Rule 10: take an opened SDK message (``sdk.*`` type) of row ``seq``; returns what it opened."""
SDK_TYPE_PREFIX = "sdk."


class Inbox:
    """Staged downlink items on their way to the app, kept in ``store``.

    ``stage`` is called where items arrive (paho's thread); ``hand_over`` by
    the one thread that talks to the app. Both are safe to call concurrently.
    """

    def __init__(self, store: LocalStore, clock_ms: Callable[[], int] = now_ms, decrypt: Decrypt | None = None,
                 consume: Consume | None = None) -> None:
        self._store = store
        self._clock_ms = clock_ms
        self._decrypt = decrypt
        self._consume = consume

    def stage(self, seq: int, payload: bytes) -> Arrival:
        """Apply rules 2-4 atomically; on ``STORE`` the item is in the store when this returns."""
        with self._store.transaction():
            verdict = classify_arrival(seq, self._store.last_seq(), self._store.is_staged(seq))
            if verdict is Arrival.STORE:
                self._store.stage(seq, payload.decode("utf-8", "replace"), self._clock_ms())
        return verdict

    def highest_staged(self) -> int:
        """The highest seq stored and not yet handed over (0 if none)."""
        return self._store.highest_staged()

    def hand_over(
        self, deliver: Callable[[Event], bool], on_done: Callable[[int], None], upto_seq: int | None = None
    ) -> bool:
        """Hand stored items (all, or those up to ``upto_seq``) to ``deliver`` in seq order.

        ``deliver`` returns True once the app has the event, False if it could
        not be handed over now (the client is closing): the item stays stored
        and this returns False. ``on_done(seq)`` is called after each item is
        recorded as handed (or skipped as a duplicate): the caller acks it.
        An exception from ``deliver`` propagates and leaves the item stored.
        """
        while True:
            batch = self._store.staged(upto_seq, limit=100)
            if not batch:
                return True
            for staged in batch:
                keys, events = self._open(staged)
                for event in events:
                    if not deliver(event):
                        return False
                self._store.mark_handed(staged.seq, keys, self._clock_ms())
                on_done(staged.seq)

    def _open(self, staged: StagedItem) -> tuple[list[tuple[str, str]], list[Event]]:
        """The dedup keys of a stored item and the events to hand over (rules 2, 5, 8-10)."""
        events: list[Event] | None = list(stored_events(staged) or ()) if staged.kind is not RowKind.WIRE else None
        if events is None:
            found = read_downlink(staged.item.encode("utf-8"))
            key = dedup_key(found.item)
            if key is not None and self._store.was_handed(*key):
                return [key], []  # before decrypting: a repeat's keys are used up
            events = self._decrypted(staged.seq, found.item)
        keys = [k for k in map(event_key, events) if k is not None]
        internal = [e for e in events if isinstance(e, Message) and e.type.startswith(SDK_TYPE_PREFIX)]
        if internal:  # never the app's; only one opened over Olm (its sender authenticated) is taken
            share = internal[0]
            taken = (share.encrypted and share.group is None and self._consume is not None
                     and not self._store.was_handed(share.sender, share.id))
            events = self._consume(staged.seq, share) if taken and self._consume is not None else []
            keys += [k for k in map(event_key, events) if k is not None]
        fresh = [e for e in events if (k := event_key(e)) is None or not self._store.was_handed(*k)]
        return keys, fresh

    def _decrypted(self, seq: int, item: DownlinkItem | None) -> list[Event]:
        if isinstance(item, MsgItem) and item.type in (OLM_TYPE, MEGOLM_TYPE):
            if self._decrypt is not None:
                return self._decrypt(seq, item)
            row = undecryptable_row(seq, item, "end-to-end encryption is off on this client")
            self._store.restage(row)
            return list(stored_events(row) or ())
        event = event_for(item)
        return [] if event is None else [event]
