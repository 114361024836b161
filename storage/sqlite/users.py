"""Users and their devices, in SQLite (aiosqlite).

A user row holds the scrypt password hash; a device row is created on the
device's first successful login and may hold the keyed digest of a device
token (never the token itself). See ``credentials`` for the formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import aiosqlite

from bridge.store import StoreError, UserExistsError
from broker.users import DeviceInfo, TooManyDevicesError, UserInfo
from storage.sqlite.db import SqliteFile, ensure_private_dir

log = logging.getLogger(__name__)

USERS_DB = "users.db"
SECRET_FILE = "server.key"  # noqa: S105 (a file name, not a secret)
STAMPS_AFTER_S = 1.0  # token logins' last-login times are written this long after the first, together
STAMPS_PER_STATEMENT = 300  # 3 parameters each: under SQLite's oldest limit of 999
LOOKUPS_PER_QUERY = 400  # 2 parameters each
DEVICE_ROWS = ("SELECT user, device, token_digest, created_ms, last_login_ms FROM devices "
               "WHERE (user, device) IN (VALUES {rows})")
TOUCH = ("UPDATE devices SET last_login_ms = stamps.column3 FROM (VALUES {rows}) AS stamps "
         "WHERE devices.user = stamps.column1 AND devices.device = stamps.column2")

MIGRATIONS = (
    """
    CREATE TABLE users (
        name        TEXT PRIMARY KEY,
        pw_hash     TEXT NOT NULL,
        created_ms  INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE devices (
        user          TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        device        TEXT NOT NULL,
        token_digest  TEXT,
        created_ms    INTEGER NOT NULL,
        last_login_ms INTEGER NOT NULL,
        PRIMARY KEY (user, device)
    ) WITHOUT ROWID
    """,
)


class UnknownUserError(StoreError):
    pass


def now_ms() -> int:
    return int(time.time() * 1000)


def load_or_create_secret(data_dir: Path) -> bytes:
    """The server's HMAC key for device tokens, created (mode 0600) on first use."""
    path = data_dir / SECRET_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    ensure_private_dir(data_dir)
    secret = os.urandom(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first
        return path.read_bytes()
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    return secret


class SqliteUserStore(SqliteFile):
    """All user and device queries; one method, one transaction. Implements ``broker.users.UserStore``
    and the user lookups of the bridge (``UserLookup``, ``Accounts``)."""

    FILE = USERS_DB
    MIGRATIONS = MIGRATIONS

    def __init__(self, db: aiosqlite.Connection) -> None:
        super().__init__(db)
        # A commit per token login (fsynced) held logins to ~800/s; the stamps wait a second instead.
        self._stamps: dict[tuple[str, str], int] = {}
        self._stamps_due: asyncio.Task[None] | None = None
        # device() lookups asked while one query runs go together in the next: a login storm's token checks
        # cost a trip to the SQLite thread per batch, not per login.
        self._lookups: dict[tuple[str, str], list[asyncio.Future[DeviceInfo | None]]] = {}
        self._lookup_task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._lookup_task is not None:
            self._lookup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lookup_task
        if self._stamps_due is not None:
            self._stamps_due.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stamps_due
        await self.flush_logins()
        await super().close()

    async def add_user(self, name: str, pw_hash: str) -> None:
        try:
            await self._db.execute(
                "INSERT INTO users (name, pw_hash, created_ms) VALUES (?, ?, ?)", (name, pw_hash, now_ms())
            )
        except aiosqlite.IntegrityError:
            raise UserExistsError(f"user {name!r} already exists") from None

    async def add_users(self, rows: Iterable[tuple[str, str]]) -> tuple[int, list[str]]:
        """Insert many users in one transaction; returns (added, names that already existed)."""
        created = now_ms()
        existing: list[str] = []
        added = 0
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            for name, pw_hash in rows:
                cursor = await self._db.execute(
                    "INSERT OR IGNORE INTO users (name, pw_hash, created_ms) VALUES (?, ?, ?)",
                    (name, pw_hash, created),
                )
                if cursor.rowcount == 1:
                    added += 1
                else:
                    existing.append(name)
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        return added, existing

    async def user_exists(self, name: str) -> bool:
        async with self._db.execute("SELECT 1 FROM users WHERE name = ?", (name,)) as cursor:
            return await cursor.fetchone() is not None

    async def set_password(self, name: str, pw_hash: str) -> None:
        """Change the password and revoke every device token of the user."""
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            cursor = await self._db.execute("UPDATE users SET pw_hash = ? WHERE name = ?", (pw_hash, name))
            if cursor.rowcount == 0:
                raise UnknownUserError(f"no user {name!r}")
            await self._db.execute("UPDATE devices SET token_digest = NULL WHERE user = ?", (name,))
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise

    async def delete_user(self, name: str) -> None:
        cursor = await self._db.execute("DELETE FROM users WHERE name = ?", (name,))
        if cursor.rowcount == 0:
            raise UnknownUserError(f"no user {name!r}")

    async def iter_users(self) -> AsyncIterator[UserInfo]:
        """Every user by name, with their number of devices, read as they are listed."""
        query = (
            "SELECT u.name, u.created_ms, COUNT(d.device) FROM users u "
            "LEFT JOIN devices d ON d.user = u.name GROUP BY u.name ORDER BY u.name"
        )
        async with self._db.execute(query) as cursor:
            async for r in cursor:
                yield UserInfo(str(r[0]), int(r[1]), int(r[2]))

    async def list_users(self) -> list[UserInfo]:
        return [user async for user in self.iter_users()]

    async def password_hash(self, name: str) -> str | None:
        async with self._db.execute("SELECT pw_hash FROM users WHERE name = ?", (name,)) as cursor:
            row = await cursor.fetchone()
        return str(row[0]) if row else None

    async def device(self, user: str, device: str) -> DeviceInfo | None:
        loop = asyncio.get_running_loop()
        found: asyncio.Future[DeviceInfo | None] = loop.create_future()  # one per caller: each may be cancelled
        self._lookups.setdefault((user, device), []).append(found)
        if self._lookup_task is None:
            self._lookup_task = loop.create_task(self._look_up())
        return await found

    async def _look_up(self) -> None:
        batch: dict[tuple[str, str], list[asyncio.Future[DeviceInfo | None]]] = {}
        try:
            while self._lookups:
                batch, self._lookups = self._lookups, {}
                keys = list(batch)
                for start in range(0, len(keys), LOOKUPS_PER_QUERY):
                    await self._look_up_some(keys[start:start + LOOKUPS_PER_QUERY], batch)
        finally:
            self._lookup_task = None
            for waiting in (*batch.values(), *self._lookups.values()):
                for found in waiting:
                    found.cancel()  # only those still pending: closed meanwhile
            self._lookups = {}

    async def _look_up_some(self, keys: list[tuple[str, str]],
                            batch: dict[tuple[str, str], list[asyncio.Future[DeviceInfo | None]]]) -> None:
        try:
            rows = await self._db.execute_fetchall(DEVICE_ROWS.format(rows=",".join(["(?, ?)"] * len(keys))),
                                                   [value for key in keys for value in key])
        except aiosqlite.Error as exc:
            for key in keys:
                for found in batch[key]:
                    if not found.done():
                        found.set_exception(exc)
            return
        infos = {(str(r[0]), str(r[1])): DeviceInfo(str(r[0]), str(r[1]), r[2], int(r[3]), int(r[4])) for r in rows}
        for key in keys:
            for found in batch[key]:
                if not found.done():  # its caller was cancelled
                    found.set_result(infos.get(key))

    async def devices(self, user: str) -> list[DeviceInfo]:
        query = (
            "SELECT user, device, token_digest, created_ms, last_login_ms FROM devices "
            "WHERE user = ? ORDER BY device"
        )
        async with self._db.execute(query, (user,)) as cursor:
            return [DeviceInfo(str(r[0]), str(r[1]), r[2], int(r[3]), int(r[4])) async for r in cursor]

    async def user_devices(self, name: str) -> list[str] | None:
        """Device ids of ``name`` (maybe none yet); None if there is no such user."""
        if not await self.user_exists(name):
            return None
        return [d.device for d in await self.devices(name)]

    async def all_devices(self) -> list[tuple[str, str | None]]:
        """Every user with each of their devices; (user, None) for a user without one."""
        query = "SELECT u.name, d.device FROM users u LEFT JOIN devices d ON d.user = u.name ORDER BY u.name"
        async with self._db.execute(query) as cursor:
            return [(str(r[0]), None if r[1] is None else str(r[1])) async for r in cursor]

    async def record_login(self, user: str, device: str, max_devices: int | None = None) -> bool:
        """Note a successful login; returns True when the device is new (its first login).
        A new device is added only while the user has fewer than ``max_devices`` (checked in
        the same statement, so concurrent first logins cannot overshoot), else TooManyDevicesError."""
        stamp = now_ms()
        try:
            cursor = await self._db.execute(
                "INSERT OR IGNORE INTO devices (user, device, token_digest, created_ms, last_login_ms) "
                "SELECT ?, ?, NULL, ?, ? WHERE (SELECT COUNT(*) FROM devices WHERE user = ?) < ?",
                (user, device, stamp, stamp, user, max_devices if max_devices is not None else 2**31),
            )
            if cursor.rowcount == 1:
                return True
            cursor = await self._db.execute(
                "UPDATE devices SET last_login_ms = ? WHERE user = ? AND device = ?", (stamp, user, device)
            )
            if cursor.rowcount == 0:
                raise TooManyDevicesError(f"{user} has {max_devices} devices, the most allowed")
        except aiosqlite.Error as exc:
            # Disk full or read-only (found by tests/chaos): a known device still logs in, only its
            # last-login time is not updated; a new device cannot be registered, so that login fails.
            if await self.device(user, device) is None:
                raise
            log.warning("last login of %s.%s not recorded: %s", user, device, exc)
        return False

    async def touch_login(self, user: str, device: str) -> None:
        """The last-login time of a known device, written within ``STAMPS_AFTER_S`` with the others due."""
        self._stamps[(user, device)] = now_ms()
        if self._stamps_due is None:
            self._stamps_due = asyncio.get_running_loop().create_task(self._stamps_later())

    async def _stamps_later(self) -> None:
        try:
            await asyncio.sleep(STAMPS_AFTER_S)
        finally:
            self._stamps_due = None
        await self.flush_logins()

    async def flush_logins(self) -> None:
        """Write the last-login times noted so far: one statement per ``STAMPS_PER_STATEMENT`` devices
        (each atomic on its own: no transaction spans awaits on the shared connection)."""
        stamps, self._stamps = list(self._stamps.items()), {}
        for start in range(0, len(stamps), STAMPS_PER_STATEMENT):
            chunk = stamps[start:start + STAMPS_PER_STATEMENT]
            params = [value for (user, device), ms in chunk for value in (user, device, ms)]
            try:
                await self._db.execute(TOUCH.format(rows=",".join(["(?, ?, ?)"] * len(chunk))), params)
            except aiosqlite.Error as exc:  # disk full, read-only: a stamp is not worth failing anything for
                log.warning("last login of %d device(s) not recorded: %s", len(chunk), exc)

    async def set_token_digest(self, user: str, device: str, digest: str) -> None:
        cursor = await self._db.execute(
            "UPDATE devices SET token_digest = ? WHERE user = ? AND device = ?", (digest, user, device)
        )
        if cursor.rowcount == 0:
            raise UnknownUserError(f"no device {user}.{device}")

    async def delete_device(self, user: str, device: str) -> bool:
        """Forget a device and its token (``devices.remove``); True if it existed. Its next
        login, if it still has the password, makes it a new device."""
        cursor = await self._db.execute("DELETE FROM devices WHERE user = ? AND device = ?", (user, device))
        return int(cursor.rowcount) == 1

    async def revoke_tokens(self, user: str, device: str | None = None) -> int:
        """Clear the token of one device (or all of the user's); returns how many were set."""
        if device is None:
            cursor = await self._db.execute(
                "UPDATE devices SET token_digest = NULL WHERE user = ? AND token_digest IS NOT NULL", (user,)
            )
        else:
            cursor = await self._db.execute(
                "UPDATE devices SET token_digest = NULL WHERE user = ? AND device = ? AND token_digest IS NOT NULL",
                (user, device),
            )
        return int(cursor.rowcount)
