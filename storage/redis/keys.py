"""The key directory in a Redis Cluster: ``bridge.keys.store.KeyStore``, as storage/sqlite/keys.py
keeps it in SQLite.

Keys (hash tag: the user, so one user's keys share a slot; see storage/redis/client.py):

- ``{prefix}k:{bob}:id``               hash device -> ``"<curve25519> <ed25519>"`` (its identity keys)
- ``{prefix}k:{bob}:dk``               hash device -> its device_keys object as published (JSON)
- ``{prefix}k:{bob}:fb``               hash device -> its fallback key, JSON ``[id, key, signature]``
- ``{prefix}k:{bob}:otk:{device}``     hash key id -> JSON ``[key, signature]`` (unclaimed one-time keys)
- ``{prefix}k:{bob}:otq:{device}``     list of those key ids, in publish order (claimed first to last)
- ``{prefix}k:{bob}:claimed:{device}`` set of claimed key ids (a retried publish cannot bring one back)

Publish, claim and remove are each one Lua script on the user's slot, so a one-time key is handed
out at most once however many claims race, on however many nodes. A publish checks every rule
before it writes anything: a refused publish stores nothing.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Final

from redis.asyncio.cluster import RedisCluster

from bridge.keys.core import KeyRuleError, OneTimeKey, Publish, claimed_item
from bridge.store import StoreError
from chatproto import MAX_ONE_TIME_KEYS_STORED
from storage.redis.client import RETRY_S, RedisStore

CLAIM_ATTEMPTS: Final = 8  # reads of a user's keyed devices per claim, should they keep changing

# KEYS: id, dk, fb, otk, otq, claimed of the device. ARGV: device, identity ('' without
# device_keys), device_keys JSON, fallback JSON (or ''), the stored limit, then (id, JSON) pairs.
# Returns {stored, has device keys} or a refusal {-1} (device_keys first), {-2, id} (same id,
# another key), {-3, count} (over the limit).
PUBLISH = """
local device, identity, fallback = ARGV[1], ARGV[2], ARGV[4]
local current = redis.call('HGET', KEYS[1], device)
if identity == '' and not current and (#ARGV > 5 or fallback ~= '') then return {-1} end
local reset = identity ~= '' and current and current ~= identity
local stored = 0
if not reset then stored = redis.call('HLEN', KEYS[4]) end
local fresh = {}
for i = 6, #ARGV, 2 do
  local id, value = ARGV[i], ARGV[i + 1]
  local old = false
  if not reset then
    if redis.call('SISMEMBER', KEYS[6], id) == 1 then old = value else old = redis.call('HGET', KEYS[4], id) end
  end
  if old and old ~= value then return {-2, id} end
  if not old then
    table.insert(fresh, i)
    stored = stored + 1
  end
end
if stored > tonumber(ARGV[5]) then return {-3, stored} end
if reset then
  redis.call('DEL', KEYS[4], KEYS[5], KEYS[6])
  redis.call('HDEL', KEYS[3], device)
end
if identity ~= '' then
  redis.call('HSET', KEYS[1], device, identity)
  redis.call('HSET', KEYS[2], device, ARGV[3])
end
for _, i in ipairs(fresh) do
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
  redis.call('RPUSH', KEYS[5], ARGV[i])
end
if fallback ~= '' then redis.call('HSET', KEYS[3], device, fallback) end
if identity ~= '' or current then return {stored, 1} end
return {stored, 0}
"""

# KEYS: id, fb, then otk, otq, claimed of each device to claim for. ARGV: the user's keyed devices
# as the caller read them (sorted, newline-joined), then the devices. Returns false if the keyed
# devices changed since (the caller reads them again), else flat {device, key id or '', JSON}.
CLAIM = """
local keyed = redis.call('HKEYS', KEYS[1])
table.sort(keyed)
if table.concat(keyed, '\\n') ~= ARGV[1] then return false end
local out = {}
for n = 2, #ARGV do
  local device, base = ARGV[n], 3 * (n - 2) + 3  -- KEYS[base]: its otk
  local id = redis.call('LPOP', KEYS[base + 1])
  if id then
    local value = redis.call('HGET', KEYS[base], id)
    redis.call('HDEL', KEYS[base], id)
    redis.call('SADD', KEYS[base + 2], id)
    table.insert(out, device); table.insert(out, id); table.insert(out, value)
  else
    local fallback = redis.call('HGET', KEYS[2], device)
    if fallback then
      table.insert(out, device); table.insert(out, ''); table.insert(out, fallback)
    end
  end
end
return out
"""

COUNT = """
return {redis.call('HLEN', KEYS[1]), redis.call('HEXISTS', KEYS[2], ARGV[1])}
"""

# KEYS: id, dk, fb, otk, otq, claimed of the device.
REMOVE = """
for i = 1, 3 do redis.call('HDEL', KEYS[i], ARGV[1]) end
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6])
return 1
"""

# ``import_device`` (chat-broker migrate). KEYS: id, dk, fb, otk, otq, claimed of the device.
# ARGV: device, identity, device_keys JSON, fallback JSON (or ''), the number n of claimed ids, the
# n ids, then (id, JSON) pairs of unclaimed keys in claim order. Returns the unclaimed keys stored,
# or -1 (nothing written) if the device has other identity keys here.
IMPORT = """
local device, identity = ARGV[1], ARGV[2]
local current = redis.call('HGET', KEYS[1], device)
if current and current ~= identity then return -1 end
redis.call('HSET', KEYS[1], device, identity)
redis.call('HSETNX', KEYS[2], device, ARGV[3])
if ARGV[4] ~= '' then redis.call('HSETNX', KEYS[3], device, ARGV[4]) end
local claimed = tonumber(ARGV[5])
for i = 6, 5 + claimed do
  redis.call('SADD', KEYS[6], ARGV[i])
  if redis.call('HDEL', KEYS[4], ARGV[i]) == 1 then redis.call('LREM', KEYS[5], 0, ARGV[i]) end
