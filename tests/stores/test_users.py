"""The users store contract (broker/users.py ``UserStore``, with messaging's ``UserLookup``, the key
service's ``Accounts`` and the operator's ``AccountStore``): password hashes, devices known from their
first login, the device limit held also when first logins race, token digests set and revoked, devices
forgotten; a password change revoking every token, users listed by name, a user deleted with their
devices."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from bridge.store import StoreError
from broker.users import TooManyDevicesError
from tests.stores.backends import Backend, Users


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Users]:
    opened = await backend.users({"alice": "hash-a", "bob": "hash-b"})
    try:
        yield opened
    finally:
        await opened.close()


async def test_unknown_users_and_devices(store: Users) -> None:
    assert await store.password_hash("nobody") is None
    assert await store.user_devices("nobody") is None
    assert await store.user_devices("bob") == [], "a user without devices has none, not None"
    assert await store.device("alice", "phone") is None


async def test_a_device_is_known_from_its_first_login(store: Users) -> None:
    assert await store.password_hash("alice") == "hash-a"
    assert await store.record_login("alice", "phone") is True
    assert await store.record_login("alice", "phone") is False
    info = await store.device("alice", "phone")
    assert info is not None
    assert (info.user, info.device, info.token_digest) == ("alice", "phone", None)
    assert 0 < info.created_ms <= info.last_login_ms
    assert await store.user_devices("alice") == ["phone"]
    assert await store.user_devices("bob") == []


async def test_the_device_limit_refuses_only_new_devices(store: Users) -> None:
    assert await store.record_login("alice", "phone", 2) is True
    assert await store.record_login("alice", "tab", 2) is True
    with pytest.raises(TooManyDevicesError):
        await store.record_login("alice", "laptop", 2)
    assert await store.record_login("alice", "phone", 2) is False, "a known device still logs in"
    assert sorted(await store.user_devices("alice") or []) == ["phone", "tab"]
    assert await store.record_login("bob", "laptop", 2) is True, "the limit is per user"


async def test_racing_first_logins_do_not_overshoot_the_limit(store: Users) -> None:
    results = await asyncio.gather(*(store.record_login("alice", f"d{n}", 3) for n in range(10)),
                                   return_exceptions=True)
    assert results.count(True) == 3
    assert sum(isinstance(r, TooManyDevicesError) for r in results) == 7
    assert len(await store.user_devices("alice") or []) == 3


async def test_token_digests_are_set_and_revoked(store: Users) -> None:
    for device in ("phone", "tab"):
        await store.record_login("alice", device)
        await store.set_token_digest("alice", device, f"digest-{device}")
    await store.record_login("bob", "phone")
    await store.set_token_digest("bob", "phone", "digest-bob")
    assert (await store.device("alice", "tab")).token_digest == "digest-tab"  # type: ignore[union-attr]
    assert await store.revoke_tokens("alice", "phone") == 1
    assert await store.revoke_tokens("alice", "phone") == 0, "nothing left to revoke"
    assert (await store.device("alice", "phone")).token_digest is None  # type: ignore[union-attr]
    assert await store.revoke_tokens("alice") == 1, "the rest of alice's"
    assert (await store.device("alice", "tab")).token_digest is None  # type: ignore[union-attr]
    assert (await store.device("bob", "phone")).token_digest == "digest-bob"  # type: ignore[union-attr]


async def test_a_deleted_device_is_forgotten_with_its_token(store: Users) -> None:
    await store.record_login("alice", "phone")
    await store.record_login("alice", "tab")
    await store.set_token_digest("alice", "phone", "digest")
    assert await store.delete_device("alice", "phone") is True
    assert await store.delete_device("alice", "phone") is False
    assert await store.device("alice", "phone") is None
    assert await store.user_devices("alice") == ["tab"]
    assert await store.record_login("alice", "phone") is True, "its next login makes it a new device"
    assert (await store.device("alice", "phone")).token_digest is None  # type: ignore[union-attr]


async def test_users_and_devices_survive_reopening(backend: Backend, store: Users) -> None:
    await store.record_login("alice", "phone")
    await store.set_token_digest("alice", "phone", "digest")
    again = await backend.users()
    try:
        assert await again.password_hash("alice") == "hash-a"
        assert (await again.device("alice", "phone")).token_digest == "digest"  # type: ignore[union-attr]
    finally:
        await again.close()


async def test_the_operators_side(store: Users) -> None:
    await store.record_login("alice", "phone")
    await store.record_login("alice", "tab")
    await store.set_token_digest("alice", "phone", "digest")
    assert await store.user_exists("alice") and not await store.user_exists("nobody")
    assert [(u.name, u.devices) async for u in store.iter_users()] == [("alice", 2), ("bob", 0)]
    devices = await store.devices("alice")
    assert [(d.device, d.token_digest) for d in devices] == [("phone", "digest"), ("tab", None)]
    assert all(0 < d.created_ms <= d.last_login_ms for d in devices)
    assert await store.devices("bob") == []

    await store.set_password("alice", "hash-new")
    assert await store.password_hash("alice") == "hash-new"
    assert (await store.device("alice", "phone")).token_digest is None, "a new password revokes every token"  # type: ignore[union-attr]
    with pytest.raises(StoreError, match="no user 'nobody'"):
        await store.set_password("nobody", "hash")

    await store.delete_user("alice")
    assert await store.password_hash("alice") is None and await store.user_devices("alice") is None
    assert await store.device("alice", "phone") is None, "devices go with their user"
    assert [u.name async for u in store.iter_users()] == ["bob"]
    with pytest.raises(StoreError, match="no user 'alice'"):
        await store.delete_user("alice")


async def test_a_token_login_touches_only_a_known_device(backend: Backend, store: Users) -> None:
    await store.record_login("alice", "phone")
    await store.record_login("alice", "tab")
    first = (await store.device("alice", "phone")).last_login_ms  # type: ignore[union-attr]
    await asyncio.sleep(0.005)
    await store.touch_login("alice", "phone")
    assert await store.delete_device("alice", "tab")
    await store.touch_login("alice", "tab")
    await store.close()  # a store that writes the stamps later writes them by its close
    again = await backend.users()
    try:
        assert (await again.device("alice", "phone")).last_login_ms > first  # type: ignore[union-attr]
        assert await again.device("alice", "tab") is None, "a removed device stays removed"
    finally:
        await again.close()


async def test_lookups_at_once_each_get_their_device(store: Users) -> None:
    for device in ("phone", "tab"):
        await store.record_login("alice", device)
        await store.set_token_digest("alice", device, f"digest-{device}")
    asked = [("alice", "phone"), ("alice", "tab"), ("alice", "nope"), ("bob", "phone"), ("alice", "phone")]
    found = await asyncio.gather(*(store.device(user, device) for user, device in asked))
    assert [None if info is None else (info.user, info.device, info.token_digest) for info in found] == [
        ("alice", "phone", "digest-phone"), ("alice", "tab", "digest-tab"), None, None,
        ("alice", "phone", "digest-phone")]


async def test_a_cancelled_lookup_leaves_the_others_theirs(store: Users) -> None:
    await store.record_login("alice", "phone")
    first = asyncio.ensure_future(store.device("alice", "phone"))
    second = asyncio.ensure_future(store.device("alice", "phone"))
    await asyncio.sleep(0)
    first.cancel()
    info = await second
    assert info is not None and info.device == "phone"


async def test_a_touched_login_time_is_written_without_a_close(store: Users) -> None:
    await store.record_login("alice", "phone")
    first = (await store.device("alice", "phone")).last_login_ms  # type: ignore[union-attr]
    await asyncio.sleep(0.005)
    await store.touch_login("alice", "phone")

    deadline = time.monotonic() + 5.0  # SQLite writes the stamps within a second
    while (await store.device("alice", "phone")).last_login_ms == first:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the last-login time was not written"
        await asyncio.sleep(0.05)
