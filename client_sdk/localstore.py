"""The device's local SQLite store: outbox, staged downlink items, dedup memory, token.

One file per (user, device); it records whose it is and refuses to be opened
for anyone else. Schema changes are numbered migrations tracked in
``PRAGMA user_version``. Every method takes ``lock`` (the SDK calls it from
paho's thread, the dispatcher thread and app threads); ``transaction()`` lets
a caller group several calls atomically.

Tables:
- ``outbox``: messages written by ``send()`` and not yet confirmed ``sent``,
  in the order they were sent (``pos``).
- ``inbox``: staged downlink items (with a ``seq``) stored but not yet handed
  to the app; ``kind`` (``RowKind``) says what the row's text is: the item as
  it arrived, or the SDK's own form of a decrypted (or undecryptable) message.
  Handing an item over removes its row, raises ``last_seq`` and remembers
  ``(from, id)`` of a message in ``handed_ids``, in one transaction.
- ``handed_ids``: (sender, id) of messages handed over recently, to drop
  repeats the server may send under another ``seq``; bounded by count and age.
- ``meta``: identity, ``last_seq`` (highest seq handed over), the device token,
  the Olm account pickle and the store-key salt and check value.
- ``olm_sessions``: one Olm session pickle per (peer user, device, session id).
- ``devices``: the identity keys of peers' devices as first seen (trust on first
  use) and ``device_lists``: whose device lists were fetched and are still fresh.
- ``group_*``: sender keys (Megolm), read and written by ``groupstore``; ``group_members``:
  the members of each group as this device knows them (``groups.Membership``).

After ``unlock`` (the SDK always calls it), outbox bodies, staged items and
the device token are sealed with the store key (``securestore``); Olm pickles
are encrypted by vodozemac with a key derived from it. The file is created
readable by its owner only all the same.
"""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from client_sdk.errors import StoreError
from client_sdk.securestore import CHECK_TEXT, KEY_BYTES, Sealer, derive_key, key_file_key

MEMORY: Final = ":memory:"

