"""Presence in a Redis Cluster: ``bridge.presence.store.PresenceStore`` and the per-user operations
of cluster mode (``bridge.cluster.presence_state.SharedPresenceStore``).

Keys (hash tag: the user, so one user's keys share a slot; see storage/redis/client.py):

- ``{prefix}p:{alice}``     hash ``ls`` (last seen, ms), ``priv`` (privacy setting, absent: the
                            default), ``v`` (a version, incremented by every change)
- ``{prefix}p:{alice}:c``   set of alice's contacts
- ``{prefix}p:{alice}:on``  hash node id -> the lease (ms) until which that node holds a foreground
                            device of alice
- ``{prefix}p:{alice}:w``   sorted set node id -> until when that node wants nudges about alice

Every operation is one Lua script on the user's slot, so a read sees one consistent state with its
version, and registering interest and reading happen in one step (a change after that read
finds the node's interest and nudges it). Every script is safe to run twice (client.py): a
last-seen time only moves forward, the rest sets or removes.

``load`` reads every presence key of the prefix with a SCAN over all masters: it is for tools and
tests (and the contract suite), not for a node of a cluster, which reads per user (``look``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from bridge.cluster.presence_state import SharedState
from bridge.presence.store import PresenceSnapshot
from chatproto import PRIVACY_CONTACTS
from storage.redis.client import RedisStore

# KEYS: state. ARGV: last seen (ms). Only ever moves it forward.
LAST_SEEN = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'ls'))
if not cur or cur < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'ls', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'v', 1)
end
return 1
"""

# KEYS: state, on, w. ARGV: node, lease (0: none), last seen ('' to keep), now. Returns {1 if the
# node's lease was running before else 0, then the nodes interested in the user}. Leases of any
# node that ran out are removed on the way.
PUT = """
if ARGV[3] ~= '' then
  local cur = tonumber(redis.call('HGET', KEYS[1], 'ls'))
  if not cur or cur < tonumber(ARGV[3]) then redis.call('HSET', KEYS[1], 'ls', ARGV[3]) end
end
local now = tonumber(ARGV[4])
local running = 0
local mine = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
if mine and mine > now then running = 1 end
local leases = redis.call('HGETALL', KEYS[2])
for i = 1, #leases, 2 do
  if tonumber(leases[i + 1]) <= now then redis.call('HDEL', KEYS[2], leases[i]) end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local out = redis.call('ZRANGE', KEYS[3], 0, -1)
table.insert(out, 1, running)
return out
"""

# KEYS: state, c, on, w. ARGV: node, interest until (0: a plain read). Returns
# {version, last seen or '', setting or '', contacts, flat leases}.
LOOK = """
if tonumber(ARGV[2]) > 0 then redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1]) end
local s = redis.call('HMGET', KEYS[1], 'v', 'ls', 'priv')
return {s[1] or 0, s[2] or '', s[3] or '', redis.call('SMEMBERS', KEYS[2]), redis.call('HGETALL', KEYS[3])}
"""

INTERESTED = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

PRIVACY = """
if redis.call('HGET', KEYS[1], 'priv') ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'priv', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'v', 1)
end
return 1
"""

# KEYS: state, c. ARGV: 'add' or 'remove', the limit of contacts (-1: none), the users (distinct).
# Returns {changed, contacts now}, or {-1, contacts now} if adding would go over the limit.
CONTACTS = """
local changed = 0
if ARGV[1] == 'add' then
  local new = {}
  for i = 3, #ARGV do
    if redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 0 then table.insert(new, ARGV[i]) end
  end
  local limit = tonumber(ARGV[2])
  if limit >= 0 and redis.call('SCARD', KEYS[2]) + #new > limit then return {-1, redis.call('SCARD', KEYS[2])} end
  for _, user in ipairs(new) do redis.call('SADD', KEYS[2], user) end
  changed = #new
else
  for i = 3, #ARGV do changed = changed + redis.call('SREM', KEYS[2], ARGV[i]) end
end
if changed > 0 then redis.call('HINCRBY', KEYS[1], 'v', 1) end
return {changed, redis.call('SCARD', KEYS[2])}
"""


