"""The push store in SQLite: ``bridge.push.store.PushStore`` in ``push.db`` (the data directory).

Each operation is one named transaction. A registration is keyed by the device's client id; a
device removed while the broker was down (``chat-broker device remove``) loses its registration
at the next start (the wiring compares with users.db, as for the key directory).
"""

from __future__ import annotations

import aiosqlite

from bridge.push.core import QueuedWake
from bridge.push.provider import PushTarget
from bridge.store import StoreError
from storage.sqlite.db import SqliteFile, transaction

PUSH_DB = "push.db"

MIGRATIONS = (
    """
    CREATE TABLE registrations (
        client_id   TEXT PRIMARY KEY,
        platform    TEXT NOT NULL,
        token       TEXT NOT NULL,
        created_ms  INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE gone (client_id TEXT PRIMARY KEY) WITHOUT ROWID;
    CREATE TABLE wakes (
        client_id   TEXT PRIMARY KEY,
        due_ms      INTEGER NOT NULL,
        expires_ms  INTEGER NOT NULL,
        attempts    INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    # Push previews (docs/PROTOCOL.md section 12): the device's preview key and its signature, and the
    # encrypted preview a queued wake-up carries (only with push.include_preview; NULL otherwise).
    """
    ALTER TABLE registrations ADD COLUMN preview_key TEXT;
    ALTER TABLE registrations ADD COLUMN preview_sig TEXT;
    ALTER TABLE wakes ADD COLUMN preview TEXT
    """,
)


class SqlitePushStore(SqliteFile):
    FILE = PUSH_DB
    MIGRATIONS = MIGRATIONS

    async def register(self, target: PushTarget, now_ms: int) -> None:
        async with transaction(self._db, "push.register"):
            await self._db.execute(
                "INSERT OR REPLACE INTO registrations (client_id, platform, token, created_ms, preview_key, "
                "preview_sig) VALUES (?, ?, ?, ?, ?, ?)",
                (target.client_id, target.platform, target.token, now_ms, target.preview_key, target.preview_sig))
            await self._db.execute("DELETE FROM gone WHERE client_id = ?", (target.client_id,))

    async def unregister(self, client_id: str) -> bool:
        async with transaction(self._db, "push.unregister"):
            cursor = await self._db.execute("DELETE FROM registrations WHERE client_id = ?", (client_id,))
            await self._db.execute("DELETE FROM wakes WHERE client_id = ?", (client_id,))
            await self._db.execute("DELETE FROM gone WHERE client_id = ?", (client_id,))
        return cursor.rowcount > 0

    async def mark_gone(self, client_id: str) -> None:
        async with transaction(self._db, "push.gone"):
            await self._db.execute("DELETE FROM registrations WHERE client_id = ?", (client_id,))
            await self._db.execute("DELETE FROM wakes WHERE client_id = ?", (client_id,))
            await self._db.execute("INSERT OR IGNORE INTO gone (client_id) VALUES (?)", (client_id,))

    async def clear_gone(self, client_id: str) -> None:
        async with transaction(self._db, "push.told"):
            await self._db.execute("DELETE FROM gone WHERE client_id = ?", (client_id,))

    async def save_wakes(self, wakes: list[QueuedWake]) -> None:
        async with transaction(self._db, "push.queue"):
            await self._db.executemany(
                "INSERT OR REPLACE INTO wakes (client_id, due_ms, expires_ms, attempts, preview) "
                "VALUES (?, ?, ?, ?, ?)",
                [(w.client_id, w.due_ms, w.expires_ms, w.attempts, w.preview) for w in wakes])

    async def delete_wakes(self, client_ids: list[str]) -> None:
        async with transaction(self._db, "push.dequeue"):
            await self._db.executemany("DELETE FROM wakes WHERE client_id = ?", [(c,) for c in client_ids])

    async def load(self) -> tuple[list[PushTarget], list[QueuedWake], list[str]]:
        try:
            targets = [PushTarget(str(r[1]), str(r[2]), str(r[0]), _text(r[3]), _text(r[4]))
                       for r in await self._fetchall(
                           "SELECT client_id, platform, token, preview_key, preview_sig FROM registrations", ())]
            wakes = [QueuedWake(str(r[0]), int(r[1]), int(r[2]), int(r[3]), _text(r[4]))
                     for r in await self._fetchall(
                         "SELECT client_id, due_ms, expires_ms, attempts, preview FROM wakes", ())]
            gone = [str(r[0]) for r in await self._fetchall("SELECT client_id FROM gone", ())]
        except aiosqlite.Error as exc:
            raise StoreError(f"cannot read {PUSH_DB}: {exc}") from exc
        return targets, wakes, gone


def _text(value: object) -> str | None:
    return None if value is None else str(value)
