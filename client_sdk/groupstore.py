"""The sender-key tables of the local store (schema 4, see ``localstore``), one method per
operation. Every method joins the caller's ``store.transaction()`` when there is one;
``groupkeys`` groups the session, seen-index and pending updates of one step in one.

- ``group_outbound``: this device's current Megolm session per group, with what
  ``senderkeys`` rule 1 needs (created, messages sent, the devices holding its key).
- ``group_inbound``: senders' sessions per (sender, device, session id), bound to a group.
- ``group_seen``: digest of each decrypted (sender, device, session, index) (rule 6).
- ``group_pending``: messages waiting for their session key (rule 7), sealed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from client_sdk.localstore import LocalStore
from client_sdk.senderkeys import OutboundState


@dataclass(frozen=True, slots=True)
class OutboundRecord:
    group_id: str
    pickle: str
    state: OutboundState


@dataclass(frozen=True, slots=True)
class InboundRecord:
    sender: str
    device: str
    session_id: str
    group_id: str
    first_index: int
    pickle: str


class GroupStore:
    """The sender-key rows of ``store``."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store

    def outbound(self, group_id: str) -> OutboundRecord | None:
        rows = self.store.execute(
            "SELECT session_id, pickle, created_ms, sent, holders FROM group_outbound WHERE group_id = ?", (group_id,))
        if not rows:
            return None
        session_id, pickle, created_ms, sent, holders = rows[0]
        return OutboundRecord(group_id, str(pickle), OutboundState(str(session_id), int(created_ms), int(sent),
                                                                   frozenset(json.loads(holders))))

    def put_outbound(self, record: OutboundRecord) -> None:
        self.store.execute(
            "INSERT OR REPLACE INTO group_outbound (group_id, session_id, pickle, created_ms, sent, holders) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (record.group_id, record.state.session_id, record.pickle, record.state.created_ms, record.state.sent,
             json.dumps(sorted(record.state.holders))))

    def inbound(self, sender: str, device: str, session_id: str) -> InboundRecord | None:
        rows = self.store.execute(
            "SELECT group_id, first_index, pickle FROM group_inbound WHERE sender = ? AND device = ? "
            "AND session_id = ?", (sender, device, session_id))
        if not rows:
            return None
        return InboundRecord(sender, device, session_id, str(rows[0][0]), int(rows[0][1]), str(rows[0][2]))

    def put_inbound(self, record: InboundRecord) -> None:
        self.store.execute(
            "INSERT OR REPLACE INTO group_inbound (sender, device, session_id, group_id, first_index, pickle) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (record.sender, record.device, record.session_id, record.group_id, record.first_index, record.pickle))

    def seen(self, sender: str, device: str, session_id: str, index: int) -> str | None:
        rows = self.store.execute(
            "SELECT digest FROM group_seen WHERE sender = ? AND device = ? AND session_id = ? AND idx = ?",
            (sender, device, session_id, index))
        return str(rows[0][0]) if rows else None

    def put_seen(self, sender: str, device: str, session_id: str, index: int, digest: str) -> None:
        self.store.execute(
            "INSERT OR IGNORE INTO group_seen (sender, device, session_id, idx, digest) VALUES (?, ?, ?, ?, ?)",
            (sender, device, session_id, index, digest))

    # --- pending (rule 7) ------------------------------------------------------------------

    def pending_count(self, sender: str, device: str) -> int:
        rows = self.store.execute("SELECT count(*) FROM group_pending WHERE sender = ? AND device = ?",
                                  (sender, device))
        return int(rows[0][0])

    def add_pending(self, sender: str, device: str, session_id: str, item: str) -> None:
        self.store.execute(
            "INSERT INTO group_pending (sender, device, session_id, item) VALUES (?, ?, ?, ?)",
            (sender, device, session_id, self.store.seal(item, _where(sender, device))))

    def drop_oldest_pending(self, sender: str, device: str, count: int) -> list[str]:
        """Remove and return the ``count`` oldest items pending from one sender device."""
        rows = self.store.execute(
            "SELECT pos, item FROM group_pending WHERE sender = ? AND device = ? ORDER BY pos LIMIT ?",
            (sender, device, count))
        return self._remove(sender, device, rows)

    def take_pending(self, sender: str, device: str, session_id: str) -> list[str]:
        """Remove and return the items waiting for one session, oldest first."""
        rows = self.store.execute(
            "SELECT pos, item FROM group_pending WHERE sender = ? AND device = ? AND session_id = ? ORDER BY pos",
            (sender, device, session_id))
        return self._remove(sender, device, rows)

    def _remove(self, sender: str, device: str, rows: list[tuple[object, ...]]) -> list[str]:
        for row in rows:
            self.store.execute("DELETE FROM group_pending WHERE pos = ?", (row[0],))
        return [self.store.unseal(str(row[1]), _where(sender, device)) for row in rows]


def _where(sender: str, device: str) -> str:
    """Sealed pending items are bound to their sender device (a row moved to another does not open)."""
    return f"group_pending:{sender}.{device}"
