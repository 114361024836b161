"""The ``GroupStore`` contract (bridge/groups/store.py): a group reads back as committed, in join order;
a commit is a compare-and-set on the gseq; a user's groups and the per-user limit follow every change;
concurrent changes and messages of one group, on one handle or two, get unique, gapless gseqs and lose
no member."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bridge.groups.core import Group, GroupChange, GroupLimits, GroupRefused, create, decide, new_group_id
from bridge.groups.store import GroupStore, apply
from chatproto import ErrorCode, GroupAdd, GroupAdmins, GroupCreate, GroupLeave, GroupRemove, GroupRename
from storage.redis.groups import RedisGroupStore
from tests.stores.backends import Backend

LIMITS = GroupLimits(max_members=64, max_groups_per_user=2)
NOW = 1_732_780_800_000


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[GroupStore]:
    opened = await backend.groups()
    try:
        yield opened
    finally:
        await opened.close()


async def made(store: GroupStore, *members: str, by: str = "alice", limits: GroupLimits = LIMITS) -> Group:
    decision = create(new_group_id(), by, GroupCreate("trip", members), limits, NOW)
    assert decision.after is not None
    assert await store.commit(None, decision.after, limits.max_groups_per_user)
    return decision.after


async def change(store: GroupStore, group: Group, actor: str, request: GroupChange,
                 limits: GroupLimits = LIMITS) -> Group | None:
    decision = await apply(store, group.id, lambda before: decide(before, actor, request, limits, NOW),
                           limits.max_groups_per_user)
    return decision.after


async def test_a_group_reads_back_as_committed(store: GroupStore) -> None:
    group = await made(store, "bob", "carol")
    assert await store.load(group.id) == group
    assert await store.load(new_group_id()) is None
    assert await store.is_member(group.id, "bob")
    assert not await store.is_member(group.id, "mallory")
    assert await store.groups_of("carol") == [group.id]
    assert await store.groups_of("mallory") == []
    renamed = await change(store, group, "alice", GroupRename(group.id, "ski 🏔️"))
    promoted = await change(store, group, "alice", GroupAdmins(group.id, ("carol",)))
    assert renamed is not None and promoted is not None
    assert await store.load(group.id) == Group(group.id, "ski 🏔️", NOW, 3, ("alice", "bob", "carol"),
                                               frozenset({"alice", "carol"}))


async def test_a_commit_is_a_compare_and_set(store: GroupStore) -> None:
    group = await made(store, "bob")
    first = decide(group, "alice", GroupAdd(group.id, ("carol",)), LIMITS, NOW).after
    second = decide(group, "alice", GroupRename(group.id, "other"), LIMITS, NOW).after
    assert await store.commit(group, first, 2)
    assert not await store.commit(group, second, 2)  # decided on a group that is gone
    assert not await store.commit(None, group, 2)  # a create of an id that exists
    assert await store.load(group.id) == first


async def test_join_order_survives_removal_and_return(store: GroupStore) -> None:
    group = await made(store, "bob", "carol")
    await change(store, group, "alice", GroupRemove(group.id, ("bob",)))
    await change(store, group, "alice", GroupAdd(group.id, ("bob", "dave")))
    after = await change(store, group, "alice", GroupLeave(group.id))
    assert after == await store.load(group.id)
    assert after is not None
    assert after.members == ("carol", "bob", "dave")
    assert after.admins == {"carol"}  # the oldest member, as the store orders them
    assert await store.groups_of("alice") == []
    assert not await store.is_member(group.id, "alice")


async def test_the_last_member_leaving_deletes_the_group(store: GroupStore) -> None:
    group = await made(store, "bob")
    await change(store, group, "bob", GroupLeave(group.id))
    assert await change(store, group, "alice", GroupLeave(group.id)) is None
    assert await store.load(group.id) is None
    assert await store.next_gseq(group.id, "alice") is None
    assert await store.groups_of("alice") == await store.groups_of("bob") == []
    with pytest.raises(GroupRefused):
        await change(store, group, "alice", GroupLeave(group.id))


async def test_a_user_is_in_at_most_max_groups(store: GroupStore) -> None:
    first = await made(store, "bob")
    await made(store, "bob", by="carol")
    with pytest.raises(GroupRefused) as caught:
        await made(store, "bob", "dave", by="erin")
    assert caught.value.code == ErrorCode.TOO_MANY_GROUPS
    assert "bob" in caught.value.detail and "dave" not in caught.value.detail
    assert await store.groups_of("erin") == [] and await store.groups_of("dave") == []
    third = await made(store, "dave", by="erin")
    with pytest.raises(GroupRefused):
        await change(store, third, "erin", GroupAdd(third.id, ("bob",)))
    assert await store.load(third.id) == third  # nothing written
    await change(store, first, "bob", GroupLeave(first.id))  # a place is free again at once
    assert await change(store, third, "erin", GroupAdd(third.id, ("bob",))) is not None
    assert await store.groups_of("bob") == sorted([third.id, (await store.groups_of("carol"))[0]])


async def test_messages_take_gseqs_from_the_group_order(store: GroupStore) -> None:
    group = await made(store, "bob")
    assert await store.next_gseq(group.id, "bob") == (2, ["alice", "bob"])
    assert await store.next_gseq(group.id, "mallory") is None
    after = await change(store, group, "alice", GroupAdd(group.id, ("carol",)))
    assert after is not None and after.gseq == 3  # the change loaded again after the message
    assert await store.next_gseq(group.id, "alice") == (4, ["alice", "bob", "carol"])


async def test_concurrent_changes_and_messages_get_unique_gapless_gseqs(backend: Backend, store: GroupStore) -> None:
    """Adds of 24 users, each its own change, racing 40 messages over two handles (two processes)."""
    limits = GroupLimits(max_members=64, max_groups_per_user=8)
    group = await made(store, "bob", limits=limits)
    other = await backend.groups()
    try:
        users = [f"u{i}" for i in range(24)]
        adds = [change((store, other)[i % 2], group, "alice", GroupAdd(group.id, (u,)), limits)
                for i, u in enumerate(users)]
        sends = [(store, other)[i % 2].next_gseq(group.id, "bob") for i in range(40)]
        results = await asyncio.gather(*adds, *sends)
    finally:
        await other.close()
    final = await store.load(group.id)
    assert final is not None
    assert sorted(final.members) == sorted(["alice", "bob", *users])  # no member lost
    message_gseqs = [r[0] for r in results[len(adds):] if isinstance(r, tuple)]
    assert len(message_gseqs) == 40
    # The adds took one gseq each, the messages theirs: together every gseq from 2 once.
    assert final.gseq == 1 + len(users) + len(message_gseqs)
    assert len(set(message_gseqs)) == 40 and set(message_gseqs) < set(range(2, final.gseq + 1))
    assert all(await asyncio.gather(*(store.is_member(group.id, u) for u in users)))
    assert [await store.groups_of(u) for u in users] == [[group.id]] * len(users)


async def test_a_crash_between_the_group_and_the_user_index_is_harmless(store: GroupStore) -> None:
    """Redis keeps a user's groups in her slot, written before an add and after a removal (two
    slots, two writes): what a crash in between leaves is checked on read and dropped."""
    if not isinstance(store, RedisGroupStore):
        pytest.skip("SQLite finds a user's groups by an index of the member table: nothing to repair")
    group = await made(store, "bob")
    index = [store.key("ug", "bob")]
    vanished = new_group_id()
    # A crash after the reservation of an add, before its commit; and after a removal, before the prune.
    await store.run("groups.reserve", index, [vanished, 10])
    await store.run("groups.confirm", index, [group.id.replace("g:", "g:x"), 1])
    assert await store.groups_of("bob") == [group.id]
    assert len(await store.command("t", "HKEYS", index[0])) == 2  # the add may still commit: kept
    store.index_grace_ms = 0
    assert await store.groups_of("bob") == [group.id]
    assert await store.command("t", "HKEYS", index[0]) == [group.id]
    # Stale entries count towards the limit only until it is reached: then they are checked.
    await store.run("groups.reserve", index, [vanished, 10])
    assert await made(store, "bob", by="carol") is not None
