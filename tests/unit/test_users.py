"""The users database: one transaction per operation, devices known on first login, tokens revoked on passwd."""

import os
import stat
from pathlib import Path

import pytest

from bridge.store import UserExistsError
from storage.sqlite.users import SqliteUserStore, UnknownUserError, load_or_create_secret


async def test_user_lifecycle(tmp_path: Path) -> None:
    store = await SqliteUserStore.open(tmp_path)
    try:
        await store.add_user("alice", "h1")
        with pytest.raises(UserExistsError):
            await store.add_user("alice", "h2")
        assert await store.password_hash("alice") == "h1"
        assert await store.record_login("alice", "phone") is True
        assert await store.record_login("alice", "phone") is False
        await store.set_token_digest("alice", "phone", "d1")
        assert (await store.device("alice", "phone")).token_digest == "d1"  # type: ignore[union-attr]
        await store.set_password("alice", "h3")
        assert (await store.device("alice", "phone")).token_digest is None  # type: ignore[union-attr]
        added, existing = await store.add_users([("bob", "x"), ("alice", "y"), ("carol", "z")])
        assert (added, existing) == (2, ["alice"])
        assert [(u.name, u.devices) for u in await store.list_users()] == [("alice", 1), ("bob", 0), ("carol", 0)]
        await store.delete_user("alice")
        assert await store.device("alice", "phone") is None  # devices go with their user
        with pytest.raises(UnknownUserError):
            await store.delete_user("alice")
        with pytest.raises(UnknownUserError):
            await store.set_password("nobody", "h")
    finally:
        await store.close()


async def test_schema_version_and_pragmas(tmp_path: Path) -> None:
    store = await SqliteUserStore.open(tmp_path)
    await store.close()
    store = await SqliteUserStore.open(tmp_path)  # reopening runs no migration twice
    try:
        db = store._db
        assert (await (await db.execute("PRAGMA user_version")).fetchone())[0] == 1  # type: ignore[index]
        assert (await (await db.execute("PRAGMA journal_mode")).fetchone())[0] == "wal"  # type: ignore[index]
        assert (await (await db.execute("PRAGMA secure_delete")).fetchone())[0] == 1  # type: ignore[index]
    finally:
        await store.close()


def test_server_secret_is_private_and_stable(tmp_path: Path) -> None:
    first = load_or_create_secret(tmp_path)
    assert len(first) == 32 and load_or_create_secret(tmp_path) == first
    mode = os.stat(tmp_path / "server.key").st_mode
    assert stat.S_IMODE(mode) == 0o600
