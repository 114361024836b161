"""The media metadata in SQLite: ``bridge.media.store.MediaStore`` in ``media.db`` (the data directory).

One named transaction per operation, ``synchronous=FULL``: an upload's row and a sealed blob's
readers and waiting devices survive a SIGKILL once the call returned. An upload's offset is not
here: it is the staged size the ``BlobStore`` keeps durable.
"""

from __future__ import annotations

from typing import Any

import aiosqlite

from bridge.media.core import Blob, Sealed, Upload
from bridge.store import StoreError
from storage.sqlite.db import SqliteFile, transaction

MEDIA_DB = "media.db"

MIGRATIONS = (
    """
    CREATE TABLE uploads (
        id          TEXT PRIMARY KEY,
        user        TEXT NOT NULL,
        device      TEXT NOT NULL,
        to_id       TEXT NOT NULL,
        size        INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL,
        touched_ms  INTEGER NOT NULL,
        blob        TEXT
    ) WITHOUT ROWID;
    CREATE TABLE blobs (
        sha256      TEXT PRIMARY KEY,
        owner       TEXT NOT NULL,
        size        INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL,
        expires_ms  INTEGER NOT NULL,
        deleted     INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE INDEX blobs_expiry ON blobs (deleted, expires_ms);
    CREATE TABLE readers (sha256 TEXT NOT NULL, user TEXT NOT NULL, PRIMARY KEY (sha256, user)) WITHOUT ROWID;
    CREATE TABLE waiting (sha256 TEXT NOT NULL, device TEXT NOT NULL, PRIMARY KEY (sha256, device)) WITHOUT ROWID;
    CREATE INDEX waiting_device ON waiting (device)
    """,
    # The quota charge of a blob (at least media.min_charge_bytes); a blob of before was charged its size.
    "ALTER TABLE blobs ADD COLUMN charge INTEGER NOT NULL DEFAULT 0; UPDATE blobs SET charge = size",
    # The digest a seal moves the upload's bytes under, written before they move (Upload.sealing).
    "ALTER TABLE uploads ADD COLUMN sealing TEXT",
)

_BLOB = "SELECT sha256, owner, size, created_ms, expires_ms, charge, deleted FROM blobs"
_UNWAITED = (_BLOB + " WHERE sha256 = ? AND deleted = 0"  # noqa: S608 (constants only)
             " AND NOT EXISTS (SELECT 1 FROM waiting WHERE waiting.sha256 = blobs.sha256)")
_EXPIRED = _BLOB + " WHERE deleted = 0 AND expires_ms <= ?"
_UPLOAD = "SELECT id, user, device, to_id, size, created_ms, touched_ms, blob, sealing FROM uploads"


def _upload(row: Any) -> Upload:
    return Upload(str(row[0]), str(row[1]), str(row[2]), str(row[3]), int(row[4]), int(row[5]), int(row[6]),
                  None if row[8] is None else str(row[8]))


def _blob(row: Any) -> Blob:
    return Blob(str(row[0]), str(row[1]), int(row[2]), int(row[3]), int(row[4]), int(row[5]), bool(row[6]))


