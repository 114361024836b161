"""The outbox: messages from ``send()`` until the server confirms them ``sent``.

Rules:
1. ``send()`` stores the message, with a new random id, before anything is
   published, and returns the id. Works offline.
2. Messages are published in outbox order (the order of ``send()`` calls).
3. A message leaves the outbox when a receipt naming its id arrives: ``sent``,
   or ``delivered``/``seen``/``expired`` (which imply the server had it).
4. On every (re)connect the whole outbox is due again, in order, same ids.
5. While connected, a message without ``sent`` for ``resend_interval``
   seconds is published again (the server recognises the repeat).
6. An ``error`` item whose ``ref`` is an outbox id: a permanent code removes
   the message and is reported to the app; a transient code keeps it and
   retries after an exponential backoff with jitter; a code this SDK does not
   know is handled like a transient one, and reported.
7. ``devices_mismatch`` (the recipient or this user has other devices than the
   message was encrypted for): the message is encrypted again for the fresh
   device lists and re-sent at once, same id, keeping its place; after
   ``MAX_MISMATCHES`` in a row it is dropped and reported.
8. ``no_keys`` (the recipient has no device with keys yet, found by the SDK
   before publishing or said by the server): the message is *held*, not
   dropped: it stays in the outbox, is reported once as ``pending``, and is
   tried again after a backoff (``hold_initial`` doubling to ``hold_max``), on
   every reconnect, and at once when ``wake(peer)`` says the peer was heard
   from. Later messages to the same peer wait behind it (and are reported
   ``pending`` too); messages to other peers go on.

Consequence of 5 and 6: a message retried after an error or a lost publish may
reach the server after later ones; order holds for messages that go through
on their first publish, which is the normal case.

``Outbox`` keeps timing in memory and messages in a ``LocalStore``; it needs
no network and takes its clock as an argument.
"""

from __future__ import annotations

import enum
import random
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from chatproto import GROUP_PREFIX, MESSAGE_ID_RE, TYPE_RE, ErrorCode, is_user_id
from client_sdk.backoff import backoff_delay
from client_sdk.localstore import LocalStore, OutMessage

PERMANENT_CODES: Final = frozenset({
    ErrorCode.BAD_ENVELOPE, ErrorCode.TOO_LARGE, ErrorCode.UNKNOWN_RECIPIENT, ErrorCode.FORBIDDEN,
    ErrorCode.BAD_JSON, ErrorCode.ENCRYPTION_REQUIRED,
})
MAX_MISMATCHES: Final = 3
TRANSIENT_CODES: Final = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.QUEUE_FULL, ErrorCode.INTERNAL})

_NOT_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def new_message_id() -> str:
    """A random message id (16 of ``[A-Za-z0-9_-]``, 96 bits)."""
    while True:
        candidate = _NOT_ID_CHARS.sub("", secrets.token_urlsafe(12))
        if MESSAGE_ID_RE.fullmatch(candidate):
            return candidate


def check_message(to: str, body: str, kind: str) -> None:
    """Raise ValueError for a message the server would refuse for its shape."""
    if not isinstance(to, str) or not (is_user_id(to) or to.startswith(GROUP_PREFIX)):
        raise ValueError(f"'to' must be a user id (or 'g:<group>'), not {to!r}")
    if not isinstance(body, str):
        raise TypeError("'body' must be a str (encode binary content first)")
    if not isinstance(kind, str) or TYPE_RE.fullmatch(kind) is None:
        raise ValueError(f"'type' must be 1-32 of [a-z0-9_.-], not {kind!r}")


class ErrorVerdict(enum.Enum):
    NOT_OURS = "not_ours"
    """``ref`` is not an outbox id: report the error to the app."""
    DROPPED = "dropped"
    """Permanent: the message left the outbox; report the error to the app."""
    RETRY = "retry"
    """Transient: kept, retried after a backoff; nothing to report."""
    RETRY_REPORTED = "retry_reported"
    """Unknown code: kept and retried like a transient one, and reported."""
    REBUILD = "rebuild"
    """Rule 7: encrypt again for the fresh device lists and re-send now; nothing to report."""
    HOLD = "hold"
    """Rule 8: kept until the recipient has keys; reported as ``pending`` (``take_pending``)."""


