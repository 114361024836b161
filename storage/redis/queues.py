"""Every device's staging queue in a Redis Cluster: ``bridge.cluster.store.QueueStore``.

Keys (hash tag: the user, so one user's keys share a slot; see storage/redis/client.py). A device
is named by its id within the user (``phone``), ``*`` for the placeholder ``bob.*``:

- ``{prefix}q:{bob}:{device}``       sorted set, score = seq, member = the item as a JSON array
  ``[seq, expires_ms, "<sender>/<msg_id>" or "", payload]``; payload is null (a plain message: the
  body is on the record), the device's olm ciphertext, or a receipt's wire JSON (both as strings)
- ``{prefix}qe:{bob}:{device}``      sorted set, score = expires_ms, member = seq (what expires when)
- ``{prefix}qs:{bob}``               hash device -> its last seq
- ``{prefix}qm:{bob}:{sender}/{id}`` hash: the message record, kept once per recipient user while
  ``refs`` items refer to it: ``wire`` (the MsgItem as sent, seq 0; body "" if olm), ``to``,
  ``refs``, ``track`` (staged with ``delivery``), ``delivered`` and ``expired`` (reported already)
- ``{prefix}qd:{bob}:{sender}/{id}`` dedup mark, expiring at ``dedup_until_ms`` (PXAT)
- ``{prefix}qr:{bob}:{token}``       a script's reply, kept ``replay_ms`` (see "Retries")
- ``{prefix}qb:{bob}:{bucket}``      token bucket: ``tokens``, ``ts`` (ms, the caller's clock)
- ``{prefix}qx:{n}``                 the expiry index, n < EXPIRY_SHARDS: sorted set client id ->
  the earliest ``expires_ms`` of its queue. Not tagged: the shards spread over the slots.

Every queue operation is one Lua script on the user's slot. ``stage`` with ``devices=None`` reads
the user's devices from the users store's hash (storage/redis/users.py) in the same script, so a
device registering concurrently gets the item or not, never half of a message.

Seqs: ``qs`` is never reset, not even by ``remove_device``: a device id removed and installed
again keeps counting up, so an install that still holds its old "last seq" cannot skip new items.

Records: a record goes with its last item (refs 0). ``delivered`` and ``expired`` only need
answering while an item of it exists (an ack or an expiry needs one; ``mark_delivered`` of a
message gone answers nothing), so nothing outlives the items. Every delivery-tracked message that
expires is reported once, delivered or not (bridge/messaging/core.py rule 7 does the same).

Retries: ``call`` runs a script again when its reply was lost with a failed master. ``stage``,
``ack``, ``mark_delivered`` and ``expire`` take a random token; the first run stores its reply
under it (``stage`` always; the others only when they report something), and a rerun with the
token returns that reply: a retried stage neither stages twice nor turns into ``DUPLICATE``, a
retried ack still reports ``delivered``. ``adopt_placeholder`` and ``remove_device`` rerun find
nothing to do and answer 0; ``allow`` rerun takes a second token (only across a failover).

The expiry index only hints (a second command, on another slot, after the script): a stale entry
costs one empty ``expire``. ``expire`` and ``remove_device`` drop the entry *before* their script
and ``expire`` re-adds the queue's earliest expiry after it, so a stage racing them never loses its
entry. A node dying between a stage and its hint leaves that queue unindexed until its next stage
or ``expire`` (the service expires a device's queue when it connects).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import zlib
from dataclasses import replace
from typing import ClassVar, Final

from redis.asyncio.cluster import RedisCluster

from bridge.cluster.store import MessageEntry, MessageRef, QueuedItem, Stage, StageResult, StageStatus, Swept
from bridge.directory import PLACEHOLDER_DEVICE
from bridge.store import StoreError
from chatproto import MsgItem, ReceiptItem
from storage.redis.client import RETRY_S, RedisStore
from storage.redis.users import devices_key

log = logging.getLogger(__name__)

EXPIRY_SHARDS: Final = 64
DUE_BATCH: Final = 8  # expiry shards read at once by ``due``
REPLAY_MARGIN_MS: Final = 10_000

# Shared by the scripts below. An item's ref ("<sender>/<id>" or "") is its third JSON field; ids
# are [A-Za-z0-9_-] (chatproto/ids.py), so a pattern finds it without decoding the payload.
COMMON = """
local function ref_of(member) return string.match(member, '^%[%d+,%-?%d+,"([^"]*)"') end
local function take(queue, expiry, seq)
  local member = redis.call('ZRANGE', queue, seq, seq, 'BYSCORE')[1]
  if member then
    redis.call('ZREMRANGEBYSCORE', queue, seq, seq)
    redis.call('ZREM', expiry, seq)
  end
  return member