end
for i = 6 + claimed, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('SISMEMBER', KEYS[6], id) == 0 and redis.call('HSETNX', KEYS[4], id, ARGV[i + 1]) == 1 then
    redis.call('RPUSH', KEYS[5], id)
  end
end
return redis.call('HLEN', KEYS[4])
"""


def fallback_json(fallback: OneTimeKey | None) -> str:
    """A fallback key as ``k:{user}:fb`` holds it ('' for none)."""
    return "" if fallback is None else json.dumps([fallback.id, fallback.key, fallback.signature])


class RedisKeyStore(RedisStore):
    SCRIPTS: ClassVar[dict[str, str]] = {"keys.publish": PUBLISH, "keys.claim": CLAIM, "keys.count": COUNT,
                                         "devices.remove": REMOVE, "keys.import": IMPORT}

    def __init__(self, client: RedisCluster, prefix: str = "", retry_s: float = RETRY_S, *,
                 min_replicas_ack: int = 0, wait_timeout_ms: int = 1000) -> None:
        super().__init__(client, prefix, retry_s)
        # cluster.min_replicas_ack: a claim is answered once that many replicas hold the pop (Redis
        # WAIT). Else a master that dies before replicating it hands the same one-time key out again
        # from its promoted replica, and the second claimer's messages cannot be decrypted (found by
        # `python -m bench chaos --cluster`: hundreds of undecryptable messages after a master kill).
        self._replicas = min_replicas_ack
        self._wait_ms = wait_timeout_ms

    def _device_keys(self, user: str, device: str) -> list[str]:
        """id, dk, fb, otk, otq, claimed: everything of one device."""
        return [self.key("k", user, "id"), self.key("k", user, "dk"), self.key("k", user, "fb"),
                *(self.key("k", user, kind, device) for kind in ("otk", "otq", "claimed"))]

    async def publish(self, user: str, device: str, publish: Publish) -> tuple[int, bool]:
        new = publish.device_keys
        fallback = publish.fallback_key
        args: list[str | int] = [
            device, "" if new is None else f"{new.curve25519} {new.ed25519}",
            "" if new is None else json.dumps(new.signed),
            fallback_json(fallback), MAX_ONE_TIME_KEYS_STORED]
        for key in publish.one_time_keys:
            args += [key.id, json.dumps([key.key, key.signature])]
        result = await self.run("keys.publish", self._device_keys(user, device), args)
        if result[0] == -1:
            raise KeyRuleError.device_keys_first()
        if result[0] == -2:
            raise KeyRuleError.one_time_key_conflict(result[1])
        if result[0] == -3:
            raise KeyRuleError.too_many_one_time_keys(result[1])
        return int(result[0]), bool(result[1])

    async def import_device(self, user: str, device: str, identity: tuple[str, str], signed: dict[str, Any],
                            one_time_keys: list[OneTimeKey], fallback: OneTimeKey | None, claimed: list[str]) -> int:
        """Add a device's keys as another store holds them (``chat-broker migrate``): identity keys
        (curve25519, ed25519), the device_keys object, unclaimed one-time keys in claim order, the
        fallback key and the ids claimed already, which are never offered again (nor are ids this
        cluster handed out). Done again it changes nothing. Returns the unclaimed keys stored, or -1
        (nothing written) if the device has other identity keys here."""
        args: list[str | int] = [device, " ".join(identity), json.dumps(signed), fallback_json(fallback),
                                 len(claimed), *claimed]
        for key in one_time_keys:
            args += [key.id, json.dumps([key.key, key.signature])]
        return int(await self.run("keys.import", self._device_keys(user, device), args))

    async def count(self, user: str, device: str) -> tuple[int, bool]:
        stored, fallback = await self.run("keys.count", [self.key("k", user, "otk", device),
                                                         self.key("k", user, "fb")], [device])
        return int(stored), bool(fallback)

    async def device_keys(self, user: str) -> dict[str, dict[str, Any]]:
        found = await self.command("keys.list", "HGETALL", self.key("k", user, "dk"))
        return {str(device): json.loads(signed) for device, signed in sorted(found.items())}

    async def claim(self, user: str, devices: list[str] | None) -> dict[str, dict[str, Any]]:
        ids = self.key("k", user, "id")
        for _ in range(CLAIM_ATTEMPTS):  # again only if the user's keyed devices changed in between
            keyed = sorted(await self.command("keys.claim", "HKEYS", ids))
            targets = keyed if devices is None else [d for d in keyed if d in devices]
            keys = [ids, self.key("k", user, "fb")]
            for device in targets:
                keys += [self.key("k", user, kind, device) for kind in ("otk", "otq", "claimed")]
            out = await self.run_replicated("keys.claim", keys, ["\n".join(keyed), *targets], self._replicas,
                                            self._wait_ms)
            if out is not None:
                break
        else:  # a user whose devices churn must not hold a claimer in this loop
            raise StoreError(f"redis keys.claim: {user}'s devices changed {CLAIM_ATTEMPTS} times during the claim")
        claimed: dict[str, dict[str, Any]] = {}
        for device, key_id, value in zip(out[::3], out[1::3], out[2::3], strict=True):
            if key_id:
                key, signature = json.loads(value)
                claimed[device] = claimed_item(OneTimeKey(key_id, key, signature), False)
            else:
                claimed[device] = claimed_item(OneTimeKey(*json.loads(value)), True)
        return claimed

    async def remove_device(self, user: str, device: str) -> None:
        await self.run("devices.remove", self._device_keys(user, device), [device])

    async def keyed_devices(self) -> list[tuple[str, str, str]]:
        """Every keyed device, read once at start. SCAN on every master for the ``k:{user}:id``
        hashes rather than an index set on one slot: an index would be a second write on another
        slot for every publish and removal (not in the same script, so it could disagree with the
        keys) and one hot key for all users; a scan costs O(keys) but only at start."""
        async def scan() -> list[tuple[str, str, str]]:
            head, tail = f"{self._prefix}k:{{", "}:id"
            found = []
            async for name in self._client.scan_iter(match=f"{head}*{tail}", count=1000):
                user = str(name)[len(head):-len(tail)]
                for device, identity in (await self._client.execute_command("HGETALL", name)).items():
                    found.append((user, str(device), str(identity).split()[0]))
            return sorted(found)
        return await self.call("keys.keyed_devices", scan)