def error_verdict(code: str, in_outbox: bool, mismatches: int = 0) -> ErrorVerdict:
    """Rules 6 and 7 for an error item about an outbox message (``in_outbox``) or not.

    ``mismatches``: how many ``devices_mismatch`` refusals this message had before this one.
    """
    if not in_outbox:
        return ErrorVerdict.NOT_OURS
    if code == ErrorCode.NO_KEYS:
        return ErrorVerdict.HOLD
    if code == ErrorCode.DEVICES_MISMATCH:
        return ErrorVerdict.REBUILD if mismatches < MAX_MISMATCHES else ErrorVerdict.DROPPED
    if code in PERMANENT_CODES:
        return ErrorVerdict.DROPPED
    if code in TRANSIENT_CODES:
        return ErrorVerdict.RETRY
    return ErrorVerdict.RETRY_REPORTED


@dataclass(slots=True)
class _Entry:
    message: OutMessage
    due: float
    failures: int = 0
    mismatches: int = 0
    refused: bool = False
    """Refused for a transient reason and not re-sent yet: later messages wait behind it."""
    held: bool = False
    """Rule 8: waiting for the recipient's keys; later messages to the same peer wait behind it."""
    holds: int = 0
    reported: bool = False
    """Reported ``pending`` already (once per message and process)."""


def wall_ms() -> int:
    return int(time.time() * 1000)


