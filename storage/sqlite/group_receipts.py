"""Group receipts in ``staging.db`` (``bridge.messaging.store.GroupReceiptStore``): a row per tracked group
message and a row per member mark, written in the staging commit's transaction
(``SqliteMessageStore.commit``) and deleted when the message is complete or expired: nothing is kept
once every member has it and saw it (``secure_delete``, like the rest of staging).
"""

from __future__ import annotations

import json

import aiosqlite

from bridge.messaging.group_receipts import ReceiptWrites, TrackedRow

MIGRATION = """
    CREATE TABLE group_receipts (
        mid         INTEGER PRIMARY KEY,
        sender      TEXT NOT NULL,
        msg_id      TEXT NOT NULL,
        gid         TEXT NOT NULL,
        expires_ms  INTEGER NOT NULL,
        members     TEXT NOT NULL,
        seen        INTEGER NOT NULL
    );
    CREATE TABLE group_receipt_marks (
        mid          INTEGER NOT NULL,
        member       TEXT NOT NULL,
        delivered_ms INTEGER NOT NULL,
        seen_ms      INTEGER NOT NULL,
        PRIMARY KEY (mid, member)
    ) WITHOUT ROWID
"""
"""Schema 4 of staging.db: ``members`` is the JSON list the message waits for; a time 0 is 'not yet'."""


async def write(db: aiosqlite.Connection, writes: ReceiptWrites) -> None:
    """``writes``, inside the caller's transaction: new rows, marks (a time already set stays), deletions."""
    if writes.new:
        await db.executemany(
            "INSERT OR REPLACE INTO group_receipts (mid, sender, msg_id, gid, expires_ms, members, seen) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(r.mid, r.sender, r.msg_id, r.group, r.expires_ms, json.dumps(r.members), int(r.seen_tracked))
             for r in writes.new])
    if writes.marks:
        await db.executemany(
            "INSERT INTO group_receipt_marks (mid, member, delivered_ms, seen_ms) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (mid, member) DO UPDATE SET "
            "delivered_ms = CASE WHEN delivered_ms > 0 THEN delivered_ms ELSE excluded.delivered_ms END, "
            "seen_ms = CASE WHEN seen_ms > 0 THEN seen_ms ELSE excluded.seen_ms END",
            writes.marks)
    if writes.done:
        done = [(mid,) for mid in writes.done]
        await db.executemany("DELETE FROM group_receipts WHERE mid = ?", done)
        await db.executemany("DELETE FROM group_receipt_marks WHERE mid = ?", done)


async def load(db: aiosqlite.Connection) -> list[TrackedRow]:
    """Every tracked message with its marks, in creation order (mids ascend)."""
    marks: dict[int, dict[str, tuple[int, int]]] = {}
    async with db.execute("SELECT mid, member, delivered_ms, seen_ms FROM group_receipt_marks") as cursor:
        async for r in cursor:
            marks.setdefault(int(r[0]), {})[str(r[1])] = (int(r[2]), int(r[3]))
    query = "SELECT mid, sender, msg_id, gid, expires_ms, members, seen FROM group_receipts ORDER BY mid"
    async with db.execute(query) as cursor:
        return [TrackedRow(int(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]), tuple(json.loads(r[5])),
                           bool(r[6]), marks.get(int(r[0]), {})) async for r in cursor]
