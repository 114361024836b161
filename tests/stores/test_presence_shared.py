"""The per-user operations cluster presence adds to the presence store
(``bridge.cluster.presence_state.SharedPresenceStore``), which only the Redis store implements:
a read with its version, interests that run out, foreground leases per node, contact edits
bounded by a limit in one step."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import pytest

from bridge.cluster.presence_state import SharedPresenceStore, SharedState
from tests.stores.backends import Backend

STORE_BACKENDS = ["redis"]


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[SharedPresenceStore]:
    opened = cast(SharedPresenceStore, await backend.presence())
    try:
        yield opened
    finally:
        await opened.close()


async def test_an_unknown_user_reads_as_the_defaults(store: SharedPresenceStore) -> None:
    assert await store.look("nobody-here", "n1", 0) == SharedState(0, None, "contacts", frozenset(), {})


async def test_every_change_moves_the_version_and_shows_in_one_read(store: SharedPresenceStore) -> None:
    await store.save_last_seen([("alice", 100)])
    await store.set_privacy("alice", "everyone")
    assert await store.change_contacts("alice", ["bob", "carol", "bob"], True, None) == (2, 2)
    state = await store.look("alice", "n1", 0)
    assert (state.last_seen, state.setting, state.contacts) == (100, "everyone", {"bob", "carol"})
    await store.save_last_seen([("alice", 50)])
    assert (await store.look("alice", "n1", 0)).version == state.version, "a time that does not move changes nothing"
    assert await store.change_contacts("alice", ["carol", "dave"], False, None) == (1, 1)
    assert (await store.look("alice", "n1", 0)).version > state.version


async def test_contacts_stop_at_the_limit_with_nothing_added(store: SharedPresenceStore) -> None:
    assert await store.change_contacts("alice", ["b", "c"], True, 3) == (2, 2)
    assert await store.change_contacts("alice", ["c", "d", "e"], True, 3) is None
    assert await store.change_contacts("alice", ["b", "c", "d"], True, 3) == (1, 3), "known ones do not count"
    assert await store.change_contacts("alice", [], False, None) == (0, 3)


async def test_interest_is_registered_by_a_look_and_runs_out(store: SharedPresenceStore) -> None:
    await store.look("alice", "n1", 1_000)
    await store.look("alice", "n2", 5_000)
    await store.look("alice", "n3", 0)  # a plain read
    assert sorted(await store.interested("alice", 500)) == ["n1", "n2"]
    assert await store.interested("alice", 1_000) == ["n2"]
    await store.drop_interest("alice", "n2")
    assert await store.interested("alice", 0) == []


async def test_foreground_leases_per_node_with_last_seen(store: SharedPresenceStore) -> None:
    await store.look("alice", "n2", 10_000)
    assert await store.put_foreground("alice", "n1", 4_000, 1_000, 1_000) == (False, ["n2"]), "who to nudge"
    assert await store.put_foreground("alice", "n1", 4_500, 1_000, 3_999) == (True, ["n2"]), "a renewal in time"
    await store.put_foreground("alice", "n3", 2_000, 1_500, 1_500)
    state = await store.look("alice", "n2", 10_000)
    assert state.leases == {"n1": 4_500, "n3": 2_000} and state.last_seen == 1_500
    assert state.online_until(1_600, other_than="n1") == 2_000
    await store.put_foreground("alice", "n1", 0, 3_000, 3_000)  # n1's device left; n3's lease ran out
    state = await store.look("alice", "n2", 10_000)
    assert state.leases == {} and state.last_seen == 3_000 and state.online_until(3_000) is None
    await store.put_foreground("alice", "n1", 0, None, 3_100)  # a retried write: harmless
    assert (await store.look("alice", "n2", 0)).last_seen == 3_000
    assert (await store.put_foreground("alice", "n1", 9_000, None, 5_000))[0] is False, "it had run out"
