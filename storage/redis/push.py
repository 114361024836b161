"""Push in cluster mode on the Redis Cluster: ``bridge.push.cluster_store.ClusterPushStore``.

Keys, tagged by the device's shard ``s<n>`` (n < SHARDS, from a CRC of the client id) rather than by
its user: a wake-up and its entry in the due index must change in one script, and a node sweeps a
shard's index in one script that leases what is due. Push state never needs to be atomic with the
user's other keys, so the shard is the better tag; the 16 shards spread over the masters.

- ``{prefix}push:{s<n>}:<client id>``  hash: ``reg`` (the registration, JSON, with the preview key),
  ``wake`` (the queued wake-up, JSON), ``why`` (staged or grace), ``preview`` (the newest preview of
  the messages it stands for, only with ``push.include_preview``: replaced by each newer one, gone
  with the wake-up), ``lease`` (the token of the node sending it), ``hold`` (ms: no new wake-up due
  before, rule 3), ``gone`` ("1": told at the next connection)
- ``{prefix}pushx:{s<n>}``             sorted set, client id -> when its wake-up is due (or, leased,
  when the lease ends): the due index, exactly the devices with a wake-up queued

Records are the dataclasses' fields as JSON objects, read back by name (a field unknown to the
reader is ignored, one missing takes its default): a new optional field needs no migration.

The rules decided here (bridge/push/core.py has them for one process): a wake-up is queued only for
a registered device without one (rules 1 and 4), no sooner than ``hold`` (rule 3), within
``max_per_shard`` (rule 5); the retries' times and giving up (rule 6) are the core's ``retried``.
Every script is safe to run twice (a reply lost in a failover): a second queue keeps the first, a
second settle finds its lease gone, a second online or unregister finds nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import zlib
from dataclasses import replace
from typing import Any, ClassVar, Final, TypeVar

from bridge.push.cluster_store import Arrival, Queued, Settlement, Taken, Why
from bridge.push.core import QueuedWake
from bridge.push.provider import PushTarget
from storage.redis.client import RedisStore

SHARDS: Final = 16

# KEYS: record. ARGV: registration.
REGISTER = """
redis.call('HSET', KEYS[1], 'reg', ARGV[1])
redis.call('HDEL', KEYS[1], 'gone')
return 1
"""

# KEYS: record, index. ARGV: client id. Returns 1 if it had a registration.
UNREGISTER = """
local had = redis.call('HEXISTS', KEYS[1], 'reg')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return had
"""

# KEYS: record, index. ARGV: client id. Returns {registration or '', gone 0/1, held 0/1}.
ONLINE = """
local r = redis.call('HMGET', KEYS[1], 'reg', 'gone', 'hold')
redis.call('HDEL', KEYS[1], 'wake', 'why', 'preview', 'lease', 'gone')
redis.call('ZREM', KEYS[2], ARGV[1])
return {r[1] or '', r[2] and 1 or 0, r[3] and 1 or 0}
"""

# KEYS: record, index. ARGV: client id, wake-up (due now, no preview), now, why, max per shard, preview or ''.
# Returns {'queued', wake-up} or {'kept'} or {'full'}. A preview replaces the queued one's (rule 8),
# also while it is being sent: a retry carries the newest.
QUEUE = """
if redis.call('HEXISTS', KEYS[1], 'reg') == 0 then return {'kept'} end
if redis.call('HEXISTS', KEYS[1], 'wake') == 1 then
  if ARGV[4] == 'grace' then redis.call('HSET', KEYS[1], 'why', 'grace') end
  if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'preview', ARGV[6]) end
  return {'kept'}
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return {'full'} end
local wake = cjson.decode(ARGV[2])
local late = tonumber(redis.call('HGET', KEYS[1], 'hold') or '0') - tonumber(ARGV[3])
if late > 0 then
  wake.due_ms = wake.due_ms + late
  wake.expires_ms = wake.expires_ms + late
end
local raw = cjson.encode(wake)
redis.call('HSET', KEYS[1], 'wake', raw, 'why', ARGV[4])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'preview', ARGV[6]) end
redis.call('ZADD', KEYS[2], wake.due_ms, ARGV[1])
return {'queued', raw}
"""

# KEYS: index. ARGV: now, limit, lease ms, lease, record prefix.
# Returns {wake-ups in the shard, then client id, registration, wake-up, why, preview or '' per wake-up leased}.
TAKE = """
local rows = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[3])
local out = {0}
for _, id in ipairs(rows) do
  local record = ARGV[5] .. id
  local r = redis.call('HMGET', record, 'reg', 'wake', 'why', 'preview')
  if r[1] and r[2] then
    redis.call('HSET', record, 'lease', ARGV[4])
    redis.call('ZADD', KEYS[1], until_ms, id)
    for _, v in ipairs({id, r[1], r[2], r[3] or 'staged', r[4] or ''}) do table.insert(out, v) end
  else
    redis.call('HDEL', record, 'wake', 'why', 'preview', 'lease')
    redis.call('ZREM', KEYS[1], id)
  end
