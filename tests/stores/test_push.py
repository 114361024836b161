"""The ``PushStore`` contract (bridge/push/store.py): one registration per device (a new one replaces
it), a gone mark that a registration clears, one queued wake-up per device, all kept across a restart.
SQLite only: push runs on one process (no Redis push store yet)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.push.core import QueuedWake
from bridge.push.provider import PushTarget
from bridge.push.store import PushStore
from storage.sqlite.db import open_database
from storage.sqlite.push import MIGRATIONS, PUSH_DB, SqlitePushStore
from tests.stores.backends import SQLITE_ONLY, Backend

STORE_BACKENDS = SQLITE_ONLY
PHONE = PushTarget("unifiedpush", "https://ntfy.example/up1", "bob.phone")
TABLET = PushTarget("fcm", "tok:1", "bob.tablet")


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[PushStore]:
    opened = await backend.push()
    try:
        yield opened
    finally:
        await opened.close()


async def loaded(store: PushStore) -> tuple[list[PushTarget], list[QueuedWake], list[str]]:
    targets, wakes, gone = await store.load()
    return sorted(targets, key=lambda t: t.client_id), sorted(wakes, key=lambda w: w.client_id), sorted(gone)


async def test_a_new_store_is_empty(store: PushStore) -> None:
    assert await loaded(store) == ([], [], [])


async def test_a_registration_replaces_the_devices_last(store: PushStore) -> None:
    await store.register(PHONE, 1)
    await store.register(TABLET, 1)
    replaced = PushTarget("apns", "ab" * 32, "bob.phone")
    await store.register(replaced, 2)
    assert (await loaded(store))[0] == [replaced, TABLET]


async def test_unregister_drops_the_registration_and_its_wake_up(store: PushStore) -> None:
    await store.register(PHONE, 1)
    await store.save_wakes([QueuedWake("bob.phone", 5, 10)])
    assert await store.unregister("bob.phone") is True
    assert await store.unregister("bob.phone") is False
    assert await loaded(store) == ([], [], [])


async def test_gone_drops_the_registration_and_a_new_one_clears_the_mark(store: PushStore) -> None:
    await store.register(PHONE, 1)
    await store.save_wakes([QueuedWake("bob.phone", 5, 10)])
    await store.mark_gone("bob.phone")
    assert await loaded(store) == ([], [], ["bob.phone"])
    await store.register(PHONE, 2)
    assert await loaded(store) == ([PHONE], [], [])
    await store.mark_gone("bob.phone")
    await store.clear_gone("bob.phone")
    assert await loaded(store) == ([], [], [])


async def test_one_queued_wake_up_per_device(store: PushStore) -> None:
    await store.register(PHONE, 1)
    await store.register(TABLET, 1)
    await store.save_wakes([QueuedWake("bob.phone", 5, 10), QueuedWake("bob.tablet", 6, 11)])
    await store.save_wakes([QueuedWake("bob.phone", 8, 10, attempts=1)])
    assert (await loaded(store))[1] == [QueuedWake("bob.phone", 8, 10, 1), QueuedWake("bob.tablet", 6, 11)]
    await store.delete_wakes(["bob.tablet", "carol.phone"])
    assert (await loaded(store))[1] == [QueuedWake("bob.phone", 8, 10, 1)]


async def test_everything_is_kept_across_a_restart(backend: Backend) -> None:
    first = await backend.push()
    try:
        await first.register(PHONE, 1)
        await first.register(TABLET, 1)
        await first.save_wakes([QueuedWake("bob.phone", 5, 10, 2)])
        await first.mark_gone("bob.tablet")
    finally:
        await first.close()
    again = await backend.push()
    try:
        assert await loaded(again) == ([PHONE], [QueuedWake("bob.phone", 5, 10, 2)], ["bob.tablet"])
    finally:
        await again.close()


async def test_preview_keys_and_a_wake_up_s_preview_are_kept(backend: Backend) -> None:
    keyed = PushTarget("fcm", "tok:2", "bob.laptop", "k" * 43, "s" * 86)
    first = await backend.push()
    try:
        await first.register(keyed, 1)
        await first.save_wakes([QueuedWake("bob.laptop", 5, 10, preview="c2VhbGVk")])
    finally:
        await first.close()
    again = await backend.push()
    try:
        assert await loaded(again) == ([keyed], [QueuedWake("bob.laptop", 5, 10, preview="c2VhbGVk")], [])
    finally:
        await again.close()


async def test_a_push_db_of_schema_1_is_upgraded_in_place(tmp_path: Path) -> None:
    """The previews migration only adds columns: what an older broker wrote loads without them."""
    db = await open_database(tmp_path / PUSH_DB, MIGRATIONS[:1])
    await db.execute("INSERT INTO registrations VALUES ('bob.phone', 'unifiedpush', 'https://ntfy.example/up1', 1)")
    await db.execute("INSERT INTO wakes VALUES ('bob.phone', 5, 10, 2)")
    await db.commit()
    await db.close()
    store = await SqlitePushStore.open(tmp_path)
    try:
        assert await loaded(store) == ([PHONE], [QueuedWake("bob.phone", 5, 10, 2)], [])
    finally:
        await store.close()
