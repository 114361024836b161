"""Groups in a Redis Cluster: ``bridge.groups.store.GroupStore``, as storage/sqlite/groups.py keeps
them in SQLite.

Keys. A group's keys are hash-tagged by its id without ``g:`` (``g:Ab3`` -> ``{Ab3}``), so one group
is one slot and every change of it is one Lua script there (see storage/redis/client.py):

- ``{prefix}g:{Ab3}``     hash ``name``, ``created_at``, ``gseq``
- ``{prefix}g:{Ab3}:m``   sorted set of the members, score = join rank (bridge/groups/core.py ``joins``)
- ``{prefix}g:{Ab3}:a``   set of the admins
- ``{prefix}g:{Ab3}:log``, ``:d``, ``:b:<gseq>``, ``:lease``: cluster mode's group log (storage/redis/group_log.py)
- ``{prefix}ug:{alice}``  hash group id -> ``p<ms>`` (an add in flight since that Redis time) or
                          ``c<gseq>`` (added at that gseq): alice's groups, in her own slot

Two slots, two writes. The group's member set is the truth; ``ug`` is an index that may hold more,
never less. An entry is written ``p`` *before* the group commit that adds the user (``RESERVE``,
which also counts her groups against ``max_groups_per_user``, atomically in her slot), turned ``c``
after it, and dropped after the commit that removes her (``PRUNE``). A crash, or a compare-and-set
lost, between the writes leaves an extra entry; every read checks each entry against the group
(``groups_of``, and a full count before it refuses) and drops what is stale:
- ``c<x>`` when the user is not a member at the group's gseq G >= x (a re-add after the check
  writes a higher x, or a ``p``, and is kept);
- ``p<ms>`` only once it is older than ``INDEX_GRACE_MS`` at the check: the add may still commit,
  and one finishes within seconds (``retry_s`` per call). Masters' clocks must agree within that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar, Final, TypeVar

from bridge.groups.core import Group, GroupRefused, joins, leaves
from storage.redis.client import RedisStore

INDEX_GRACE_MS: Final = 120_000
PARALLEL: Final = 64  # calls in flight for one operation on many users' slots

T = TypeVar("T")

# KEYS: meta, members, admins. Returns {name, created_at, gseq, members in join order, admins} or false.
LOAD = """
local meta = redis.call('HMGET', KEYS[1], 'name', 'created_at', 'gseq')
if not meta[3] then return false end
return {meta[1], meta[2], meta[3], redis.call('ZRANGE', KEYS[2], 0, -1), redis.call('SMEMBERS', KEYS[3])}
"""

# KEYS: meta, members, admins, log, dedup marks. ARGV: the gseq expected ('' = no group yet), the gseq
# after ('' = delete), k, k (gseq, entry) pairs appended to the log (storage/redis/group_log.py), then
# name, created_at, n, n (user, rank) pairs joining, r, r users leaving, then every admin after.
# Returns 1, or 0 (nothing written) if the stored gseq is not the one expected. A deleted group's log
# stays: its last events still go out.
COMMIT = """
local current = redis.call('HGET', KEYS[1], 'gseq')
if (current or '') ~= ARGV[1] then return 0 end
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  redis.call('ZADD', KEYS[4], ARGV[i], ARGV[i + 1])
  i = i + 2
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5])
  return 1
end
redis.call('HSET', KEYS[1], 'gseq', ARGV[2], 'name', ARGV[i], 'created_at', ARGV[i + 1])
i = i + 2
for _ = 1, tonumber(ARGV[i]) do
  redis.call('ZADD', KEYS[2], ARGV[i + 2], ARGV[i + 1])
  i = i + 2
end
i = i + 1
local r = tonumber(ARGV[i])
for j = i + 1, i + r do redis.call('ZREM', KEYS[2], ARGV[j]) end
redis.call('DEL', KEYS[3])
for j = i + r + 1, #ARGV do redis.call('SADD', KEYS[3], ARGV[j]) end
return 1
"""

# KEYS: meta, members. ARGV: the sender. Returns {gseq, members in join order}, or false if not a member.
NEXT_GSEQ = """
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return false end
return {redis.call('HINCRBY', KEYS[1], 'gseq', 1), redis.call('ZRANGE', KEYS[2], 0, -1)}
"""

_NOW_MS = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
NO_GROUP_GSEQ: Final = 2**53  # the gseq a deleted group is checked at: ids are never used again

# KEYS: meta, members. ARGV: a user, NO_GROUP_GSEQ. Returns {1 if a member else 0, the group's gseq, Redis ms}.
MEMBER_AT = _NOW_MS + """
local member = 0
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then member = 1 end
return {member, tonumber(redis.call('HGET', KEYS[1], 'gseq') or ARGV[2]), now}
"""

# KEYS: the user's index. ARGV: group id, limit. Writes ``p<now>`` and returns 1, or returns 0 if the
# user is not indexed in this group and has ``limit`` entries already.
RESERVE = _NOW_MS + """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], 'p' .. now)
return 1
"""

# KEYS: the user's index. ARGV: group id, the gseq she was added at. Keeps a higher ``c`` (a later add).
CONFIRM = """
local entry = redis.call('HGET', KEYS[1], ARGV[1]) or 'p'
if string.sub(entry, 1, 1) == 'c' and tonumber(string.sub(entry, 2)) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 'c' .. ARGV[2])
return 1
"""

# KEYS: the user's index. ARGV: group id, the group's gseq G when she was found not a member, the
# cutoff ms. Drops ``c<x>`` with x <= G and ``p<ms>`` with ms <= cutoff.
PRUNE = """
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return 0 end
local kind, n = string.sub(entry, 1, 1), tonumber(string.sub(entry, 2))
if (kind == 'c' and n <= tonumber(ARGV[2])) or (kind == 'p' and n <= tonumber(ARGV[3])) then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