end
out[1] = redis.call('ZCARD', KEYS[1])
return out
"""

# KEYS: record, index. ARGV: client id, lease, registration taken, sent 0/1, hold until, gone 0/1,
# wake-up again or ''. Returns 1 if it changed something.
SETTLE = """
local r = redis.call('HMGET', KEYS[1], 'reg', 'lease')
if ARGV[6] == '1' and r[1] == ARGV[3] then
  redis.call('HDEL', KEYS[1], 'reg', 'wake', 'why', 'preview', 'lease', 'hold')
  redis.call('HSET', KEYS[1], 'gone', '1')
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
if r[2] ~= ARGV[2] then return 0 end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'wake', ARGV[7])
  redis.call('HDEL', KEYS[1], 'lease')
  redis.call('ZADD', KEYS[2], cjson.decode(ARGV[7]).due_ms, ARGV[1])
  return 1
end
redis.call('HDEL', KEYS[1], 'wake', 'why', 'preview', 'lease')
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'hold', ARGV[5]) end
return 1
"""

# KEYS: records of one shard. Returns each one's registration or ''.
REGISTRATIONS = """
local out = {}
for i, record in ipairs(KEYS) do out[i] = redis.call('HGET', record, 'reg') or '' end
return out
"""

R = TypeVar("R")


def encode(record: Any) -> str:
    """A dataclass's fields as a JSON object."""
    return json.dumps(dataclasses.asdict(record), separators=(",", ":"))


def decode(cls: type[R], raw: str) -> R:
    """``encode``'s inverse, by field name: unknown fields ignored, missing ones defaulted. Whole
    numbers come back as int (Lua's cjson may write them as floats)."""
    obj = json.loads(raw)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{name: int(value) if isinstance(value, float) and value.is_integer() else value
                  for name, value in obj.items() if name in known})


class RedisPushStore(RedisStore):
    SCRIPTS: ClassVar[dict[str, str]] = {
        "push.register": REGISTER, "push.unregister": UNREGISTER, "push.online": ONLINE, "push.queue": QUEUE,
        "push.take": TAKE, "push.settle": SETTLE, "push.registrations": REGISTRATIONS}
    shards = SHARDS

    def shard(self, client_id: str) -> int:
        return zlib.crc32(client_id.encode()) % SHARDS

    def _record(self, client_id: str) -> str:
        return self.key("push", f"s{self.shard(client_id)}", client_id)

    def _index(self, shard: int) -> str:
        return self.key("pushx", f"s{shard}")

    def _keys(self, client_id: str) -> list[str]:
        return [self._record(client_id), self._index(self.shard(client_id))]

    async def register(self, target: PushTarget) -> None:
        await self.run("push.register", [self._record(target.client_id)], [encode(target)])

    async def unregister(self, client_id: str) -> bool:
        return bool(await self.run("push.unregister", self._keys(client_id), [client_id]))

    async def online(self, client_id: str) -> Arrival:
        reg, gone, held = await self.run("push.online", self._keys(client_id), [client_id])
        return Arrival(decode(PushTarget, reg) if reg else None, bool(gone), bool(held))

    async def import_gone(self, client_id: str) -> None:
        """A gone mark from a SQLite data folder (``chat-broker migrate``)."""
        await self.command("push.import_gone", "HSET", self._record(client_id), "gone", "1")

    async def acked(self, client_id: str) -> None:
        await self.command("push.acked", "HDEL", self._record(client_id), "hold")

    async def registrations(self, client_ids: list[str]) -> dict[str, PushTarget]:
        by_shard: dict[int, list[str]] = {}
        for client_id in dict.fromkeys(client_ids):
            by_shard.setdefault(self.shard(client_id), []).append(client_id)
        shards = list(by_shard.values())
        replies = await asyncio.gather(*(self.run("push.registrations", [self._record(c) for c in ids], [])
                                         for ids in shards))
        return {client_id: decode(PushTarget, reg) for ids, regs in zip(shards, replies, strict=True)
                for client_id, reg in zip(ids, regs, strict=True) if reg}

    async def queue(self, wake: QueuedWake, why: Why, max_per_shard: int) -> tuple[Queued, QueuedWake | None]:
        reply = await self.run("push.queue", self._keys(wake.client_id), [
            wake.client_id, encode(replace(wake, preview=None)), wake.due_ms, why.value, max_per_shard,
            wake.preview or ""])
        return Queued(reply[0]), decode(QueuedWake, reply[1]) if len(reply) > 1 else None

    async def take(self, shard: int, now_ms: int, limit: int, lease_ms: int, lease: str) -> tuple[list[Taken], int]:
        count, *rows = await self.run("push.take", [self._index(shard)],
                                      [now_ms, limit, lease_ms, lease, self.key("push", f"s{shard}", "")])
        taken = [Taken(replace(decode(QueuedWake, rows[i + 2]), preview=rows[i + 4] or None),
                       decode(PushTarget, rows[i + 1]), Why(rows[i + 3]), lease)
                 for i in range(0, len(rows), 5)]
        return taken, int(count)

    async def settle(self, taken: Taken, settlement: Settlement) -> None:
        again = settlement.again
        await self.run("push.settle", self._keys(taken.wake.client_id), [
            taken.wake.client_id, taken.lease, encode(taken.target), int(settlement.sent), settlement.hold_until_ms,
            int(settlement.gone), "" if again is None else encode(replace(again, preview=None))])
