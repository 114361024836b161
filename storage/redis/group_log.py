"""Cluster mode's group log in a Redis Cluster: ``bridge.cluster.group_store.GroupLog`` (whose docstring
has the model). Keys, in the group's slot (tag: its id without ``g:``, as storage/redis/groups.py):

- ``{prefix}g:{Ab3}:log``      sorted set, score = gseq, member = the entry as JSON: an event
  ``{"s": gseq, "w": GroupItem wire (seq 0), "to": [users], "e": expires_ms}`` or a message
  ``{"s", "to", "x": the sending client id, "e"}``; dropped once fanned
- ``{prefix}g:{Ab3}:d``        sorted set of the dedup marks of the group's messages (``<sender>/<id>``,
  score = until ms), within ``max_dedup`` as a user's marks are (storage/redis/queue_scripts.py)
- ``{prefix}g:{Ab3}:b:<gseq>`` hash ``wire`` (the MsgItem, seq 0, no gseq), ``refs``: the member users
  that may still hold an item of it. Expires ``BODY_GRACE_MS`` after its items do.
- ``{prefix}g:{Ab3}:lease``    the fanner's token (SET NX PX)
- ``{prefix}gx:{n}``           n < HINT_SHARDS: sorted set group id -> when a sweep should look at it
  (untagged, spread over the slots like the queues' expiry index)

In each member's slot (storage/redis/queue_scripts.py ``STAGE_GROUP``): ``{prefix}gw:{bob}``, hash
group id -> the highest gseq staged for bob (the fanner's high-water mark; with the messages still logged
that bob got no item of, reported again by a fanout run again), kept while bob is a member and
``GW_GRACE_MS`` after the entry that ends his membership is staged for him (``{prefix}gwx:{bob}``, sorted set
group id -> when its mark goes: dropped by a later ``STAGE_GROUP`` for bob, any group's), and the record
``{prefix}qm:{bob}:g:Ab3/<gseq>`` whose ``refs`` counts bob's items of that message. The last of
them acked counts bob off the body (``UNHOLD``, a second call, in the group's slot), expired with the
report of its expiry (``EXPIRE_GROUP``, storage/redis/group_receipts.py): a node dying in between
leaves the body until its TTL, never drops it early.

Receipts (``t:<gseq>``, ``i:<id>``, ``u:<sender>``, ``r:<token>``, ``xp`` in the group's slot):
storage/redis/group_receipts.py; ``POST`` starts tracking a message in the script that posts it.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, ClassVar, Final

from redis.asyncio.cluster import RedisCluster

from bridge.cluster.group_store import Completed, GroupExpiry, GroupPost, LogEntry, Mark, PostStatus
from bridge.groups.core import Decision, Group
from bridge.messaging.group_receipts import TrackedRow
from chatproto import GroupItem
from storage.redis.client import RETRY_S, RedisStore
from storage.redis.group_receipts import (
    EXPIRE_GROUP,
    EXPIRED_DONE,
    MARK,
    RECEIPTED,
    TRACK,
    TRACKED,
    UNHOLD_BODY,
    completed,
    expiry_args,
    mark_args,
    receipted_args,
    tracked_rows,
)
from storage.redis.groups import RedisGroupStore, tag_of
from storage.redis.queue_scripts import COMMON

HINT_SHARDS: Final = 16
BODY_GRACE_MS: Final = 3_600_000  # a body outlives its items' TTL by this: the expiry sweep drops them first
MAX_DEDUP: Final = 200_000  # dedup marks per group: settings.dedup.max_entries's default
REPLAY_MARGIN_MS: Final = 10_000  # a ``mark`` reply outlives every retry of its script by this

# KEYS: bodies of one group. ARGV: the users to count off each.
UNHOLD = UNHOLD_BODY + """
for i, key in ipairs(KEYS) do unhold(key, tonumber(ARGV[i])) end
return 1
"""

# KEYS: bodies of one group. Returns each one's wire ('' if gone).
BODIES = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGET', key, 'wire') or '' end
return out
"""

