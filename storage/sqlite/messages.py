"""The messaging store in SQLite: ``bridge.messaging.store.MessageStore``, where items wait on disk.

The Protocol is in terms of per-device queue operations (see docs/ARCHITECTURE.md, "Scale
beyond one machine"), so another backend can replace SQLite without touching
the core. Bodies are stored once per message; each target device has its own
item row (which holds that device's ciphertext of an olm message).
``secure_delete`` overwrites deleted rows and ``checkpoint`` truncates the WAL,
so a delivered body leaves neither file.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable

import aiosqlite

from bridge.messaging.group_receipts import TrackedRow
from bridge.messaging.records import FlushBatch, Item, StagedMessage
from bridge.store import StoreError
from storage.sqlite import group_receipts as receipt_rows
from storage.sqlite.db import SqliteFile, transaction, writer_lock

log = logging.getLogger(__name__)

STAGING_DB = "staging.db"

MIGRATIONS = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE bodies (
        mid         INTEGER PRIMARY KEY,
        sender      TEXT NOT NULL,
        msg_id      TEXT NOT NULL,
        recipient   TEXT NOT NULL,
        type        TEXT NOT NULL,
        body        TEXT NOT NULL,
        ts          INTEGER NOT NULL,
        expires_ms  INTEGER NOT NULL,
        delivered   INTEGER NOT NULL,
        origin      TEXT NOT NULL
    );
    CREATE TABLE items (
        device      TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        mid         INTEGER,
        receipt     TEXT,
        expires_ms  INTEGER NOT NULL,
        PRIMARY KEY (device, seq)
    ) WITHOUT ROWID;
    CREATE TABLE dedup (
        sender      TEXT NOT NULL,
        msg_id      TEXT NOT NULL,
        expires_ms  INTEGER NOT NULL,
        PRIMARY KEY (sender, msg_id)
    ) WITHOUT ROWID
    """,
    # 2: end-to-end encryption. An olm message keeps body '' in `bodies`; each
    # target device's ciphertext is on its own item row, deleted with it on ack.
    """
    ALTER TABLE bodies ADD COLUMN olm INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE bodies ADD COLUMN dev TEXT;
    ALTER TABLE items ADD COLUMN body TEXT
    """,
    # 3: groups (docs/PROTOCOL.md section 11). A group message's body row keeps its gseq; a group
    # event is an item row of its own (JSON); each group's highest staged gseq is kept, written
    # with the items, for the restart (bridge/groups/service.py).
    """
    ALTER TABLE bodies ADD COLUMN gseq INTEGER;
    ALTER TABLE items ADD COLUMN event TEXT;
    CREATE TABLE group_gseqs (gid TEXT PRIMARY KEY, gseq INTEGER NOT NULL) WITHOUT ROWID
    """,
    # 4: group receipts, per member until complete (storage/sqlite/group_receipts.py).
    receipt_rows.MIGRATION,
)


