"""The login throttle shared by the nodes of a cluster (``broker.login_throttle.LoginThrottle``):
``LoginGuard``'s rules, with each key's record in Redis, so failed logins spread over N nodes count
as they would on one.

Keys: ``{prefix}lt:{user:alice}``, ``{prefix}lt:{addr:10.0.0.7}``: the throttle key itself is the
hash tag, each key its own slot; a hash ``f`` (failures), ``l`` (last failure, ms), ``b`` (blocked
until, ms). Every write sets PEXPIRE ``forget_after``, so a key disappears by itself once
forgotten (the bound ``LoginGuard`` keeps with ``max_keys``); the scripts also treat a record whose
last failure is older than that as absent, so the arithmetic follows the ``now`` passed in (a
shared wall clock in ms: every node must read the same time).

One Lua script per call per key. ``begin`` first reads every key (refused if any is blocked),
then counts the failure key by key, each script refusing if its key became blocked meanwhile
(a concurrent attempt on another node); the keys already counted are then released, as
``LoginGuard.succeeded`` releases. A ``begin`` retried over a failover may count twice: it errs
towards throttling.

Redis failing (``StoreError`` after ``call``'s retries): the attempt is judged by the node's own
``LoginGuard`` instead, and logged (docs/SECURITY.md). That guard's blocks keep applying after
Redis is back, so failures counted during an outage are not lost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

from redis.asyncio.cluster import RedisCluster

from bridge.store import StoreError
from broker.login_guard import LoginGuard
from storage.redis.client import RETRY_S, RedisStore

log = logging.getLogger(__name__)

# Shared by the scripts: the record of KEYS[1] at now (ARGV[1]), nil if absent or forgotten
# (ARGV[2]: forget after, ms); the delay after f failures (ARGV[3..5]: free, base ms, max ms).
_COMMON = """
local function record(now, forget)
  local r = redis.call('HMGET', KEYS[1], 'f', 'l', 'b')
  if not r[1] or now - tonumber(r[2]) > forget then return nil end
  return {tonumber(r[1]), tonumber(r[2]), tonumber(r[3])}
end
local function delay(f)
  local over = f - tonumber(ARGV[3])
  if over <= 0 then return 0 end
  return math.min(tonumber(ARGV[4]) * 2 ^ math.min(over - 1, 32), tonumber(ARGV[5]))
end
"""

# Returns the wait (ms) of KEYS[1] at now.
RETRY_AFTER = _COMMON + """
local r = record(tonumber(ARGV[1]), tonumber(ARGV[2]))
if not r then return 0 end
return math.max(r[3] - tonumber(ARGV[1]), 0)
"""

# A failure at now unless the key is blocked: returns the wait (ms) if blocked (nothing counted), else 0.
BEGIN = _COMMON + """
local now = tonumber(ARGV[1])
local r = record(now, tonumber(ARGV[2])) or {0, now, now}
if r[3] - now > 0 then return r[3] - now end
local f = r[1] + 1
local d = delay(f)
local b = r[3]
if d > 0 then b = now + d end
redis.call('HSET', KEYS[1], 'f', f, 'l', now, 'b', b)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
"""

# Takes one failure back (LoginGuard.succeeded's ``released``). ARGV[1], ARGV[2] unused.
RELEASE = _COMMON + """
local r = redis.call('HMGET', KEYS[1], 'f', 'l', 'b')
if not r[1] then return 0 end
local f = tonumber(r[1]) - 1
if f <= 0 then redis.call('DEL', KEYS[1]) return 0 end
redis.call('HSET', KEYS[1], 'f', f, 'b', math.min(tonumber(r[3]), tonumber(r[2]) + delay(f)))
return 0
"""


class RedisLoginThrottle(RedisStore):
    """``LoginGuard``'s rules on Redis, with ``fallback`` (this node's guard) while Redis fails."""

    SCRIPTS: ClassVar[dict[str, str]] = {"retry_after": RETRY_AFTER, "begin": BEGIN, "release": RELEASE}

    def __init__(self, client: RedisCluster, prefix: str, fallback: LoginGuard, free_failures: int,
                 base_delay_s: float, max_delay_s: float, forget_after_s: float, retry_s: float = RETRY_S) -> None:
        super().__init__(client, prefix, retry_s)
        self.fallback = fallback
        self._rules = [free_failures, round(base_delay_s * 1000), round(max_delay_s * 1000),
                       round(forget_after_s * 1000)]

    def _args(self, now: float) -> list[str | int]:
        free, base, most, forget = self._rules
        return [round(now * 1000), forget, free, base, most]

    async def _wait(self, name: str, key: str, now: float) -> float:
        return int(await self.run(name, [self.key("lt", key)], self._args(now))) / 1000

    async def _shared_wait(self, keys: list[str], now: float) -> float:
        waits = [await self._wait("retry_after", key, now) for key in keys]
        return max(waits, default=0.0)

    async def retry_after(self, keys: list[str], now: float) -> float:
        local = self.fallback.retry_after(keys, now)
        try:
            return max(local, await self._shared_wait(keys, now))
        except StoreError as exc:
            log.warning("login throttle: Redis failed, this node's own counts apply: %s", exc)
            return local

    async def begin(self, keys: list[str], now: float) -> float:
        wait = self.fallback.retry_after(keys, now)  # what this node counted while Redis failed
        if wait > 0:
            return wait
        try:
            wait = await self._shared_wait(keys, now)
            if wait > 0:
                return wait
            counted: list[str] = []
            for key in keys:
                wait = await self._wait("begin", key, now)
                if wait > 0:  # blocked by a concurrent attempt since the read
                    await self._release(counted)
                    return wait
                counted.append(key)
            return 0.0
        except StoreError as exc:
            log.warning("login throttle: Redis failed, this node's own counts apply: %s", exc)
            return self.fallback.begin(keys, now)

    async def _release(self, keys: Sequence[str]) -> None:
        for key in keys:
            await self.run("release", [self.key("lt", key)], self._args(0.0))

    async def succeeded(self, keys: Sequence[str], released: Sequence[str] = ()) -> None:
        self.fallback.succeeded(keys, released)
        try:
            for key in keys:
                await self.command("succeeded", "DEL", self.key("lt", key))
            await self._release(released)
        except StoreError as exc:
            log.warning("login throttle: Redis failed, a success left its keys counted: %s", exc)