class RedisPresenceStore(RedisStore):
    """Implements ``PresenceStore`` and ``SharedPresenceStore`` (bridge/cluster/presence_state.py)."""

    SCRIPTS: ClassVar[dict[str, str]] = {"presence.last_seen": LAST_SEEN, "presence.put": PUT,
                                         "presence.look": LOOK, "presence.interested": INTERESTED,
                                         "presence.privacy": PRIVACY, "presence.contacts": CONTACTS}

    def _state(self, user: str) -> str:
        return self.key("p", user)

    # --- PresenceStore -----------------------------------------------------------------------

    async def load(self) -> PresenceSnapshot:
        """Everything under this prefix, from a SCAN of every master: tools and tests only."""
        found: set[str] = set()
        async for key in self._client.scan_iter(match=f"{self._prefix}p:*", count=1000):
            found.add(str(key))
        snapshot = PresenceSnapshot([], [], [])
        for key in sorted(found):
            user, _, part = key[len(self._prefix) + 2:].partition("}")
            user = user[1:]
            if part == "":
                last_seen, setting = await self.command("presence.load", "HMGET", key, "ls", "priv")
                if last_seen is not None:
                    snapshot.last_seen.append((user, int(last_seen)))
                if setting is not None:
                    snapshot.settings.append((user, str(setting)))
            elif part == ":c":
                members = await self.command("presence.load", "SMEMBERS", key)
                snapshot.contacts.extend((user, str(contact)) for contact in members)
        return snapshot

    async def save_last_seen(self, rows: list[tuple[str, int]]) -> None:
        """One script per user (users live in different slots): a failure part-way leaves the rows
        before it written, which is harmless (each only moves forward; the caller writes all again)."""
        for user, ms in rows:
            await self.run("presence.last_seen", [self._state(user)], [ms])

    async def set_privacy(self, user: str, setting: str) -> None:
        await self.run("presence.privacy", [self._state(user)], [setting])

    async def add_contacts(self, owner: str, users: list[str]) -> None:
        await self.change_contacts(owner, users, True, None)

    async def remove_contacts(self, owner: str, users: list[str]) -> None:
        await self.change_contacts(owner, users, False, None)

    # --- SharedPresenceStore -----------------------------------------------------------------

    async def look(self, user: str, node: str, interest_until: int) -> SharedState:
        keys = [self._state(user), self.key("p", user, "c"), self.key("p", user, "on"), self.key("p", user, "w")]
        version, last_seen, setting, contacts, leases = await self.run(
            "presence.look", keys, [node, interest_until])
        return SharedState(int(version), int(last_seen) if last_seen != "" else None, setting or PRIVACY_CONTACTS,
                           frozenset(str(c) for c in contacts), _pairs(leases))

    async def drop_interest(self, user: str, node: str) -> None:
        await self.command("presence.drop_interest", "ZREM", self.key("p", user, "w"), node)

    async def interested(self, user: str, now: int) -> list[str]:
        return _strings(await self.run("presence.interested", [self.key("p", user, "w")], [now]))

    async def put_foreground(self, user: str, node: str, lease: int, last_seen: int | None,
                             now: int) -> tuple[bool, list[str]]:
        keys = [self._state(user), self.key("p", user, "on"), self.key("p", user, "w")]
        args: Sequence[str | int] = [node, lease, "" if last_seen is None else last_seen, now]
        running, *nodes = await self.run("presence.put", keys, args)
        return bool(int(running)), _strings(nodes)

    async def change_contacts(self, owner: str, users: list[str], add: bool,
                              limit: int | None) -> tuple[int, int] | None:
        distinct = sorted(set(users))
        if not distinct:
            return await self._count(owner)
        changed, count = await self.run("presence.contacts", [self._state(owner), self.key("p", owner, "c")],
                                        ["add" if add else "remove", -1 if limit is None else limit, *distinct])
        return None if int(changed) < 0 else (int(changed), int(count))

    async def _count(self, owner: str) -> tuple[int, int]:
        return 0, int(await self.command("presence.contacts", "SCARD", self.key("p", owner, "c")))


def _strings(values: Any) -> list[str]:
    return [str(value) for value in values]


def _pairs(flat: Any) -> dict[str, int]:
    values = list(flat)
    return {str(values[i]): int(values[i + 1]) for i in range(0, len(values), 2)}