# KEYS: meta, members, log, dedup marks. ARGV: ref, dedup until, max_dedup, body prefix, wire, expires_ms,
# body expiry ms, origin, sender, then TRACK's. Returns {status, gseq}.
POST = COMMON + """
local now = now_ms()
if marked(KEYS[4], ARGV[1], now) then return {'duplicate', 0} end
if not redis.call('ZSCORE', KEYS[2], ARGV[9]) then return {'forbidden', 0} end
local gseq = redis.call('HINCRBY', KEYS[1], 'gseq', 1)
local members = redis.call('ZRANGE', KEYS[2], 0, -1)
remember(KEYS[4], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), now)
local body = ARGV[4] .. gseq
redis.call('HSET', body, 'wire', ARGV[5], 'refs', #members)
redis.call('PEXPIREAT', body, ARGV[7])
redis.call('ZADD', KEYS[3], gseq, cjson.encode({s = gseq, to = members, x = ARGV[8], e = tonumber(ARGV[6])}))
""" + TRACK + """
return {'posted', gseq}
"""

# KEYS: log, lease. ARGV: token, lease ms, upto, body prefix, then a gseq per member user who got no item
# of it. Returns 1, or 0 (nothing done) if the lease is not the token's.
FANNED = UNHOLD_BODY + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
for i = 5, #ARGV do
  if #redis.call('ZRANGE', KEYS[1], ARGV[i], ARGV[i], 'BYSCORE') > 0 then unhold(ARGV[4] .. ARGV[i], 1) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS: log, lease. ARGV: token. Returns 0 (the lease kept) while the log holds entries, else 1.
RELEASE = """
if redis.call('ZCARD', KEYS[1]) > 0 then return 0 end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: a hint shard. ARGV: group id, the time it was due at.
CLEAR_HINT = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1
"""


def body_key(store: RedisStore, group: str, gseq: int | str) -> str:
    return store.key("g", tag_of(group), "b", str(gseq))


def decode_entry(group: str, raw: str) -> LogEntry:
    obj = json.loads(raw)
    users = tuple(obj["to"]) if isinstance(obj["to"], list) else ()  # Lua's cjson writes an empty list as {}
    event = GroupItem.decode(obj["w"].encode()) if "w" in obj else None
    return LogEntry(group, int(obj["s"]), users, int(obj["e"]), event, str(obj.get("x", "")))


