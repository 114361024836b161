"""The presence store in SQLite: ``bridge.presence.store.PresenceStore`` in ``presence.db``.

Each operation is one named transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiosqlite

from bridge.presence.store import PresenceSnapshot
from bridge.store import StoreError
from storage.sqlite.db import SqliteFile, transaction

PRESENCE_DB = "presence.db"

MIGRATIONS = (
    """
    CREATE TABLE last_seen (user TEXT PRIMARY KEY, ms INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE privacy (user TEXT PRIMARY KEY, last_seen TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE contacts (
        owner   TEXT NOT NULL,
        contact TEXT NOT NULL,
        PRIMARY KEY (owner, contact)
    ) WITHOUT ROWID
    """,
)


class SqlitePresenceStore(SqliteFile):
    """``bridge.presence.store.PresenceStore`` in ``presence.db`` (the data directory)."""

    FILE = PRESENCE_DB
    MIGRATIONS = MIGRATIONS

    def __init__(self, db: aiosqlite.Connection) -> None:
        super().__init__(db)
        self.commits = 0
        """Transactions committed (benchmarks and tests read it)."""

    async def load(self) -> PresenceSnapshot:
        try:
            async with self._db.execute("SELECT user, ms FROM last_seen") as cursor:
                last_seen = [(str(r[0]), int(r[1])) async for r in cursor]
            async with self._db.execute("SELECT user, last_seen FROM privacy") as cursor:
                settings = [(str(r[0]), str(r[1])) async for r in cursor]
            async with self._db.execute("SELECT owner, contact FROM contacts") as cursor:
                contacts = [(str(r[0]), str(r[1])) async for r in cursor]
        except aiosqlite.Error as exc:
            raise StoreError(f"cannot read {PRESENCE_DB}: {exc}") from exc
        return PresenceSnapshot(last_seen, settings, contacts)

    async def save_last_seen(self, rows: list[tuple[str, int]]) -> None:
        async with self._transaction("save_last_seen"):
            # max(): a batch written late (after a failed attempt) never moves a time backwards.
            await self._db.executemany(
                "INSERT INTO last_seen (user, ms) VALUES (?, ?) "
                "ON CONFLICT (user) DO UPDATE SET ms = max(ms, excluded.ms)", rows)

    async def set_privacy(self, user: str, setting: str) -> None:
        async with self._transaction("set_privacy"):
            await self._db.execute(
                "INSERT INTO privacy (user, last_seen) VALUES (?, ?) "
                "ON CONFLICT (user) DO UPDATE SET last_seen = excluded.last_seen", (user, setting))

    async def add_contacts(self, owner: str, users: list[str]) -> None:
        async with self._transaction("add_contacts"):
            await self._db.executemany("INSERT OR IGNORE INTO contacts (owner, contact) VALUES (?, ?)",
                                       [(owner, user) for user in users])

    async def remove_contacts(self, owner: str, users: list[str]) -> None:
        async with self._transaction("remove_contacts"):
            await self._db.executemany("DELETE FROM contacts WHERE owner = ? AND contact = ?",
                                       [(owner, user) for user in users])

    @contextlib.asynccontextmanager
    async def _transaction(self, name: str) -> AsyncIterator[None]:
        async with transaction(self._db, name):
            yield
        self.commits += 1