end
local function release(record)
  if redis.call('HINCRBY', record, 'refs', -1) <= 0 then redis.call('DEL', record) end
end
local function earliest(expiry) return redis.call('ZRANGE', expiry, 0, 0, 'WITHSCORES')[2] or false end
local function keep(replay, reply, ms)
  reply = cjson.encode(reply)
  redis.call('SET', replay, reply, 'PX', ms)
  return reply
end
"""

# KEYS: the user's devices (users store), qs, record, dedup, replay. ARGV: queue prefix, expiry
# prefix, expires_ms, max_queue, dedup_until_ms, track, wire ('' for a receipt), recipient, ref as
# JSON, replay ms, then 'all' and the payload, or 'some' and (device, payload) pairs.
# Returns JSON ["staged", device, seq, ...], ["duplicate"] or ["queue_full"].
STAGE = COMMON + """
local done = redis.call('GET', KEYS[5])
if done then return done end
local dedup_until = tonumber(ARGV[5])
-- A duplicate writes its reply too: the WAIT after it (min_replicas_ack) then covers the first stage.
if dedup_until > 0 and redis.call('EXISTS', KEYS[4]) == 1 then return keep(KEYS[5], {'duplicate'}, ARGV[10]) end
local targets, payloads = {}, {}
if ARGV[11] == 'all' then
  targets = redis.call('HKEYS', KEYS[1])
  if #targets == 0 then targets = {ARGV[13]} end
  table.sort(targets)
  for i = 1, #targets do payloads[i] = ARGV[12] end
else
  for i = 12, #ARGV, 2 do
    if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
      table.insert(targets, ARGV[i]); table.insert(payloads, ARGV[i + 1])
    end
  end
end
for _, device in ipairs(targets) do
  if redis.call('ZCARD', ARGV[1] .. device) >= tonumber(ARGV[4]) then return '["queue_full"]' end
end
if dedup_until > 0 then redis.call('SET', KEYS[4], '1', 'PXAT', dedup_until) end
if ARGV[7] ~= '' and #targets > 0 then
  redis.call('HSETNX', KEYS[3], 'wire', ARGV[7])
  redis.call('HSETNX', KEYS[3], 'to', ARGV[8])
  redis.call('HINCRBY', KEYS[3], 'refs', #targets)
  if ARGV[6] == '1' then redis.call('HSET', KEYS[3], 'track', '1') end
end
local reply = {'staged'}
for i, device in ipairs(targets) do
  local seq = redis.call('HINCRBY', KEYS[2], device, 1)
  local member = '[' .. seq .. ',' .. ARGV[3] .. ',' .. ARGV[9] .. ',' .. payloads[i] .. ']'
  redis.call('ZADD', ARGV[1] .. device, seq, member)
  redis.call('ZADD', ARGV[2] .. device, ARGV[3], seq)
  table.insert(reply, device); table.insert(reply, seq)
end
return keep(KEYS[5], reply, ARGV[10])
"""

# KEYS: queue. ARGV: after seq, limit, record prefix. Returns flat {member, wire or ''}.
READ = COMMON + """
local out, wires = {}, {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], '(' .. ARGV[1], '+inf', 'BYSCORE', 'LIMIT', 0, ARGV[2])) do
  local ref = ref_of(member)
  if ref ~= '' and not wires[ref] then wires[ref] = redis.call('HGET', ARGV[3] .. ref, 'wire') or '' end
  table.insert(out, member); table.insert(out, wires[ref] or '')
