"""The key directory in SQLite: ``bridge.keys.store.KeyStore`` in ``keys.db`` (the data directory;
WAL, ``secure_delete``: see storage/sqlite/db.py). Every operation is one named
transaction; a claim takes and deletes its keys in the same transaction, so
concurrent claims never hand out the same one-time key (the writer lock of
storage/sqlite/db.py serialises them within the process, ``BEGIN IMMEDIATE``
across processes). Claimed key ids are remembered per device (until its
identity keys change or it is removed), so a retried publish cannot bring a
handed-out key back.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from bridge.keys.core import KeyRuleError, OneTimeKey, Publish, claimed_item
from chatproto import MAX_ONE_TIME_KEYS_STORED
from storage.sqlite.db import SqliteFile, transaction, writer_lock

KEYS_DB = "keys.db"

MIGRATIONS = (
    """
    CREATE TABLE device_keys (
        user        TEXT NOT NULL,
        device      TEXT NOT NULL,
        curve25519  TEXT NOT NULL,
        ed25519     TEXT NOT NULL,
        signed      TEXT NOT NULL,
        PRIMARY KEY (user, device)
    ) WITHOUT ROWID;
    CREATE TABLE one_time_keys (
        user        TEXT NOT NULL,
        device      TEXT NOT NULL,
        key_id      TEXT NOT NULL,
        key         TEXT NOT NULL,
        signature   TEXT NOT NULL,
        UNIQUE (user, device, key_id)
    );
    CREATE TABLE claimed (
        user        TEXT NOT NULL,
        device      TEXT NOT NULL,
        key_id      TEXT NOT NULL,
        PRIMARY KEY (user, device, key_id)
    ) WITHOUT ROWID;
    CREATE TABLE fallback_keys (
        user        TEXT NOT NULL,
        device      TEXT NOT NULL,
        key_id      TEXT NOT NULL,
        key         TEXT NOT NULL,
        signature   TEXT NOT NULL,
        PRIMARY KEY (user, device)
    ) WITHOUT ROWID
    """,
)

_DEVICE_TABLES = ("one_time_keys", "claimed", "fallback_keys")


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    """Everything the directory holds for one device (``export``, for ``chat-broker migrate``)."""

    user: str
    device: str
    curve25519: str
    ed25519: str
    signed: dict[str, Any]
    one_time_keys: list[OneTimeKey]  # unclaimed, in the order claims take them
    fallback: OneTimeKey | None
    claimed: list[str]  # ids handed out already: never to be offered again


class SqliteKeyStore(SqliteFile):
    FILE = KEYS_DB
    MIGRATIONS = MIGRATIONS

    async def publish(self, user: str, device: str, publish: Publish) -> tuple[int, bool]:
        async with self._transaction("keys.publish"):
            current = await self._fetchone(
                "SELECT curve25519, ed25519 FROM device_keys WHERE user = ? AND device = ?", (user, device))
            new = publish.device_keys
            if new is not None:
                if current is not None and (current[0], current[1]) != (new.curve25519, new.ed25519):
                    await self._forget_keys(user, device)  # a reinstall: the old keys are useless
                await self._db.execute(
                    "INSERT OR REPLACE INTO device_keys (user, device, curve25519, ed25519, signed) "
                    "VALUES (?, ?, ?, ?, ?)", (user, device, new.curve25519, new.ed25519, json.dumps(new.signed)))
            elif current is None and (publish.one_time_keys or publish.fallback_key):
                raise KeyRuleError.device_keys_first()
            for key in publish.one_time_keys:
                await self._add_one_time_key(user, device, key)
            stored = await self._count(user, device)
            if stored > MAX_ONE_TIME_KEYS_STORED:
                raise KeyRuleError.too_many_one_time_keys(stored)
            if publish.fallback_key is not None:
                key = publish.fallback_key
                await self._db.execute(
                    "INSERT OR REPLACE INTO fallback_keys (user, device, key_id, key, signature) "
                    "VALUES (?, ?, ?, ?, ?)", (user, device, key.id, key.key, key.signature))
        return stored, new is not None or current is not None

    async def _add_one_time_key(self, user: str, device: str, key: OneTimeKey) -> None:
        if await self._fetchone("SELECT 1 FROM claimed WHERE user = ? AND device = ? AND key_id = ?",
                                (user, device, key.id)):
            return  # handed out already: a retried publish must not offer it again
        row = await self._fetchone("SELECT key, signature FROM one_time_keys WHERE user = ? AND device = ? "
                                   "AND key_id = ?", (user, device, key.id))
        if row is None:
            await self._db.execute(
                "INSERT INTO one_time_keys (user, device, key_id, key, signature) VALUES (?, ?, ?, ?, ?)",
                (user, device, key.id, key.key, key.signature))
        elif (row[0], row[1]) != (key.key, key.signature):
            raise KeyRuleError.one_time_key_conflict(key.id)

    # Reads take the writer lock too: on the one shared connection they would
    # otherwise see another operation's uncommitted rows.

    async def count(self, user: str, device: str) -> tuple[int, bool]:
        async with writer_lock(self._db):
            fallback = await self._fetchone("SELECT 1 FROM fallback_keys WHERE user = ? AND device = ?",
                                            (user, device))
            return await self._count(user, device), fallback is not None

    async def device_keys(self, user: str) -> dict[str, dict[str, Any]]:
        query = "SELECT device, signed FROM device_keys WHERE user = ? ORDER BY device"
        async with writer_lock(self._db), self._db.execute(query, (user,)) as cursor:
            return {str(r[0]): json.loads(r[1]) async for r in cursor}

    async def claim(self, user: str, devices: list[str] | None) -> dict[str, dict[str, Any]]:
        claimed: dict[str, dict[str, Any]] = {}
        async with self._transaction("keys.claim"):
            query = "SELECT device FROM device_keys WHERE user = ? ORDER BY device"
            async with self._db.execute(query, (user,)) as cursor:
                keyed = [str(r[0]) async for r in cursor]
            for device in keyed if devices is None else [d for d in devices if d in keyed]:
                row = await self._fetchone(
                    "SELECT rowid, key_id, key, signature FROM one_time_keys WHERE user = ? AND device = ? "
                    "ORDER BY rowid LIMIT 1", (user, device))
                if row is not None:
                    await self._db.execute("DELETE FROM one_time_keys WHERE rowid = ?", (row[0],))
                    await self._db.execute("INSERT OR IGNORE INTO claimed (user, device, key_id) VALUES (?, ?, ?)",
                                           (user, device, row[1]))
                    claimed[device] = claimed_item(OneTimeKey(str(row[1]), str(row[2]), str(row[3])), False)
                    continue
                row = await self._fetchone(
                    "SELECT key_id, key, signature FROM fallback_keys WHERE user = ? AND device = ?", (user, device))
                if row is not None:
                    claimed[device] = claimed_item(OneTimeKey(str(row[0]), str(row[1]), str(row[2])), True)
        return claimed

    async def remove_device(self, user: str, device: str) -> None:
        async with self._transaction("devices.remove"):
            await self._forget_keys(user, device)
            await self._db.execute("DELETE FROM device_keys WHERE user = ? AND device = ?", (user, device))

    async def keyed_devices(self) -> list[tuple[str, str, str]]:
        async with self._db.execute("SELECT user, device, curve25519 FROM device_keys") as cursor:
            return [(str(r[0]), str(r[1]), str(r[2])) async for r in cursor]

    async def export(self) -> list[DeviceKeys]:
        """Every keyed device with its keys, in one read transaction (a consistent snapshot)."""
        async with writer_lock(self._db):
            await self._db.execute("BEGIN")
            try:
                return [await self._export_device(row) for row in await self._fetchall(
                    "SELECT user, device, curve25519, ed25519, signed FROM device_keys ORDER BY user, device", ())]
            finally:
                await self._db.execute("COMMIT")

    async def _export_device(self, row: Any) -> DeviceKeys:
        where = (str(row[0]), str(row[1]))
        otks = await self._fetchall("SELECT key_id, key, signature FROM one_time_keys WHERE user = ? AND device = ? "
                                    "ORDER BY rowid", where)
        fallback = await self._fetchone("SELECT key_id, key, signature FROM fallback_keys WHERE user = ? "
                                        "AND device = ?", where)
        claimed = await self._fetchall("SELECT key_id FROM claimed WHERE user = ? AND device = ? ORDER BY key_id",
                                       where)
        return DeviceKeys(*where, str(row[2]), str(row[3]), json.loads(row[4]), [_key(r) for r in otks],
                          None if fallback is None else _key(fallback), [str(r[0]) for r in claimed])

    async def _forget_keys(self, user: str, device: str) -> None:
        for table in _DEVICE_TABLES:
            await self._db.execute(f"DELETE FROM {table} WHERE user = ? AND device = ?", (user, device))  # noqa: S608 (fixed table names)

    async def _count(self, user: str, device: str) -> int:
        row = await self._fetchone("SELECT COUNT(*) FROM one_time_keys WHERE user = ? AND device = ?", (user, device))
        return int(row[0]) if row else 0

    def _transaction(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        return transaction(self._db, name)


def _key(row: Any) -> OneTimeKey:
    """A (key_id, key, signature) row."""
    return OneTimeKey(str(row[0]), str(row[1]), str(row[2]))