MIGRATIONS: Final = (
    """
    CREATE TABLE meta (
        key    TEXT PRIMARY KEY,
        value  TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE outbox (
        pos        INTEGER PRIMARY KEY AUTOINCREMENT,
        id         TEXT NOT NULL UNIQUE,
        recipient  TEXT NOT NULL,
        body       TEXT NOT NULL,
        type       TEXT NOT NULL,
        ts         INTEGER NOT NULL
    );
    CREATE TABLE inbox (
        seq          INTEGER PRIMARY KEY,
        item         TEXT NOT NULL,
        received_ms  INTEGER NOT NULL
    );
    CREATE TABLE handed_ids (
        sender     TEXT NOT NULL,
        id         TEXT NOT NULL,
        handed_ms  INTEGER NOT NULL,
        PRIMARY KEY (sender, id)
    ) WITHOUT ROWID;
    CREATE INDEX handed_ids_by_age ON handed_ids (handed_ms);
    """,
    """
    ALTER TABLE outbox ADD COLUMN bodies TEXT;
    CREATE TABLE olm_sessions (
        user        TEXT NOT NULL,
        device      TEXT NOT NULL,
        session_id  TEXT NOT NULL,
        pickle      TEXT NOT NULL,
        used_ms     INTEGER NOT NULL,
        PRIMARY KEY (user, device, session_id)
    ) WITHOUT ROWID;
    CREATE TABLE devices (
        user        TEXT NOT NULL,
        device      TEXT NOT NULL,
        curve25519  TEXT NOT NULL,
        ed25519     TEXT NOT NULL,
        PRIMARY KEY (user, device)
    ) WITHOUT ROWID;
    CREATE TABLE device_lists (
        user        TEXT PRIMARY KEY,
        fresh       INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
    # Rows staged before this have no kind yet (NULL): ``unlock`` reads them and sets it.
    """
    ALTER TABLE inbox ADD COLUMN kind TEXT;
    """,
    # Sender keys (``groupstore``): pickles encrypted by vodozemac, pending items sealed.
    """
    CREATE TABLE group_outbound (
        group_id    TEXT PRIMARY KEY,
        session_id  TEXT NOT NULL,
        pickle      TEXT NOT NULL,
        created_ms  INTEGER NOT NULL,
        sent        INTEGER NOT NULL,
        holders     TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE group_inbound (
        sender       TEXT NOT NULL,
        device       TEXT NOT NULL,
        session_id   TEXT NOT NULL,
        group_id     TEXT NOT NULL,
        first_index  INTEGER NOT NULL,
        pickle       TEXT NOT NULL,
        PRIMARY KEY (sender, device, session_id)
    ) WITHOUT ROWID;
    CREATE TABLE group_seen (
        sender      TEXT NOT NULL,
        device      TEXT NOT NULL,
        session_id  TEXT NOT NULL,
        idx         INTEGER NOT NULL,
        digest      TEXT NOT NULL,
        PRIMARY KEY (sender, device, session_id, idx)
    ) WITHOUT ROWID;
    CREATE TABLE group_pending (
        pos          INTEGER PRIMARY KEY AUTOINCREMENT,
        sender       TEXT NOT NULL,
        device       TEXT NOT NULL,
        session_id   TEXT NOT NULL,
        item         TEXT NOT NULL
    );
    CREATE INDEX group_pending_by_session ON group_pending (sender, device, session_id);
    """,
    # The members of each group as this device knows them (``groups.Membership``).
    """
    CREATE TABLE group_members (
        group_id  TEXT PRIMARY KEY,
        members   TEXT NOT NULL,
        gseq      INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
    # Push previews (``preview``): the text a sent message's preview is made of (sealed; NULL: the
    # default), and peers' devices' preview keys whose signature verified (``keys`` rule 5).
    """
    ALTER TABLE outbox ADD COLUMN preview TEXT;
    CREATE TABLE preview_keys (
        user    TEXT NOT NULL,
        device  TEXT NOT NULL,
        key     TEXT NOT NULL,
        PRIMARY KEY (user, device)
    ) WITHOUT ROWID;
    """,
)


class RowKind(enum.StrEnum):
    """What the text of an ``inbox`` row is (its ``kind`` column)."""

    WIRE = "wire"
    """The downlink item's JSON, exactly as it arrived."""
    OPENED = "opened"
    """A decrypted message in the SDK's own JSON form (``inbox.opened_row``)."""
    UNDECRYPTABLE = "undecryptable"
    """A message that could not be decrypted, in the SDK's own JSON form (``inbox.undecryptable_row``)."""
    BATCH = "batch"
    """What a group message or key share became (``inbox.batch_row``): a JSON list of opened and
    undecryptable forms, possibly empty (a group message waiting for its key)."""


@dataclass(frozen=True, slots=True)
class OutMessage:
    """A message in the outbox, as it will be published."""

    id: str
    to: str
    body: str
    type: str
    ts: int
    preview: str | None = None
    """The push preview's text as the app gave it (None: the SDK's default; docs/SDK.md)."""


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A peer device's identity keys as this device trusts them (base64)."""

    user: str
    device: str
    curve25519: str
    ed25519: str


@dataclass(frozen=True, slots=True)
class SessionRecord:
    user: str
    device: str
    session_id: str
    pickle: str


@dataclass(frozen=True, slots=True)
class StagedItem:
    seq: int
    kind: RowKind
    item: str
    """JSON text; ``kind`` says which form."""


class LocalStore:
    """Open (creating and migrating if needed) the store at ``path`` for ``user.device``.

    ``path`` None or ``":memory:"`` keeps everything in memory (nothing survives
    the process). Raises ``StoreError`` if the file belongs to another identity,
    was written by a newer SDK, or cannot be opened. Call ``close()`` when done.
    """

    def __init__(self, path: str | os.PathLike[str] | None, user: str, device: str) -> None:
        self.path = MEMORY if path is None else str(path)
        self.lock = threading.RLock()
        self._depth = 0
        self._sealer: Sealer | None = None
        try:
            if self.path != MEMORY:
                _create_private(Path(self.path))
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the local store {self.path}: {exc}") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # the outbox must survive a power cut too
            self._migrate()
            self._claim(f"{user}.{device}")
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot use the local store {self.path}: {exc}") from exc
        except StoreError:
            self._db.close()
            raise

    # --- plumbing ---------------------------------------------------------------

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the local store {self.path} has schema version {version}; this SDK knows up to "
                f"{len(MIGRATIONS)}: upgrade the SDK")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            # executescript commits first; the version bump is part of the same script.
            self._db.executescript(f"BEGIN IMMEDIATE;\n{script};\nPRAGMA user_version = {number};\nCOMMIT;")

    def _claim(self, identity: str) -> None:
        with self.transaction():
            owner = self._meta("identity")
            if owner is None:
                self._set_meta("identity", identity)
            elif owner != identity:
                raise StoreError(f"the local store {self.path} belongs to {owner}, not {identity}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the lock and run the body in one SQLite transaction (nesting joins the outer one)."""
        with self.lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                self._depth = 0

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self._db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        with self.lock:
            self._db.close()

    # --- encryption at rest (securestore) ----------------------------------------------

    def unlock(self, secret: bytes | None) -> Sealer:
        """Load the store key (see ``securestore``) and seal everything written from now on.

        ``secret`` None: a random key in ``<store>.key`` (in memory for an
        in-memory store). Raises StoreError if the store was sealed with
        another key (a different secret, or none). Call once, before use.
        """
        with self.transaction():
            if secret is not None:
                salt = self._meta("kdf_salt")
                if salt is None:
                    salt = secrets.token_hex(16)
                    self._set_meta("kdf_salt", salt)
                key = derive_key(secret, bytes.fromhex(salt))
            elif self.path == MEMORY:
                key = secrets.token_bytes(KEY_BYTES)
            else:
                key = key_file_key(Path(self.path + ".key"))
            sealer = Sealer(key)
            check = self._meta("key_check")
            if check is None:
                self._seal_existing(sealer)
                self._set_meta("key_check", sealer.seal(CHECK_TEXT, "meta:key_check"))
            else:
                try:
                    sealer.open(check, "meta:key_check")
                except StoreError:
                    raise StoreError(
                        f"the local store {self.path} was sealed with another key: a different store_secret "
                        "(or none, or the key file was lost)") from None
            self._sealer = sealer
            self._kind_old_rows()
        return sealer

    def _seal_existing(self, sealer: Sealer) -> None:
        """Seal what a store written before sealing existed holds (the first unlock only)."""
        for msg_id, body in self._db.execute("SELECT id, body FROM outbox").fetchall():
            self._db.execute("UPDATE outbox SET body = ? WHERE id = ?", (sealer.seal(body, f"outbox:{msg_id}"), msg_id))
        for seq, item in self._db.execute("SELECT seq, item FROM inbox").fetchall():
            self._db.execute("UPDATE inbox SET item = ? WHERE seq = ?", (sealer.seal(item, f"inbox:{seq}"), seq))
        token = self._meta("token")
        if token is not None:
            self._set_meta("token", sealer.seal(token, "meta:token"))

    def _kind_old_rows(self) -> None:
        """Set the ``kind`` of rows staged before the column existed (schema 2). The SDK wrote its
        own forms with ``json.dumps``' spacing and a ``kind`` field first; items from the wire are
        compact (``{"kind":"msg",...}``), so the start of the text tells them apart, once."""
        rows = self._db.execute("SELECT seq, item FROM inbox WHERE kind IS NULL").fetchall()
        for seq, sealed in rows:
            text = self._open(str(sealed), f"inbox:{seq}")
            kind = next((k for k in (RowKind.OPENED, RowKind.UNDECRYPTABLE)
                         if text.startswith(f'{{"kind": "{k.value}", ')), RowKind.WIRE)
            self._db.execute("UPDATE inbox SET kind = ? WHERE seq = ?", (kind.value, seq))

    def execute(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Run one statement on the SDK's own tables (``groupstore``); its rows, if any."""
        with self.lock:
            return self._db.execute(sql, params).fetchall()

    def seal(self, text: str, where: str) -> str:
        """``text`` sealed with the store key, bound to ``where`` (the table and row)."""
        return self._seal(text, where)

    def unseal(self, value: str, where: str) -> str:
        return self._open(value, where)

    def _seal(self, text: str, where: str) -> str:
        return text if self._sealer is None else self._sealer.seal(text, where)

    def _open(self, value: str, where: str) -> str:
        return value if self._sealer is None else self._sealer.open(value, where)

    # --- meta ---------------------------------------------------------------------

    def token(self) -> str | None:
        """The device token kept from the last ``auth.token``, if any."""
        with self.lock:
            value = self._meta("token")
            return None if value is None else self._open(value, "meta:token")

    def set_token(self, token: str | None) -> None:
        with self.lock:
            self._set_meta("token", None if token is None else self._seal(token, "meta:token"))

    def olm_account(self) -> str | None:
        """The Olm account pickle (encrypted by vodozemac), if one was made."""
        with self.lock:
            return self._meta("olm_account")

    def set_olm_account(self, pickle: str) -> None:
        with self.lock:
            self._set_meta("olm_account", pickle)

    def get_meta(self, key: str) -> str | None:
        with self.lock:
            return self._meta(key)

    def set_meta(self, key: str, value: str | None) -> None:
        with self.lock:
            self._set_meta(key, value)

    def last_seq(self) -> int:
        """The highest ``seq`` handed to the app (0 before the first)."""
        with self.lock:
            value = self._meta("last_seq")
            return int(value) if value is not None else 0

    # --- outbox -----------------------------------------------------------------------

    def outbox_add(self, message: OutMessage) -> None:
        preview = None if message.preview is None else self._seal(message.preview, f"outbox-preview:{message.id}")
        with self.lock:
            self._db.execute(
                "INSERT INTO outbox (id, recipient, body, type, ts, preview) VALUES (?, ?, ?, ?, ?, ?)",
                (message.id, message.to, self._seal(message.body, f"outbox:{message.id}"), message.type, message.ts,
                 preview))

    def outbox_all(self) -> list[OutMessage]:
        """Every message in the outbox, oldest first."""
        with self.lock:
            rows = self._db.execute("SELECT id, recipient, body, type, ts, preview FROM outbox ORDER BY pos").fetchall()
            return [OutMessage(str(r[0]), str(r[1]), self._open(str(r[2]), f"outbox:{r[0]}"), str(r[3]), int(r[4]),
                               None if r[5] is None else self._open(str(r[5]), f"outbox-preview:{r[0]}"))
                    for r in rows]

    def outbox_bodies(self, msg_id: str) -> str | None:
        """The encrypted ``bodies`` (JSON) made for this message, if it was encrypted already."""
        with self.lock:
            row = self._db.execute("SELECT bodies FROM outbox WHERE id = ?", (msg_id,)).fetchone()
            return None if row is None or row[0] is None else str(row[0])

    def set_outbox_bodies(self, msg_id: str, bodies: str | None) -> None:
        with self.lock:
            self._db.execute("UPDATE outbox SET bodies = ? WHERE id = ?", (bodies, msg_id))

    def reseal_outbox(self, users: set[str], me: str) -> None:
        """Forget the ciphertexts of queued messages whose device set involves ``users`` (all of them if
        ``me`` is one: my other devices are in every message), so each is encrypted again before it goes.
        Group messages keep theirs: their ciphertext is one for every device, the server checks no
        device set, and sealing one again would spend another Megolm index on it."""
        with self.lock:
            if me in users:
                self._db.execute("UPDATE outbox SET bodies = NULL WHERE recipient NOT LIKE 'g:%'")
            else:
                self._db.executemany("UPDATE outbox SET bodies = NULL WHERE recipient = ?", [(u,) for u in users])

    def outbox_remove(self, ids: list[str]) -> None:
        with self.transaction():
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    # --- inbox ------------------------------------------------------------------------

    def is_staged(self, seq: int) -> bool:
        with self.lock:
            return self._db.execute("SELECT 1 FROM inbox WHERE seq = ?", (seq,)).fetchone() is not None

    def stage(self, seq: int, item: str, now_ms: int) -> None:
        """Store a downlink item as it arrived (``RowKind.WIRE``)."""
        with self.lock:
            self._db.execute("INSERT INTO inbox (seq, kind, item, received_ms) VALUES (?, ?, ?, ?)",
                             (seq, RowKind.WIRE.value, self._seal(item, f"inbox:{seq}"), now_ms))

    def restage(self, row: StagedItem) -> None:
        """Replace a staged item (with its decrypted form); callers group it with the session update."""
        with self.lock:
            self._db.execute("UPDATE inbox SET kind = ?, item = ? WHERE seq = ?",
                             (row.kind.value, self._seal(row.item, f"inbox:{row.seq}"), row.seq))

    def highest_staged(self) -> int:
        with self.lock:
            return int(self._db.execute("SELECT coalesce(max(seq), 0) FROM inbox").fetchone()[0])

    def staged(self, upto_seq: int | None = None, limit: int = 100) -> list[StagedItem]:
        """Stored items not yet handed over, lowest ``seq`` first."""
        with self.lock:
            if upto_seq is None:
                rows = self._db.execute("SELECT seq, kind, item FROM inbox ORDER BY seq LIMIT ?", (limit,)).fetchall()
            else:
                rows = self._db.execute("SELECT seq, kind, item FROM inbox WHERE seq <= ? ORDER BY seq LIMIT ?",
                                        (upto_seq, limit)).fetchall()
            return [StagedItem(int(r[0]), RowKind(r[1]), self._open(str(r[2]), f"inbox:{r[0]}")) for r in rows]

    def mark_handed(self, seq: int, keys: Sequence[tuple[str, str]], now_ms: int) -> None:
        """Record that item ``seq`` was handed over (or skipped), with the dedup ``keys`` of what it
        held: one transaction."""
        with self.transaction():
            self._db.execute("DELETE FROM inbox WHERE seq = ?", (seq,))
            last = self._meta("last_seq")
            if last is None or int(last) < seq:
                self._set_meta("last_seq", str(seq))
            self._db.executemany("INSERT OR REPLACE INTO handed_ids (sender, id, handed_ms) VALUES (?, ?, ?)",
                                 [(sender, msg_id, now_ms) for sender, msg_id in keys])

    def was_handed(self, sender: str, msg_id: str) -> bool:
        with self.lock:
            row = self._db.execute(
                "SELECT 1 FROM handed_ids WHERE sender = ? AND id = ?", (sender, msg_id)).fetchone()
            return row is not None

    def prune_handed_ids(self, older_than_ms: int, keep: int) -> int:
        """Forget ids handed before ``older_than_ms`` and all but the newest ``keep``."""
        with self.transaction():
            cursor = self._db.execute("DELETE FROM handed_ids WHERE handed_ms < ?", (older_than_ms,))
            removed = cursor.rowcount
            cursor = self._db.execute(
                "DELETE FROM handed_ids WHERE (sender, id) IN (SELECT sender, id FROM handed_ids "
                "ORDER BY handed_ms DESC LIMIT -1 OFFSET ?)", (keep,))
            return removed + max(cursor.rowcount, 0)

    def handed_id_count(self) -> int:
        with self.lock:
            return int(self._db.execute("SELECT count(*) FROM handed_ids").fetchone()[0])

    # --- peers' devices and Olm sessions ----------------------------------------------------

    def devices_of(self, user: str) -> dict[str, DeviceRecord]:
        with self.lock:
            rows = self._db.execute(
                "SELECT device, curve25519, ed25519 FROM devices WHERE user = ?", (user,)).fetchall()
        return {str(r[0]): DeviceRecord(user, str(r[0]), str(r[1]), str(r[2])) for r in rows}

    def put_device(self, record: DeviceRecord) -> None:
        with self.lock:
            self._db.execute(
                "INSERT OR REPLACE INTO devices (user, device, curve25519, ed25519) VALUES (?, ?, ?, ?)",
                (record.user, record.device, record.curve25519, record.ed25519))

    def forget_device(self, user: str, device: str) -> None:
        """Drop a device and its sessions."""
        with self.transaction():
            self._db.execute("DELETE FROM devices WHERE user = ? AND device = ?", (user, device))
            self._db.execute("DELETE FROM olm_sessions WHERE user = ? AND device = ?", (user, device))

    def list_is_fresh(self, user: str) -> bool:
        with self.lock:
            row = self._db.execute("SELECT fresh FROM device_lists WHERE user = ?", (user,)).fetchone()
            return row is not None and bool(row[0])

    def set_list_fresh(self, user: str, fresh: bool) -> None:
        with self.lock:
            self._db.execute("INSERT OR REPLACE INTO device_lists (user, fresh) VALUES (?, ?)", (user, int(fresh)))

    def sessions_of(self, user: str, device: str) -> list[SessionRecord]:
        """Olm sessions with one device, most recently used first."""
        with self.lock:
            rows = self._db.execute(
                "SELECT session_id, pickle FROM olm_sessions WHERE user = ? AND device = ? ORDER BY used_ms DESC",
                (user, device)).fetchall()
        return [SessionRecord(user, device, str(r[0]), str(r[1])) for r in rows]

    def put_session(self, record: SessionRecord, used_ms: int) -> None:
        with self.lock:
            self._db.execute(
                "INSERT OR REPLACE INTO olm_sessions (user, device, session_id, pickle, used_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (record.user, record.device, record.session_id, record.pickle, used_ms))


def _create_private(path: Path) -> None:
    """Create the store file readable by its owner only (it holds the device token)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