class SqliteMessageStore(SqliteFile):
    """``bridge.messaging.store.MessageStore`` and ``GroupReceiptStore`` in ``staging.db``."""

    FILE = STAGING_DB
    MIGRATIONS = MIGRATIONS

    async def next_boot(self) -> int:
        async with self._transaction("next_boot"):
            await self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('boot', 1) "
                "ON CONFLICT (key) DO UPDATE SET value = value + 1"
            )
            async with self._db.execute("SELECT value FROM meta WHERE key = 'boot'") as cursor:
                row = await cursor.fetchone()
        return int(row[0]) if row else 1

    async def last_boot(self) -> int:
        """The boot number of the last start (0: never started); read only. Every seq handed out so
        far is below ``(last_boot() + 1) * SEQ_SPAN``."""
        async with self._db.execute("SELECT value FROM meta WHERE key = 'boot'") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def load(self, now_ms: int) -> tuple[list[StagedMessage], list[Item], list[tuple[str, str, int]]]:
        messages: dict[int, StagedMessage] = {}
        query = ("SELECT mid, sender, msg_id, recipient, type, ts, expires_ms, delivered, origin, dev, olm, "
                 "length(CAST(body AS BLOB)), gseq FROM bodies")
        async with self._db.execute(query) as cursor:
            async for r in cursor:
                origin = str(r[8])
                dev = str(r[9]) if r[9] is not None else origin.partition(".")[2]  # rows from schema 1
                messages[int(r[0])] = StagedMessage(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), None,
                                                    int(r[5]), int(r[6]), origin, dev=dev, olm=bool(r[10]),
                                                    delivered=bool(r[7]), size=int(r[11] or 0),
                                                    gseq=int(r[12]) if r[12] is not None else None)
        items: list[Item] = []
        query = ("SELECT device, seq, mid, receipt, expires_ms, length(CAST(body AS BLOB)), event FROM items "
                 "ORDER BY device, seq")
        async with self._db.execute(query) as cursor:
            async for r in cursor:
                message = messages.get(int(r[2])) if r[2] is not None else None
                receipt = json.loads(r[3]) if r[3] is not None else None
                event = json.loads(r[6]) if r[6] is not None else None
                if message is None and receipt is None and event is None:
                    log.error("staged item %s/%s has no message: skipped", r[0], r[1])
                    continue
                if message is not None and message.olm:
                    message.size += int(r[5] or 0)  # an olm message's bytes are its devices' ciphertexts
                items.append(Item(str(r[0]), int(r[1]), int(r[4]), 0.0, message=message, receipt=receipt,
                                  event=event))
        query = "SELECT sender, msg_id, expires_ms FROM dedup WHERE expires_ms > ?"
        async with self._db.execute(query, (now_ms,)) as cursor:
            remembered = [(str(r[0]), str(r[1]), int(r[2])) async for r in cursor]
        return list(messages.values()), items, remembered

    async def commit(self, batch: FlushBatch) -> None:
        async with self._transaction("commit"):
            db = self._db
            if batch.bodies:
                await db.executemany(
                    "INSERT OR REPLACE INTO bodies (mid, sender, msg_id, recipient, type, body, ts, expires_ms, "
                    "delivered, origin, dev, olm, gseq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(m.mid, m.sender, m.msg_id, m.recipient, m.type, m.body or "", m.ts, m.expires_ms,
                      int(m.delivered), m.origin, m.dev, int(m.olm), m.gseq) for m in batch.bodies],
                )
            if batch.items:
                await db.executemany(
                    "INSERT OR REPLACE INTO items (device, seq, mid, receipt, expires_ms, body, event) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(i.device, i.seq, i.message.mid if i.message else None,
                      json.dumps(i.receipt) if i.receipt is not None else None, i.expires_ms, i.body,
                      json.dumps(i.event) if i.event is not None else None)
                     for i in batch.items],
                )
            if batch.deleted_items:
                await db.executemany("DELETE FROM items WHERE device = ? AND seq = ?", batch.deleted_items)
            if batch.delivered:
                await db.executemany("UPDATE bodies SET delivered = 1 WHERE mid = ?", [(m,) for m in batch.delivered])
            if batch.deleted_bodies:
                await db.executemany("DELETE FROM bodies WHERE mid = ?", [(m,) for m in batch.deleted_bodies])
            if batch.dedup:
                await db.executemany("INSERT OR REPLACE INTO dedup (sender, msg_id, expires_ms) VALUES (?, ?, ?)",
                                     batch.dedup)
            if batch.gseqs:
                await db.executemany("INSERT INTO group_gseqs (gid, gseq) VALUES (?, ?) ON CONFLICT (gid) "
                                     "DO UPDATE SET gseq = max(gseq, excluded.gseq)", list(batch.gseqs.items()))
            await receipt_rows.write(db, batch.receipts)

    async def group_gseqs(self) -> dict[str, int]:
        """Each group's highest staged gseq, as written by the commits."""
        async with self._db.execute("SELECT gid, gseq FROM group_gseqs") as cursor:
            return {str(r[0]): int(r[1]) async for r in cursor}

    async def group_receipts(self) -> list[TrackedRow]:
        return await receipt_rows.load(self._db)

    async def bodies(self, mids: list[int]) -> dict[int, str]:
        found: dict[int, str] = {}
        for chunk in _chunks(mids, 500):
            marks = ",".join("?" * len(chunk))
            async with self._db.execute(f"SELECT mid, body FROM bodies WHERE mid IN ({marks})", chunk) as cursor:  # noqa: S608 (placeholders only)
                async for r in cursor:
                    found[int(r[0])] = str(r[1])
        return found

    async def item_bodies(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
        by_device: dict[str, list[int]] = {}
        for device, seq in keys:
            by_device.setdefault(device, []).append(seq)
        found: dict[tuple[str, int], str] = {}
        for device, seqs in by_device.items():
            for chunk in _chunks(seqs, 500):
                marks = ",".join("?" * len(chunk))
                query = f"SELECT seq, body FROM items WHERE device = ? AND seq IN ({marks}) AND body IS NOT NULL"  # noqa: S608 (placeholders only)
                async with self._db.execute(query, [device, *chunk]) as cursor:
                    async for r in cursor:
                        found[(device, int(r[0]))] = str(r[1])
        return found

    async def prune(self, now_ms: int) -> None:
        async with self._transaction("prune"):
            await self._db.execute("DELETE FROM dedup WHERE expires_ms <= ?", (now_ms,))

    async def probe(self) -> None:
        """A tiny write transaction (readiness check); raises StoreError when the store cannot be written."""
        async with self._transaction("probe"):
            await self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('probe', 1) ON CONFLICT (key) DO UPDATE SET value = value + 1"
            )

    async def checkpoint(self) -> None:
        async with writer_lock(self._db):  # never inside another operation's transaction
            try:
                await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except aiosqlite.Error as exc:
                raise StoreError(f"checkpoint failed: {exc}") from exc

    def _transaction(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        return transaction(self._db, name)


def _chunks(values: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]