def tag_of(group: str) -> str:
    """The hash tag of a group's keys: its id without ``g:``."""
    return group.removeprefix("g:")


async def _each(items: Iterable[str], call: Callable[[str], Awaitable[T]]) -> list[T]:
    """``call`` for every item, ``PARALLEL`` at a time (each on its own slot), results in order."""
    listed = list(items)
    results: list[T] = []
    for start in range(0, len(listed), PARALLEL):
        results += await asyncio.gather(*(call(item) for item in listed[start:start + PARALLEL]))
    return results


class RedisGroupStore(RedisStore):
    SCRIPTS: ClassVar[dict[str, str]] = {
        "groups.load": LOAD, "groups.commit": COMMIT, "groups.next_gseq": NEXT_GSEQ,
        "groups.member_at": MEMBER_AT, "groups.reserve": RESERVE, "groups.confirm": CONFIRM,
        "groups.prune": PRUNE}
    index_grace_ms = INDEX_GRACE_MS

    def _keys(self, group: str) -> list[str]:
        """meta, members, admins of ``group``, tagged by its id without ``g:``."""
        tag = tag_of(group)
        return [self.key("g", tag), self.key("g", tag, "m"), self.key("g", tag, "a")]

    async def load(self, group: str) -> Group | None:
        found = await self.run("groups.load", self._keys(group), [])
        if found is None:
            return None
        name, created_at, gseq, members, admins = found
        return Group(group, str(name), int(created_at), int(gseq), tuple(members), frozenset(admins))

    async def commit(self, before: Group | None, after: Group | None, max_groups_per_user: int) -> bool:
        return await self._commit(before, after, max_groups_per_user, [])

    async def _commit(self, before: Group | None, after: Group | None, max_groups_per_user: int,
                      logged: list[tuple[int, str]]) -> bool:
        """``commit``, appending ``logged`` (gseq, entry) to the group's log in the same script."""
        changed = after if after is not None else before
        if changed is None:
            raise ValueError("a commit needs a group before or after it")
        gid = changed.id
        added = joins(before, after) if after is not None else []
        users = [user for user, _ in added]
        reserved = await _each(users, lambda user: self._reserve(user, gid, max_groups_per_user))
        full = [user for user, ok in zip(users, reserved, strict=True) if not ok]
        if full:
            raise GroupRefused.too_many_groups(full, max_groups_per_user)
        removed = leaves(before, after)
        args: list[str | int] = ["" if before is None else before.gseq, "" if after is None else after.gseq,
                                 len(logged)]
        for gseq, entry in logged:
            args += [gseq, entry]
        if after is not None:
            args += [after.name, after.created_at, len(added)]
            for user, rank in added:
                args += [user, rank]
            args += [len(removed), *removed, *sorted(after.admins)]
        if not await self._run_commit([*self._keys(gid), self.key("g", tag_of(gid), "log"),
                                       self.key("g", tag_of(gid), "d")], args):
            return False
        if after is not None:
            await _each(users, lambda user: self.run("groups.confirm", [self.key("ug", user)], [gid, after.gseq]))
        await _each(removed, lambda user: self._check(user, gid))
        return True

    async def _run_commit(self, keys: list[str], args: list[str | int]) -> Any:
        return await self.run("groups.commit", keys, args)

    async def _reserve(self, user: str, group: str, limit: int) -> bool:
        """Index ``group`` for ``user`` before she is added; False if she is in ``limit`` groups,
        counted again without stale entries."""
        index = [self.key("ug", user)]
        if await self.run("groups.reserve", index, [group, limit]):
            return True
        await self.groups_of(user)  # drops the stale entries
        return bool(await self.run("groups.reserve", index, [group, limit]))

    async def _check(self, user: str, group: str) -> bool:
        """Whether ``user`` is a member of ``group``; if not, her index entry is dropped unless it
        may belong to a later add (the module's docstring)."""
        member, gseq, now_ms = await self.run("groups.member_at", self._keys(group)[:2], [user, NO_GROUP_GSEQ])
        if not member:
            await self.run("groups.prune", [self.key("ug", user)],
                           [group, int(gseq), int(now_ms) - self.index_grace_ms])
        return bool(member)

    async def next_gseq(self, group: str, sender: str) -> tuple[int, list[str]] | None:
        taken = await self.run("groups.next_gseq", self._keys(group)[:2], [sender])
        return None if taken is None else (int(taken[0]), list(taken[1]))

    async def is_member(self, group: str, user: str) -> bool:
        return await self.command("groups.is_member", "ZSCORE", self._keys(group)[1], user) is not None

    async def groups_of(self, user: str) -> list[str]:
        indexed = sorted(await self.command("groups.list", "HKEYS", self.key("ug", user)))
        checked = await _each(indexed, lambda group: self._check(user, group))
        return [group for group, member in zip(indexed, checked, strict=True) if member]
