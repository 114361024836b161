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

from chatproto import OLM_TYPE, DecodeError, DownlinkItem, MsgItem, ReceiptItem, parse_downlink
from client_sdk.events import Event, Message, Undecryptable, message_from, receipt_from
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
    """(from, id) for a message, which rule 5 checks; None for anything else."""
    if isinstance(item, MsgItem):
        return item.sender, item.id
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
    seq = item.seq if isinstance(item, (MsgItem, ReceiptItem)) else None
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
    return None


def now_ms() -> int:
    return int(time.time() * 1000)


# --- the SDK's own row forms for decrypted messages (rule 8) --------------------------------


def opened_row(seq: int, item: MsgItem, payload: dict[str, Any]) -> StagedItem:
    """The inbox row of a decrypted message: the envelope with the inner type and body."""
    return StagedItem(seq, RowKind.OPENED, json.dumps({
        "seq": item.seq, "id": item.id, "from": item.sender, "to": item.to, "dev": item.dev,
        "type": payload["type"], "body": payload["body"], "ts": item.ts}))


def undecryptable_row(seq: int, item: MsgItem, reason: str) -> StagedItem:
    return StagedItem(seq, RowKind.UNDECRYPTABLE, json.dumps({
        "seq": item.seq, "id": item.id, "from": item.sender, "to": item.to, "dev": item.dev,
        "reason": reason, "ts": item.ts}))


def stored_event(row: StagedItem) -> Message | Undecryptable | None:
    """The event for a row of the SDK's own forms (``opened_row``, ``undecryptable_row``); None for a
    ``WIRE`` row. Rows from before the ``kind`` column also carry a ``"kind"`` field, unread."""
    if row.kind is RowKind.WIRE:
        return None
    obj = json.loads(row.item)
    if row.kind is RowKind.OPENED:
        return Message(obj["id"], obj["from"], obj["to"], obj["body"], obj["type"], obj["ts"], obj["seq"],
                       obj["dev"], True)
    return Undecryptable(obj["id"], obj["from"], obj["dev"], obj["to"], obj["reason"], obj["ts"], obj["seq"])


Decrypt = Callable[[int, MsgItem], Event]
"""Rule 8: decrypt staged message ``seq`` and restage its row; returns the event to hand over."""


class Inbox:
    """Staged downlink items on their way to the app, kept in ``store``.

    ``stage`` is called where items arrive (paho's thread); ``hand_over`` by
    the one thread that talks to the app. Both are safe to call concurrently.
    """

    def __init__(self, store: LocalStore, clock_ms: Callable[[], int] = now_ms, decrypt: Decrypt | None = None) -> None:
        self._store = store
        self._clock_ms = clock_ms
        self._decrypt = decrypt

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
                key, event = self._open(staged)
                if event is not None and not deliver(event):
                    return False
                self._store.mark_handed(staged.seq, key, self._clock_ms())
                on_done(staged.seq)

    def _open(self, staged: StagedItem) -> tuple[tuple[str, str] | None, Event | None]:
        """The dedup key and the event for a stored item (None: skip it, rules 2 and 5)."""
        opened = stored_event(staged)
        if opened is not None:
            mine = (opened.sender, opened.id)
            return mine, None if self._store.was_handed(*mine) else opened
        found = read_downlink(staged.item.encode("utf-8"))
        key = dedup_key(found.item)
        if key is not None and self._store.was_handed(*key):
            return key, None  # before decrypting: a repeat's keys are used up
        if isinstance(found.item, MsgItem) and found.item.type == OLM_TYPE:
            if self._decrypt is not None:
                return key, self._decrypt(staged.seq, found.item)
            row = undecryptable_row(staged.seq, found.item, "end-to-end encryption is off on this client")
            self._store.restage(row)
            return key, stored_event(row)
        return key, event_for(found.item)
