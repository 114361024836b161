"""The ``PresenceStore`` contract (bridge/presence/store.py): last seen times that never move backwards,
one privacy setting per user, contact lists edited by adding and removing, all kept across a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bridge.presence.store import PresenceSnapshot, PresenceStore
from tests.stores.backends import Backend


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[PresenceStore]:
    opened = await backend.presence()
    try:
        yield opened
    finally:
        await opened.close()


def ordered(snapshot: PresenceSnapshot) -> tuple[list[tuple[str, int]], list[tuple[str, str]], list[tuple[str, str]]]:
    return sorted(snapshot.last_seen), sorted(snapshot.settings), sorted(snapshot.contacts)


async def test_a_new_store_is_empty(store: PresenceStore) -> None:
    assert ordered(await store.load()) == ([], [], [])


async def test_last_seen_never_moves_backwards(store: PresenceStore) -> None:
    await store.save_last_seen([("alice", 100), ("bob", 50)])
    await store.save_last_seen([("alice", 90), ("bob", 70), ("carol", 1)])  # a late batch for alice
    assert ordered(await store.load())[0] == [("alice", 100), ("bob", 70), ("carol", 1)]


async def test_a_privacy_setting_replaces_the_last(store: PresenceStore) -> None:
    await store.set_privacy("alice", "contacts")
    await store.set_privacy("bob", "everyone")
    await store.set_privacy("alice", "nobody")
    assert ordered(await store.load())[1] == [("alice", "nobody"), ("bob", "everyone")]


async def test_contacts_are_added_once_and_removed(store: PresenceStore) -> None:
    await store.add_contacts("alice", ["bob", "carol"])
    await store.add_contacts("alice", ["bob"])
    await store.add_contacts("bob", ["carol"])
    await store.remove_contacts("alice", ["carol", "dave"])
    assert ordered(await store.load())[2] == [("alice", "bob"), ("bob", "carol")], "only alice's carol went"


async def test_presence_survives_reopening(backend: Backend) -> None:
    first = await backend.presence()
    try:
        await first.save_last_seen([("alice", 100)])
        await first.set_privacy("alice", "nobody")
        await first.add_contacts("alice", ["bob"])
    finally:
        await first.close()
    again = await backend.presence()
    try:
        assert ordered(await again.load()) == ([("alice", 100)], [("alice", "nobody")], [("alice", "bob")])
    finally:
        await again.close()