class Outbox:
    """The outbox of one device. Thread-safe; every method returns quickly."""

    def __init__(
        self,
        store: LocalStore,
        resend_interval: float = 10.0,
        retry_initial: float = 1.0,
        retry_max: float = 30.0,  # under the server's HOLD_S (60 s): a held device's first message comes back in time
        hold_initial: float = 2.0,
        hold_max: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        clock_ms: Callable[[], int] = wall_ms,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._resend = resend_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._hold_initial = hold_initial
        self._hold_max = hold_max
        self._pending: dict[str, list[str]] = {}  # peer -> ids newly held, to report (rule 8)
        self._clock = clock
        self._clock_ms = clock_ms
        self._rng = rng
        self._lock = threading.Lock()
        now = clock()
        # Insertion order of this dict is outbox order (rule 2).
        self._entries: dict[str, _Entry] = {m.id: _Entry(m, now) for m in store.outbox_all()}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def ids(self) -> list[str]:
        """Ids in the outbox, oldest first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, msg_id: object) -> bool:
        with self._lock:
            return msg_id in self._entries

    def message(self, msg_id: str) -> OutMessage | None:
        with self._lock:
            entry = self._entries.get(msg_id)
            return entry.message if entry is not None else None

    def recipient(self, msg_id: str) -> str | None:
        message = self.message(msg_id)
        return message.to if message is not None else None

    def add(self, to: str, body: str, kind: str = "text", preview: str | None = None) -> OutMessage:
        """Rule 1: store a new message; it is due for publishing at once."""
        with self._lock:
            message = self.new(to, body, kind, preview=preview)
            self._store.outbox_add(message)
            self._entries[message.id] = _Entry(message, self._clock())
        return message

    def new(self, to: str, body: str, kind: str, id_prefix: str = "", preview: str | None = None) -> OutMessage:
        """A new message (its id after ``id_prefix``), not stored: the caller stores it
        (``LocalStore.outbox_add``) in its own transaction and then calls ``track``. Takes no
        lock (callable inside a store transaction)."""
        check_message(to, body, kind)
        return OutMessage(id_prefix + new_message_id(), to, body, kind, self._clock_ms(), preview)

    def track(self, messages: list[OutMessage], sending: bool = False) -> None:
        """Messages the caller stored: in the outbox from now on (due now, or, when ``sending``
        them now out of turn, after ``resend_interval``)."""
        due = self._clock() + (self._resend if sending else 0.0)
        with self._lock:
            for message in messages:
                self._entries[message.id] = _Entry(message, due)

    def connected(self) -> None:
        """Rule 4: everything is due now."""
        now = self._clock()
        with self._lock:
            for entry in self._entries.values():
                entry.due = now

    def take_due(self) -> list[OutMessage]:
        """Messages to publish now, in outbox order; each is then due again after ``resend_interval``."""
        now = self._clock()
        due: list[_Entry] = []
        waiting: set[str] = set()  # peers with a held message: their later messages wait (rule 8)
        with self._lock:
            for entry in self._entries.values():
                if entry.message.to in waiting:
                    self._report(entry)
                elif entry.due <= now:
                    entry.due = now + self._resend
                    entry.refused = entry.held = False
                    due.append(entry)
                elif entry.refused:
                    break  # nothing may overtake a refused message waiting for its retry (order, rule 4)
                elif entry.held:
                    waiting.add(entry.message.to)
        return [e.message for e in due]

    def next_due(self) -> float | None:
        """The clock time when the next message becomes due (None if the outbox is empty)."""
        with self._lock:
            return min((e.due for e in self._entries.values()), default=None)

    def confirmed(self, ids: tuple[str, ...] | list[str]) -> list[str]:
        """Rule 3: remove these ids (those in the outbox); returns the ones removed."""
        with self._lock:
            removed = [i for i in ids if i in self._entries]
            if removed:
                self._store.outbox_remove(removed)
                for msg_id in removed:
                    del self._entries[msg_id]
        return removed

    def on_error(self, ref: str | None, code: str) -> ErrorVerdict:
        """Rule 6 for an error item; see ``ErrorVerdict`` for what the caller reports."""
        with self._lock:
            entry = self._entries.get(ref) if ref is not None else None
            verdict = error_verdict(code, entry is not None, entry.mismatches if entry is not None else 0)
            if entry is None or ref is None:
                return verdict
            if verdict is ErrorVerdict.DROPPED:
                self._store.outbox_remove([ref])
                del self._entries[ref]
            elif verdict is ErrorVerdict.HOLD:
                self._hold(entry)
            elif verdict is ErrorVerdict.REBUILD:
                entry.mismatches += 1
                entry.due = self._clock()
                entry.refused = True
            else:
                wait = backoff_delay(entry.failures, self._retry_initial, self._retry_max, rng=self._rng)
                entry.failures += 1
                entry.due = self._clock() + wait
                entry.refused = True
        return verdict

    def hold(self, msg_id: str) -> None:
        """Rule 8: ``msg_id`` cannot go out before its recipient has keys."""
        with self._lock:
            entry = self._entries.get(msg_id)
            if entry is not None:
                self._hold(entry)

    def _hold(self, entry: _Entry) -> None:
        to = entry.message.to
        head = next((e for e in self._entries.values() if e.held and e.message.to == to), None)
        if head is None or head is entry:  # the first one waiting for this peer: it is the one retried
            entry.due = self._clock() + backoff_delay(entry.holds, self._hold_initial, self._hold_max,
                                                      rng=self._rng)
            entry.holds += 1
            entry.held = True
        else:  # behind the held one: due with it, so both go out in the same round, in order
            entry.due = head.due
        entry.refused = False
        self._report(entry)

    def _report(self, entry: _Entry) -> None:
        if not entry.reported:
            entry.reported = True
            self._pending.setdefault(entry.message.to, []).append(entry.message.id)

    def take_pending(self) -> dict[str, list[str]]:
        """Ids newly held since the last call, by recipient, in outbox order (to report ``pending``)."""
        with self._lock:
            news, self._pending = self._pending, {}
        return news

    def wake(self, peer: str) -> bool:
        """``peer`` was heard from (it has a device now): its held messages are due at once.
        Returns True if any was held."""
        now = self._clock()
        with self._lock:
            woken = [e for e in self._entries.values() if e.message.to == peer and (e.held or e.reported)]
            for entry in woken:
                entry.due = min(entry.due, now)
        return bool(woken)

    def retry_later(self, ids: list[str]) -> None:
        """The first of ``ids`` could not be prepared (keys unreachable): back it off like a
        transient refusal, and keep the others behind it (due no earlier than it)."""
        with self._lock:
            first = self._entries.get(ids[0]) if ids else None
            if first is None:
                return
            first.due = self._clock() + backoff_delay(first.failures, self._retry_initial, self._retry_max,
                                                      rng=self._rng)
            first.failures += 1
            first.refused = True
            for msg_id in ids[1:]:
                entry = self._entries.get(msg_id)
                if entry is not None:
                    entry.due = min(entry.due, first.due)