end
return out
"""

# KEYS: queue, expiry, replay. ARGV: user, device, record prefix, replay ms, then seqs.
# Returns JSON [items removed, ref delivered, ...].
ACK = COMMON + """
local done = redis.call('GET', KEYS[3])
if done then return done end
local reply = {0}
for i = 5, #ARGV do
  local member = take(KEYS[1], KEYS[2], ARGV[i])
  if member then
    reply[1] = reply[1] + 1
    local ref = ref_of(member)
    if ref ~= '' then
      local record = ARGV[3] .. ref
      local to, track, delivered = unpack(redis.call('HMGET', record, 'to', 'track', 'delivered'))
      if track == '1' and not delivered and to == ARGV[1] and ARGV[2] ~= '*' then
        redis.call('HSET', record, 'delivered', '1')
        table.insert(reply, ref)
      end
      release(record)
    end
  end
end
if #reply == 1 then return cjson.encode(reply) end
return keep(KEYS[3], reply, ARGV[4])
"""

# KEYS: the records, then replay. ARGV: recipient, replay ms, then the ids (one per record).
# Returns JSON [count, id, ...].
MARK_DELIVERED = COMMON + """
local replay = KEYS[#KEYS]
local done = redis.call('GET', replay)
if done then return done end
local reply = {0}
for i = 1, #KEYS - 1 do
  local to, track, delivered = unpack(redis.call('HMGET', KEYS[i], 'to', 'track', 'delivered'))
  if track == '1' and not delivered and to == ARGV[1] then
    redis.call('HSET', KEYS[i], 'delivered', '1')
    table.insert(reply, ARGV[i + 2])
  end
end
reply[1] = #reply - 1
if reply[1] == 0 then return cjson.encode(reply) end
return keep(replay, reply, ARGV[2])
"""

# KEYS: queue, expiry, replay. ARGV: now_ms, record prefix, replay ms.
# Returns JSON [items dropped, earliest expiry left or false, ref, recipient, ...].
EXPIRE = COMMON + """
local done = redis.call('GET', KEYS[3])
if done then return done end
local reply = {0, false}
for _, seq in ipairs(redis.call('ZRANGE', KEYS[2], '-inf', ARGV[1], 'BYSCORE')) do
  local ref = ref_of(take(KEYS[1], KEYS[2], seq))
  reply[1] = reply[1] + 1
  if ref ~= '' then
    local record = ARGV[2] .. ref
    local to, track, expired = unpack(redis.call('HMGET', record, 'to', 'track', 'expired'))
    if track == '1' and not expired then
      redis.call('HSET', record, 'expired', '1')
      table.insert(reply, ref); table.insert(reply, to)
    end
    release(record)
  end
end
reply[2] = earliest(KEYS[2])
if #reply == 2 then return cjson.encode(reply) end
return keep(KEYS[3], reply, ARGV[3])
"""

# KEYS: placeholder queue, placeholder expiry, device queue, device expiry, qs. ARGV: device.
# Returns {moved, earliest expiry of the device's queue or nil}.
ADOPT = COMMON + """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, member in ipairs(members) do
  local seq = redis.call('HINCRBY', KEYS[5], ARGV[1], 1)
  local expires, rest = string.match(member, '^%[%d+,(%-?%d+)(,.*)$')
  redis.call('ZADD', KEYS[3], seq, '[' .. seq .. ',' .. expires .. rest)
  redis.call('ZADD', KEYS[4], expires, seq)
end
redis.call('DEL', KEYS[1], KEYS[2])
return {#members, earliest(KEYS[4])}
"""

# KEYS: queue, expiry. ARGV: record prefix. Returns the items dropped.
REMOVE = COMMON + """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, member in ipairs(members) do
  local ref = ref_of(member)
  if ref ~= '' then release(ARGV[1] .. ref) end
end
redis.call('DEL', KEYS[1], KEYS[2])
return #members
"""

# KEYS: bucket. ARGV: rate per s, burst, now_ms. A bucket is full again after (burst - tokens) /
# rate seconds: the key expires then (Redis's clock), as a full bucket and no bucket are the same.
ALLOW = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(state[1]) or burst, tonumber(state[2]) or now
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
  ts = now
end
local cost, ok = tonumber(ARGV[4]), 0
if cost < 0 then tokens = math.min(burst, tokens - cost); ok = 1  -- a refund
elseif tokens >= cost then tokens = tokens - cost; ok = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
if rate > 0 then redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * 1000 / rate) + 1000) end
return ok
"""

# ``import_dedup_mark`` (chat-broker migrate). KEYS: the mark. ARGV: until (ms). A mark already
# lasting as long or longer stays.
IMPORT_DEDUP = """
local last = tonumber(ARGV[1])
if redis.call('PEXPIRETIME', KEYS[1]) < last then redis.call('SET', KEYS[1], '1', 'PXAT', last) end
return 1
"""

# ``import_seq_floor`` (chat-broker migrate). KEYS: qs. ARGV: device, floor. The device's next seq
# will be above the floor.
SEQ_FLOOR = """
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if last < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


def split_client(client_id: str) -> tuple[str, str]:
    """(user, device) of ``user.device`` (``*`` for the placeholder)."""
    user, _, device = client_id.partition(".")
    return user, device


def message_wire(message: MessageEntry) -> str:
    """The record's copy of a message: the MsgItem every target gets, seq 0 (the item sets it);
    an olm body is on each item instead."""
    body = "" if message.bodies is not None else message.body or ""
    item = MsgItem(0, message.msg_id, message.sender, message.recipient, message.type, body, message.ts,
                   message.dev)
    return item.encode().decode()


def shared_payload(stage: Stage) -> str | None:
    """The payload JSON every target gets: null (a plain message, its body is on the record), the
    receipt's wire; None for an olm message (each target has its own ciphertext)."""
    message, receipt = stage.message, stage.receipt
    if receipt is not None and message is None:
        return json.dumps(replace(receipt, seq=None).encode().decode())
    if message is None or receipt is not None:
        raise ValueError("a stage carries exactly one of message and receipt")
    return None if message.bodies is not None else "null"


def stage_candidates(stage: Stage, shared: str | None) -> list[tuple[str, str]] | None:
    """(device, payload JSON) pairs for the script to stage to those that are current devices of
    the user; None: every current device (or the placeholder), each with ``shared``."""
    if shared is None:  # olm: the devices that have a ciphertext
        assert stage.message is not None and stage.message.bodies is not None
        pairs = [(client_id, json.dumps(body)) for client_id, body in sorted(stage.message.bodies.items())]
    elif stage.devices is None:
        return None
    else:
        pairs = [(client_id, shared) for client_id in dict.fromkeys(stage.devices)]
    out = []
    for client_id, payload in pairs:
        user, device = split_client(client_id)
        if user == stage.user and (stage.devices is None or client_id in stage.devices):
            out.append((device, payload))
    return out


def decode_item(member: str, wire: str) -> QueuedItem:
    """The item of a queue member (and its record's wire, for a message)."""
    seq, expires_ms, ref, payload = json.loads(member)
    item: MsgItem | ReceiptItem
    if ref:
        if not wire:
            raise StoreError(f"redis queues.read: the record of {ref} is missing")
        message = MsgItem.decode(wire.encode())
        item = replace(message, seq=seq, body=message.body if payload is None else payload)
    else:
        item = replace(ReceiptItem.decode(payload.encode()), seq=seq)
    return QueuedItem(item, expires_ms)


def message_ref(ref: str, recipient: str) -> MessageRef:
    sender, _, msg_id = ref.partition("/")
    return MessageRef(sender, msg_id, recipient)


def expiry_shard(client_id: str) -> int:
    """The expiry index shard of a device (stable across processes, unlike ``hash``)."""
    return zlib.crc32(client_id.encode()) % EXPIRY_SHARDS


class RedisQueueStore(RedisStore):
    SCRIPTS: ClassVar[dict[str, str]] = {
        "queues.stage": STAGE, "queues.read": READ, "queues.ack": ACK, "queues.mark_delivered": MARK_DELIVERED,
        "queues.expire": EXPIRE, "queues.adopt": ADOPT, "devices.remove": REMOVE, "queues.allow": ALLOW,
        "queues.import_dedup": IMPORT_DEDUP, "queues.seq_floor": SEQ_FLOOR}

    def __init__(self, client: RedisCluster, prefix: str = "", retry_s: float = RETRY_S, *,
                 min_replicas_ack: int = 0, wait_timeout_ms: int = 1000) -> None:
        super().__init__(client, prefix, retry_s)
        # cluster.min_replicas_ack: a stage is answered once that many replicas hold it (Redis WAIT).
        # Every stage writes (its reply key, even a duplicate's), so the WAIT after a duplicate
        # also covers the first stage of that message, which a failed WAIT may have left unconfirmed.
        self._replicas = min_replicas_ack
        self._wait_ms = wait_timeout_ms
        # A reply must outlive every retry of its script.
        self._replay_ms = int(2 * retry_s * 1000) + REPLAY_MARGIN_MS
        self._due_from = secrets.randbelow(EXPIRY_SHARDS)  # nodes start their sweeps on different shards

    def _queue_keys(self, user: str, device: str) -> list[str]:
        return [self.key("q", user, device), self.key("qe", user, device)]

    def _replay_key(self, user: str) -> str:
        return self.key("qr", user, secrets.token_hex(8))

    def _records(self, user: str) -> str:
        return self.key("qm", user, "")

    def _shard_key(self, n: int) -> str:
        return f"{self._prefix}qx:{n}"

    async def stage(self, stage: Stage) -> StageResult:
        user, message = stage.user, stage.message
        shared = shared_payload(stage)
        candidates = stage_candidates(stage, shared)
        ref = "" if message is None else f"{message.sender}/{message.msg_id}"
        keys = [devices_key(self, user), self.key("qs", user), self.key("qm", user, ref), self.key("qd", user, ref),
                self._replay_key(user)]
        # A receipt has no record and no dedup mark (its ref is "").
        wire, recipient, dedup = ("", "", 0) if message is None else (
            message_wire(message), message.recipient, stage.dedup_until_ms)
        args: list[str | int] = [
            self.key("q", user, ""), self.key("qe", user, ""), stage.expires_ms, stage.max_queue, dedup,
            int(stage.delivery), wire, recipient, json.dumps(ref), self._replay_ms]
        if candidates is None:
            assert shared is not None  # stage_candidates returns None only for a shared payload
            args += ["all", shared, PLACEHOLDER_DEVICE]
        else:
            args.append("some")
            for device, payload in candidates:
                args += [device, payload]
        reply = await self.run_replicated("queues.stage", keys, args, self._replicas, self._wait_ms)
        status, *flat = json.loads(reply)
        targets = tuple((f"{user}.{device}", int(seq)) for device, seq in zip(flat[::2], flat[1::2], strict=True))
        await asyncio.gather(*(self._hint(client_id, stage.expires_ms) for client_id, _ in targets))
        return StageResult(StageStatus(status), targets)

    async def read(self, client_id: str, after_seq: int, limit: int) -> list[QueuedItem]:
        if limit <= 0:
            return []
        user, device = split_client(client_id)
        rows = await self.run("queues.read", [self.key("q", user, device)], [after_seq, limit, self._records(user)])
        return [decode_item(member, wire) for member, wire in zip(rows[::2], rows[1::2], strict=True)]

    async def ack(self, client_id: str, seqs: list[int]) -> list[MessageRef]:
        if not seqs:
            return []
        user, device = split_client(client_id)
        keys = [*self._queue_keys(user, device), self._replay_key(user)]
        _, *refs = json.loads(await self.run("queues.ack", keys,
                                             [user, device, self._records(user), self._replay_ms, *seqs]))
        return [message_ref(ref, user) for ref in refs]

    async def mark_delivered(self, recipient: str, sender: str, msg_ids: list[str]) -> list[str]:
        if not msg_ids:
            return []
        keys = [*(self.key("qm", recipient, f"{sender}/{msg_id}") for msg_id in msg_ids), self._replay_key(recipient)]
        _, *marked = json.loads(await self.run("queues.mark_delivered", keys,
                                               [recipient, self._replay_ms, *msg_ids]))
        return [str(msg_id) for msg_id in marked]

    async def remove_device(self, client_id: str) -> int:
        user, device = split_client(client_id)
        await self._unhint(client_id)
        return int(await self.run("devices.remove", self._queue_keys(user, device), [self._records(user)]))

    async def adopt_placeholder(self, user: str, client_id: str) -> int:
        _, device = split_client(client_id)
        held = f"{user}.{PLACEHOLDER_DEVICE}"
        await self._unhint(held)
        keys = [*self._queue_keys(user, PLACEHOLDER_DEVICE), *self._queue_keys(user, device), self.key("qs", user)]
        moved, first = await self.run("queues.adopt", keys, [device])
        if first is not None:
            await self._hint(client_id, int(float(first)))
        return int(moved)

    async def expire(self, client_id: str, now_ms: int) -> Swept:
        user, device = split_client(client_id)
        await self._unhint(client_id)  # before the script: a stage racing it re-adds its own entry after
        keys = [*self._queue_keys(user, device), self._replay_key(user)]
        try:
            reply = await self.run("queues.expire", keys, [now_ms, self._records(user), self._replay_ms])
        except StoreError:
            await self._hint(client_id, now_ms)  # the queue is as it was: the next sweep tries again
            raise
        dropped, first, *flat = json.loads(reply)
        if first is not False:
            await self._hint(client_id, int(float(first)))
        return Swept([message_ref(ref, to) for ref, to in zip(flat[::2], flat[1::2], strict=True)], int(dropped))

    async def due(self, now_ms: int, limit: int) -> list[str]:
        found: dict[str, None] = {}  # in order, once each
        start = self._due_from
        for offset in range(0, EXPIRY_SHARDS, DUE_BATCH):
            if len(found) >= limit:
                break
            shards = [(start + offset + i) % EXPIRY_SHARDS for i in range(DUE_BATCH)]
            batches = await asyncio.gather(*(
                self.command("queues.due", "ZRANGE", self._shard_key(n), "-inf", str(now_ms), "BYSCORE",
                             "LIMIT", "0", str(limit)) for n in shards))
            for batch in batches:
                found.update(dict.fromkeys(str(client_id) for client_id in batch))
        # The next sweep starts one batch further on, so a shard full of due queues starves none.
        self._due_from = (start + DUE_BATCH) % EXPIRY_SHARDS
        return list(found)[:limit]

    async def waiting(self) -> int:
        """Queues holding items, cluster-wide, from the expiry index (64 ``ZCARD``s): a queue is in it
        while it holds an item; an entry can outlive its items until the next sweep looks at it."""
        counts = await asyncio.gather(*(self.command("queues.waiting", "ZCARD", self._shard_key(n))
                                        for n in range(EXPIRY_SHARDS)))
        return sum(int(count) for count in counts)

    async def depth(self, client_id: str) -> int:
        user, device = split_client(client_id)
        return int(await self.command("queues.depth", "ZCARD", self.key("q", user, device)))

    async def allow(self, user: str, bucket: str, rate_per_s: float, burst: int, now_ms: int) -> bool:
        return await self._take(user, bucket, rate_per_s, burst, now_ms, 1)

    async def refund(self, user: str, bucket: str, rate_per_s: float, burst: int, now_ms: int) -> None:
        await self._take(user, bucket, rate_per_s, burst, now_ms, -1)

    async def _take(self, user: str, bucket: str, rate_per_s: float, burst: int, now_ms: int, cost: int) -> bool:
        args: list[str | int] = [repr(rate_per_s), burst, now_ms, cost]
        return bool(await self.run("queues.allow", [self.key("qb", user, bucket)], args))

    async def import_dedup_mark(self, user: str, sender: str, msg_id: str, until_ms: int) -> None:
        """Remember (``sender``, ``msg_id``) in ``user``'s slot until ``until_ms``, as a stage with
        ``dedup_until_ms`` does (``chat-broker migrate``): a stage of it there is a DUPLICATE until then.
        A mark lasting longer stays."""
        await self.run("queues.import_dedup", [self.key("qd", user, f"{sender}/{msg_id}")], [until_ms])

    async def import_seq_floor(self, client_id: str, floor: int) -> None:
        """Make the device's next seqs exceed ``floor`` (``chat-broker migrate``: above every seq another
        store gave it, which its client remembers as handed over). A counter past it stays."""
        user, device = split_client(client_id)
        await self.run("queues.seq_floor", [self.key("qs", user)], [device, floor])

    async def _hint(self, client_id: str, expires_ms: int) -> None:
        """Index the queue at ``expires_ms`` unless it is indexed earlier already (ZADD LT). A failure
        is logged, not raised: the queue itself is written, only its expiry may come late."""
        try:
            await self.command("queues.hint", "ZADD", self._shard_key(expiry_shard(client_id)), "LT",
                               str(expires_ms), client_id)
        except StoreError as exc:
            log.warning("expiry index: %s not indexed at %d: %s", client_id, expires_ms, exc)

    async def _unhint(self, client_id: str) -> None:
        await self.command("queues.unhint", "ZREM", self._shard_key(expiry_shard(client_id)), client_id)

