"""Opening SQLite databases the one way this project wants them.

WAL (readers never block the writer), ``secure_delete`` (deleted rows are
overwritten, not left in free pages: the server keeps nothing once delivered),
foreign keys on, and schema migrations tracked in ``PRAGMA user_version``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import stat
import weakref
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import aiosqlite

from bridge.store import StoreError

log = logging.getLogger(__name__)

DIR_MODE = 0o700  # the data folder: password hashes, token digests, staged messages
FILE_MODE = 0o600


class SqliteFile:
    """A store kept in one SQLite file of the data directory: ``FILE``, migrated by ``MIGRATIONS``.

    ``await Store.open(data_dir)`` opens (creating and migrating) it; ``close()`` closes it.
    """

    FILE: ClassVar[str]
    MIGRATIONS: ClassVar[Sequence[str]]

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, data_dir: Path) -> Self:
        return cls(await open_database(data_dir / cls.FILE, cls.MIGRATIONS))

    async def close(self) -> None:
        await self._db.close()

    async def _fetchone(self, query: str, params: tuple[Any, ...]) -> Any:
        async with self._db.execute(query, params) as cursor:
            return await cursor.fetchone()

    async def _fetchall(self, query: str, params: tuple[Any, ...]) -> list[Any]:
        async with self._db.execute(query, params) as cursor:
            return list(await cursor.fetchall())


async def open_database(path: Path, migrations: Sequence[str], *, synchronous: str = "FULL") -> aiosqlite.Connection:
    """Open (creating if needed) and migrate ``path``; ``migrations[i]`` moves version i to i+1."""
    try:
        ensure_private_dir(path.parent)
        create_private_file(path)  # SQLite gives -wal, -shm and -journal the mode of this file
        db = await aiosqlite.connect(path, isolation_level=None)
    except (OSError, aiosqlite.Error) as exc:
        raise StoreError(f"cannot open database {path}: {explain(exc, path.parent)}") from exc
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA secure_delete=ON")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute(f"PRAGMA synchronous={synchronous}")
        await db.execute("PRAGMA busy_timeout=5000")
        async with db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        if version > len(migrations):
            raise StoreError(
                f"database {path} has schema version {version}, newer than this program knows "
                f"({len(migrations)}); upgrade chat-broker or use another data directory"
            )
        for target, script in enumerate(migrations[version:], start=version + 1):
            await db.execute("BEGIN IMMEDIATE")
            for statement in _statements(script):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version={target}")
            await db.execute("COMMIT")
            log.info("migrated %s to schema version %d", path.name, target)
    except aiosqlite.Error as exc:
        await db.close()
        raise StoreError(f"cannot prepare database {path}: {explain(exc, path.parent)}") from exc
    except BaseException:
        await db.close()
        raise
    return db


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) if missing; ``path`` itself is made 0700."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process made it first
            path.mkdir(mode=DIR_MODE)
    if stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
        path.chmod(DIR_MODE)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (the umask cannot widen or narrow it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


_writers: weakref.WeakKeyDictionary[aiosqlite.Connection, asyncio.Lock] = weakref.WeakKeyDictionary()


def writer_lock(db: aiosqlite.Connection) -> asyncio.Lock:
    """One transaction (or checkpoint) at a time per connection.

    A connection has one transaction; aiosqlite lets two coroutines interleave
    their statements on it, so without this a prune started during a group
    commit made the commit fail ("cannot start a transaction within a transaction").
    """
    lock = _writers.get(db)
    if lock is None:
        lock = _writers[db] = asyncio.Lock()
    return lock


SQLITE_READONLY, SQLITE_FULL = 8, 13  # primary result codes (https://sqlite.org/rescode.html)
ADVICE = {
    SQLITE_FULL: "the file system of the data directory is full: free space there, then start or retry",
    SQLITE_READONLY: "the data directory is read-only: make it writable (mount options, permissions)",
}


def explain(exc: BaseException, directory: Path | None = None) -> str:
    """``exc`` as text, with what to do when the cause is the disk (full, read-only).

    SQLite says only "unable to open database file" when it cannot create the WAL
    files: with ``directory`` given, that directory is checked too.
    """
    if isinstance(exc, OSError):
        code = {errno.ENOSPC: SQLITE_FULL, errno.EROFS: SQLITE_READONLY}.get(exc.errno or 0, 0)
    else:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code not in ADVICE and directory is not None and directory.is_dir():
        if not os.access(directory, os.W_OK):  # false on a read-only mount, for root too
            code = SQLITE_READONLY
        elif shutil.disk_usage(directory).free == 0:
            code = SQLITE_FULL
    advice = ADVICE.get(code)
    return f"{exc} ({advice})" if advice else str(exc)


@contextlib.asynccontextmanager
async def transaction(db: aiosqlite.Connection, name: str) -> AsyncIterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; a database error rolls back and becomes StoreError naming ``name``."""
    async with writer_lock(db):
        try:
            await db.execute("BEGIN IMMEDIATE")
        except aiosqlite.Error as exc:
            raise StoreError(f"{name}: cannot start a transaction: {explain(exc)}") from exc
        except BaseException:
            # Cancelled while aiosqlite's thread ran the BEGIN, which it does all the same: no
            # transaction may stay open, or every later one fails "within a transaction" and the
            # last flush at shutdown loses what it holds (tests/test_migrate.py, 1 run in 4).
            with contextlib.suppress(aiosqlite.Error):
                await db.execute("ROLLBACK")
            raise
        try:
            yield
            await db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(aiosqlite.Error):
                await db.execute("ROLLBACK")
            if isinstance(exc, aiosqlite.Error):
                raise StoreError(f"{name}: {explain(exc)}") from exc
            raise


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]
