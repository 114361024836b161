"""The backends the store contract suite (tests/stores) runs against, each behind one interface.

A backend opens each store of the bridge as its Protocol; opening a store again gives a new
handle on the same data (a restart, or a second process). ``BACKENDS`` names them; the
``backend`` fixture (tests/stores/conftest.py) builds one per test, with data of its own.
A new backend is a class here, a name in ``BACKENDS`` and a branch in ``open_backend``; every
contract test then runs against it too, except in a module that names its own ``STORE_BACKENDS``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Protocol

import pytest

from bridge.groups.store import GroupStore
from bridge.keys.store import Accounts, KeyStore
from bridge.media.store import MediaStore
from bridge.messaging.store import MessageStore, UserLookup
from bridge.presence.store import PresenceStore
from bridge.push.store import PushStore
from broker.users import UserStore
from chatserver.user_admin import AccountStore
from storage.redis.groups import RedisGroupStore
from storage.redis.keys import RedisKeyStore
from storage.redis.media import RedisMediaStore
from storage.redis.presence import RedisPresenceStore
from storage.redis.users import RedisUserStore
from storage.sqlite.groups import SqliteGroupStore
from storage.sqlite.keys import SqliteKeyStore
from storage.sqlite.media import SqliteMediaStore
from storage.sqlite.messages import SqliteMessageStore
from storage.sqlite.presence import SqlitePresenceStore
from storage.sqlite.push import SqlitePushStore
from storage.sqlite.users import SqliteUserStore

BACKENDS = ["sqlite", "redis"]
# The message store's Protocol loads everything at start (``MessageStore.load``) and has no Redis
# implementation: cluster mode stages through ``bridge.cluster.store.QueueStore`` instead. Its
# contract module sets ``STORE_BACKENDS = SQLITE_ONLY``.
SQLITE_ONLY = ["sqlite"]


class Users(UserStore, UserLookup, Accounts, AccountStore, Protocol):
    """The users store as the bridge and the broker use it: the login gate's Protocol, messaging's
    ``UserLookup`` and the key service's ``Accounts``; and as the operator's commands do
    (chatserver/user_admin.py ``AccountStore``)."""

    async def close(self) -> None: ...


class Backend(Protocol):
    async def messages(self) -> MessageStore: ...

    async def presence(self) -> PresenceStore: ...

    async def keys(self) -> KeyStore: ...

    async def groups(self) -> GroupStore: ...

    async def push(self) -> PushStore: ...

    async def media(self) -> MediaStore: ...

    async def users(self, seed: dict[str, str] | None = None) -> Users:
        """The users store, after adding the users of ``seed`` (name -> password hash): creating
        users is an admin operation, outside the Protocols under test."""


class SqliteBackend:
    """Every store in its SQLite file of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    async def messages(self) -> MessageStore:
        return await SqliteMessageStore.open(self.data_dir)

    async def presence(self) -> PresenceStore:
        return await SqlitePresenceStore.open(self.data_dir)

    async def keys(self) -> KeyStore:
        return await SqliteKeyStore.open(self.data_dir)

    async def groups(self) -> GroupStore:
        return await SqliteGroupStore.open(self.data_dir)

    async def push(self) -> PushStore:
        return await SqlitePushStore.open(self.data_dir)

    async def media(self) -> MediaStore:
        return await SqliteMediaStore.open(self.data_dir)

    async def users(self, seed: dict[str, str] | None = None) -> Users:
        store = await SqliteUserStore.open(self.data_dir)
        await store.add_users((seed or {}).items())
        return store


class RedisBackend:
    """Users, keys, presence, groups and media records in the session's Redis Cluster (the ``redis_cluster``
    fixture), under a key prefix of this test's own; the keys stay until the session's cluster stops."""

    def __init__(self, startup_nodes: list[tuple[str, int]]) -> None:
        self.startup_nodes = startup_nodes
        self.prefix = f"t{uuid.uuid4().hex[:12]}:"

    async def messages(self) -> MessageStore:
        raise NotImplementedError("no Redis message store before #16 (SQLITE_ONLY)")

    async def presence(self) -> PresenceStore:
        return await RedisPresenceStore.open(self.startup_nodes, self.prefix)

    async def keys(self) -> KeyStore:
        return await RedisKeyStore.open(self.startup_nodes, self.prefix)

    async def groups(self) -> GroupStore:
        return await RedisGroupStore.open(self.startup_nodes, self.prefix)

    async def push(self) -> PushStore:
        raise NotImplementedError("push runs on one process only: no Redis push store yet (SQLITE_ONLY)")

    async def media(self) -> MediaStore:
        return await RedisMediaStore.open(self.startup_nodes, self.prefix)

    async def users(self, seed: dict[str, str] | None = None) -> Users:
        store = await RedisUserStore.open(self.startup_nodes, self.prefix)
        await store.add_users((seed or {}).items())
        return store


def open_backend(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Backend ``name``; the Redis one takes the session's ``redis_cluster`` (started on first use)."""
    if name == "sqlite":
        return SqliteBackend(tmp_path / "data")
    if name == "redis":
        return RedisBackend(request.getfixturevalue("redis_cluster").startup_nodes)
    raise ValueError(f"unknown store backend {name!r}")