class SqliteMediaStore(SqliteFile):
    FILE = MEDIA_DB
    MIGRATIONS = MIGRATIONS

    async def add_upload(self, upload: Upload) -> None:
        async with transaction(self._db, "media.upload"):
            await self._db.execute(
                "INSERT INTO uploads (id, user, device, to_id, size, created_ms, touched_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (upload.id, upload.user, upload.device, upload.to, upload.size, upload.created_ms, upload.touched_ms))

    async def touch_upload(self, upload: str, now_ms: int) -> None:
        async with transaction(self._db, "media.touch"):
            await self._db.execute("UPDATE uploads SET touched_ms = ? WHERE id = ?", (now_ms, upload))

    async def drop_upload(self, upload: str) -> None:
        async with transaction(self._db, "media.drop_upload"):
            await self._db.execute("DELETE FROM uploads WHERE id = ?", (upload,))

    async def sealing(self, upload: str, sha256: str) -> None:
        async with transaction(self._db, "media.sealing"):
            await self._db.execute("UPDATE uploads SET sealing = ? WHERE id = ? AND blob IS NULL", (sha256, upload))

    async def seal(self, upload: str, sealed: Sealed) -> bool:
        blob = sealed.blob
        async with transaction(self._db, "media.seal"):
            await self._db.execute("UPDATE uploads SET blob = ?, touched_ms = ? WHERE id = ?",
                                   (blob.sha256, blob.created_ms, upload))
            async with self._db.execute("SELECT deleted FROM blobs WHERE sha256 = ?", (blob.sha256,)) as cursor:
                row = await cursor.fetchone()
            new = row is None or bool(row[0])
            if new:  # unknown, or deleted and uploaded again: a fresh blob
                await self._db.execute(
                    "INSERT OR REPLACE INTO blobs (sha256, owner, size, created_ms, expires_ms, charge, deleted) "
                    "VALUES (?, ?, ?, ?, ?, ?, 0)",
                    (blob.sha256, blob.owner, blob.size, blob.created_ms, blob.expires_ms, blob.charge))
            await self._db.executemany("INSERT OR IGNORE INTO readers (sha256, user) VALUES (?, ?)",
                                       [(blob.sha256, user) for user in sealed.readers])
            await self._db.executemany("INSERT OR IGNORE INTO waiting (sha256, device) VALUES (?, ?)",
                                       [(blob.sha256, device) for device in sealed.waiting])
        return new

    async def sealed(self, upload: str) -> tuple[Upload, str] | None:
        rows = await self._read(_UPLOAD + " WHERE id = ? AND blob IS NOT NULL", (upload,))
        return (_upload(rows[0]), str(rows[0][7])) if rows else None

    async def blob(self, sha256: str) -> Blob | None:
        rows = await self._read(_BLOB + " WHERE sha256 = ?", (sha256,))
        return _blob(rows[0]) if rows else None

    async def is_reader(self, sha256: str, user: str) -> bool:
        return bool(await self._read("SELECT 1 FROM readers WHERE sha256 = ? AND user = ?", (sha256, user)))

    async def fetched(self, sha256: str, client_id: str) -> Blob | None:
        async with transaction(self._db, "media.fetched"):
            cursor = await self._db.execute("DELETE FROM waiting WHERE sha256 = ? AND device = ?", (sha256, client_id))
            if cursor.rowcount == 0:
                return None
            done = await self._delete_if_done([sha256])
        return done[0] if done else None

    async def remove_devices(self, client_ids: list[str]) -> list[Blob]:
        async with transaction(self._db, "media.remove_devices"):
            touched: set[str] = set()
            for device in client_ids:
                async with self._db.execute("SELECT sha256 FROM waiting WHERE device = ?", (device,)) as cursor:
                    touched.update(str(r[0]) for r in await cursor.fetchall())
                await self._db.execute("DELETE FROM waiting WHERE device = ?", (device,))
            return await self._delete_if_done(sorted(touched))

    async def _delete_if_done(self, shas: list[str]) -> list[Blob]:
        """Inside a transaction: mark deleted the live blobs of ``shas`` nobody waits for."""
        done = []
        for sha in shas:
            async with self._db.execute(_UNWAITED, (sha,)) as cursor:
                row = await cursor.fetchone()
            if row is not None:
                done.append(_blob(row))
                await self._db.execute("UPDATE blobs SET deleted = 1 WHERE sha256 = ?", (sha,))
        return done

    async def expire(self, now_ms: int) -> list[Blob]:
        async with transaction(self._db, "media.expire"):
            async with self._db.execute(_EXPIRED, (now_ms,)) as cursor:
                expired = [_blob(r) for r in await cursor.fetchall()]
            for blob in expired:
                await self._db.execute("UPDATE blobs SET deleted = 1 WHERE sha256 = ?", (blob.sha256,))
                await self._db.execute("DELETE FROM waiting WHERE sha256 = ?", (blob.sha256,))
        return expired

    async def forget(self, before_ms: int) -> list[str]:
        async with transaction(self._db, "media.forget"):
            async with self._db.execute("SELECT sha256 FROM blobs WHERE deleted = 1 AND expires_ms < ?",
                                        (before_ms,)) as cursor:
                gone = [str(r[0]) for r in await cursor.fetchall()]
            for sha in gone:
                await self._db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha,))
                await self._db.execute("DELETE FROM readers WHERE sha256 = ?", (sha,))
                await self._db.execute("DELETE FROM waiting WHERE sha256 = ?", (sha,))
        return gone

    async def load(self) -> tuple[list[Upload], dict[str, int], int, int]:
        uploads = [_upload(r) for r in await self._read(_UPLOAD + " WHERE blob IS NULL", ())]
        owners = {str(r[0]): int(r[1]) for r in await self._read(
            "SELECT owner, SUM(charge) FROM blobs WHERE deleted = 0 GROUP BY owner", ())}
        count, stored = (await self._read("SELECT COUNT(*), TOTAL(size) FROM blobs WHERE deleted = 0", ()))[0]
        return uploads, owners, int(count), int(stored)

    async def sealed_uploads(self, before_ms: int) -> list[str]:
        return [str(r[0]) for r in await self._read(
            "SELECT id FROM uploads WHERE blob IS NOT NULL AND touched_ms < ?", (before_ms,))]

    async def waiting_devices(self) -> set[str]:
        return {str(r[0]) for r in await self._read("SELECT DISTINCT device FROM waiting", ())}

    async def _read(self, query: str, params: tuple[Any, ...]) -> list[Any]:
        try:
            return await self._fetchall(query, params)
        except aiosqlite.Error as exc:
            raise StoreError(f"media.db: cannot read: {exc}") from exc