class RedisGroupLog(RedisGroupStore):
    SCRIPTS: ClassVar[dict[str, str]] = {
        **RedisGroupStore.SCRIPTS, "groups.post": POST, "groups.fanned": FANNED, "groups.release": RELEASE,
        "groups.clear_hint": CLEAR_HINT, "groups.mark": MARK, "groups.tracked": TRACKED,
        "groups.receipted": RECEIPTED, "groups.expire": EXPIRE_GROUP, "groups.expired_done": EXPIRED_DONE}

    def __init__(self, client: RedisCluster, prefix: str = "", retry_s: float = RETRY_S, *,
                 min_replicas_ack: int = 0, wait_timeout_ms: int = 1000, max_dedup: int = MAX_DEDUP) -> None:
        super().__init__(client, prefix, retry_s)
        self._replicas = min_replicas_ack  # cluster.min_replicas_ack: a commit or post waits for that many
        self._wait_ms = wait_timeout_ms
        self._max_dedup = max_dedup
        self._replay_ms = int(2 * retry_s * 1000) + REPLAY_MARGIN_MS

    def _log_keys(self, group: str) -> list[str]:
        """log, lease."""
        tag = tag_of(group)
        return [self.key("g", tag, "log"), self.key("g", tag, "lease")]

    def _hint_key(self, group: str) -> str:
        return f"{self._prefix}gx:{zlib.crc32(group.encode()) % HINT_SHARDS}"

    async def commit_logged(self, before: Group | None, decision: Decision, max_groups_per_user: int,
                            expires_ms: int) -> bool:
        notify = list(decision.notify)
        logged = [(event.gseq, json.dumps({"s": event.gseq, "w": event.encode().decode(), "to": notify,
                                           "e": expires_ms})) for event in decision.events]
        return await self._commit(before, decision.after, max_groups_per_user, logged)

    async def _run_commit(self, keys: list[str], args: list[str | int]) -> Any:
        return await self.run_replicated("groups.commit", keys, args, self._replicas, self._wait_ms)

    async def post(self, post: GroupPost) -> tuple[PostStatus, int]:
        meta, members, _ = self._keys(post.group)
        log, _ = self._log_keys(post.group)
        keys = [meta, members, log, self.key("g", tag_of(post.group), "d")]
        args: list[str | int] = [
            f"{post.sender}/{post.msg_id}", post.dedup_until_ms, self._max_dedup, body_key(self, post.group, ""),
            post.wire, post.expires_ms, post.expires_ms + BODY_GRACE_MS, post.origin, post.sender,
            post.msg_id, *self._receipt_prefixes(post.group), post.seen_max, post.max_tracked]
        status, gseq = await self.run_replicated("groups.post", keys, args, self._replicas, self._wait_ms)
        return PostStatus(status), int(gseq)

    def _receipt_prefixes(self, group: str) -> list[str]:
        """tracking, index, sender-set (storage/redis/group_receipts.py)."""
        tag = tag_of(group)
        return [self.key("g", tag, "t", ""), self.key("g", tag, "i", ""), self.key("g", tag, "u", "")]

    async def mark(self, group: str, marks: list[Mark], token: str) -> list[Completed]:
        if not marks:
            return []
        args: list[str | int] = [*self._receipt_prefixes(group), self._replay_ms, *mark_args(marks)]
        keys = [self.key("g", tag_of(group), "r", token), self._pending_key(group)]
        return completed(await self.run("groups.mark", keys, args))

    def _pending_key(self, group: str) -> str:
        return self.key("g", tag_of(group), "p")

    async def pending(self, group: str) -> list[int]:
        return sorted(int(gseq) for gseq in await self.command("groups.pending", "SMEMBERS", self._pending_key(group)))

    async def receipted(self, group: str, done: list[Completed]) -> None:
        if done:
            await self.run("groups.receipted", [self._pending_key(group)],
                           [*self._receipt_prefixes(group), *receipted_args(done)])

    def _expiring_key(self, group: str) -> str:
        return self.key("g", tag_of(group), "xp")

    async def expire(self, group: str, expiries: list[GroupExpiry], token: str) -> list[Completed]:
        if not expiries:
            return []
        keys = [self.key("g", tag_of(group), "r", token), self._expiring_key(group), self._pending_key(group)]
        args: list[str | int] = [body_key(self, group, ""), *self._receipt_prefixes(group), self._replay_ms,
                                 *expiry_args(expiries)]
        return completed(await self.run("groups.expire", keys, args))

    async def expiring(self, group: str) -> list[int]:
        return sorted(int(gseq) for gseq in await self.command("groups.expiring", "SMEMBERS",
                                                               self._expiring_key(group)))

    async def expired_done(self, group: str, gseqs: list[int]) -> None:
        if gseqs:
            await self.run("groups.expired_done", [self._expiring_key(group)], [body_key(self, group, ""), *gseqs])

    async def tracked(self, group: str, msg_id: str) -> list[TrackedRow]:
        tracking, index, _ = self._receipt_prefixes(group)
        return tracked_rows(group, await self.run("groups.tracked", [index + msg_id], [tracking]))

    async def entries(self, group: str, limit: int) -> list[LogEntry]:
        rows = await self.command("groups.entries", "ZRANGE", self._log_keys(group)[0], "0", str(limit - 1))
        return [decode_entry(group, row) for row in rows]

    async def take_lease(self, group: str, token: str, lease_ms: int) -> bool:
        return bool(await self.command("groups.lease", "SET", self._log_keys(group)[1], token, "NX", "PX",
                                       str(lease_ms)))

    async def fanned(self, group: str, token: str, upto: int, unheld: list[int], lease_ms: int) -> bool:
        args: list[str | int] = [token, lease_ms, upto, body_key(self, group, ""), *unheld]
        return bool(await self.run("groups.fanned", self._log_keys(group), args))

    async def release(self, group: str, token: str) -> bool:
        return bool(await self.run("groups.release", self._log_keys(group), [token]))

    async def hint(self, group: str, at_ms: int) -> None:
        await self.command("groups.hint", "ZADD", self._hint_key(group), "GT", str(at_ms), group)

    async def clear_hint(self, group: str, at_ms: int) -> None:
        await self.run("groups.clear_hint", [self._hint_key(group)], [group, at_ms])

    async def due(self, now_ms: int, limit: int) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        for n in range(HINT_SHARDS):
            rows = await self.command("groups.due", "ZRANGE", f"{self._prefix}gx:{n}", "-inf", str(now_ms), "BYSCORE",
                                      "LIMIT", "0", str(limit), "WITHSCORES")
            found += [(str(group), int(float(score))) for group, score in zip(rows[::2], rows[1::2], strict=True)]
            if len(found) >= limit:
                break
        return found[:limit]
