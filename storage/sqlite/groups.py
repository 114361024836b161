"""Groups in SQLite: ``bridge.groups.store.GroupStore`` in ``groups.db`` (the data directory; WAL,
``secure_delete``: see storage/sqlite/db.py).

A group is a row of ``groups`` (its name and gseq) and a row per member in ``group_members``
(join rank, admin flag), deleted with it. A user's groups are found by the index on
``group_members (user)``: there is no second copy to keep in step. Every write is one named
transaction: a commit checks the gseq (compare-and-set), the members' group counts and writes
the change; ``next_gseq`` checks the sender and takes the gseq in one transaction.

``group_log`` is the outbox of the one-process server (bridge/groups/service.py): a change's
events, with the users who get them, written in the change's own transaction, so that a crash
before they are staged (staging.db) cannot lose them; dropped once staged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from bridge.groups.core import Decision, Group, GroupRefused, joins, leaves
from bridge.messaging.records import event_item, event_row
from chatproto import GroupItem
from storage.sqlite.db import SqliteFile, transaction, writer_lock

GROUPS_DB = "groups.db"

MIGRATIONS = (
    """
    CREATE TABLE groups (
        gid         TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        gseq        INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE group_members (
        gid         TEXT NOT NULL REFERENCES groups (gid) ON DELETE CASCADE,
        user        TEXT NOT NULL,
        joined      INTEGER NOT NULL,
        admin       INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (gid, user)
    ) WITHOUT ROWID;
    CREATE INDEX group_members_by_user ON group_members (user, gid)
    """,
    """
    CREATE TABLE group_log (
        gid         TEXT NOT NULL,
        gseq        INTEGER NOT NULL,
        event       TEXT NOT NULL,
        notify      TEXT NOT NULL,
        PRIMARY KEY (gid, gseq)
    ) WITHOUT ROWID
    """,
)


class SqliteGroupStore(SqliteFile):
    FILE = GROUPS_DB
    MIGRATIONS = MIGRATIONS

    # Reads take the writer lock too: on the one shared connection they would otherwise see
    # another operation's uncommitted rows (as in storage/sqlite/keys.py).

    async def load(self, group: str) -> Group | None:
        async with writer_lock(self._db):
            return await self._load(group)

    async def count(self) -> int:
        """How many groups there are (``chat-broker migrate`` refuses a folder with any)."""
        async with writer_lock(self._db):
            row = await self._fetchone("SELECT COUNT(*) FROM groups", ())
        return int(row[0])

    async def _load(self, group: str) -> Group | None:
        row = await self._fetchone("SELECT name, created_at, gseq FROM groups WHERE gid = ?", (group,))
        if row is None:
            return None
        members = await self._fetchall("SELECT user, admin FROM group_members WHERE gid = ? ORDER BY joined",
                                       (group,))
        return Group(group, str(row[0]), int(row[1]), int(row[2]), tuple(str(m[0]) for m in members),
                     frozenset(str(m[0]) for m in members if m[1]))

    async def commit(self, before: Group | None, after: Group | None, max_groups_per_user: int) -> bool:
        async with transaction(self._db, "groups.commit"):
            return await self._commit(before, after, max_groups_per_user)

    async def commit_logged(self, before: Group | None, decision: Decision, max_groups_per_user: int) -> bool:
        async with transaction(self._db, "groups.commit_logged"):
            if not await self._commit(before, decision.after, max_groups_per_user):
                return False
            notify = json.dumps(decision.notify)
            await self._db.executemany(
                "INSERT OR REPLACE INTO group_log (gid, gseq, event, notify) VALUES (?, ?, ?, ?)",
                [(e.group, e.gseq, json.dumps(event_row(e)), notify) for e in decision.events])
        return True

    async def logged(self) -> list[tuple[GroupItem, tuple[str, ...]]]:
        async with writer_lock(self._db):
            rows = await self._fetchall("SELECT event, notify FROM group_log ORDER BY gid, gseq", ())
        return [(event_item(0, json.loads(r[0])), tuple(json.loads(r[1]))) for r in rows]

    async def forget_logged(self, staged: dict[str, int]) -> None:
        async with transaction(self._db, "groups.forget_logged"):
            await self._db.executemany("DELETE FROM group_log WHERE gid = ? AND gseq <= ?", list(staged.items()))

    async def _commit(self, before: Group | None, after: Group | None, max_groups_per_user: int) -> bool:
        changed = after if after is not None else before
        if changed is None:
            raise ValueError("a commit needs a group before or after it")
        gid = changed.id
        row = await self._fetchone("SELECT gseq FROM groups WHERE gid = ?", (gid,))
        if (None if row is None else int(row[0])) != (None if before is None else before.gseq):
            return False
        if after is None:
            await self._db.execute("DELETE FROM groups WHERE gid = ?", (gid,))  # members: ON DELETE CASCADE
            return True
        added = joins(before, after)
        await self._check_counts([u for u, _ in added], max_groups_per_user)
        await self._db.execute(
            "INSERT INTO groups (gid, name, created_at, gseq) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (gid) DO UPDATE SET name = excluded.name, gseq = excluded.gseq",
            (gid, after.name, after.created_at, after.gseq))
        await self._db.executemany("DELETE FROM group_members WHERE gid = ? AND user = ?",
                                   [(gid, u) for u in leaves(before, after)])
        await self._db.executemany("INSERT INTO group_members (gid, user, joined) VALUES (?, ?, ?)",
                                   [(gid, u, rank) for u, rank in added])
        await self._db.execute("UPDATE group_members SET admin = (user IN (SELECT value FROM json_each(?))) "
                               "WHERE gid = ?", (_json_list(after.admins), gid))
        return True

    async def _check_counts(self, users: list[str], limit: int) -> None:
        if not users:
            return
        full = await self._fetchall(
            "SELECT user FROM group_members WHERE user IN (SELECT value FROM json_each(?)) "
            "GROUP BY user HAVING COUNT(*) >= ?", (_json_list(users), limit))
        if full:
            raise GroupRefused.too_many_groups([str(r[0]) for r in full], limit)

    async def next_gseq(self, group: str, sender: str) -> tuple[int, list[str]] | None:
        async with transaction(self._db, "groups.next_gseq"):
            if not await self._fetchone("SELECT 1 FROM group_members WHERE gid = ? AND user = ?", (group, sender)):
                return None
            row = await self._fetchone("UPDATE groups SET gseq = gseq + 1 WHERE gid = ? RETURNING gseq", (group,))
            members = await self._fetchall("SELECT user FROM group_members WHERE gid = ? ORDER BY joined", (group,))
        return int(row[0]), [str(m[0]) for m in members]

    async def is_member(self, group: str, user: str) -> bool:
        async with writer_lock(self._db):
            return await self._fetchone("SELECT 1 FROM group_members WHERE gid = ? AND user = ?",
                                        (group, user)) is not None

    async def groups_of(self, user: str) -> list[str]:
        async with writer_lock(self._db):
            return [str(r[0]) for r in await self._fetchall(
                "SELECT gid FROM group_members WHERE user = ? ORDER BY gid", (user,))]


def _json_list(values: Iterable[str]) -> str:
    """Strings as one JSON parameter (read with ``json_each``): no limit on the number of SQL variables."""
    return json.dumps(sorted(values))
