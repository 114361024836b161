"""Group receipts in a Redis Cluster: the tracking half of ``bridge.cluster.group_store.GroupLog`` (its
docstring has the model; the rules are bridge/messaging/group_receipts.py's). Keys, in the group's slot
beside its log (storage/redis/group_log.py):

- ``{prefix}g:{Ab3}:t:<gseq>``    hash: a tracked message -- ``from``, ``id``, ``st`` ('1': seen tracked),
  ``md`` / ``ms``: members still missing delivered / seen, per member waited for ``d:<user>`` and (seen
  tracked) ``s:<user>``, Redis ms or 0, and ``pd`` / ``ps`` while a completion's receipts may not be staged
  yet. Written by ``POST`` with the message; deleted once complete and its receipts staged (``RECEIPTED``),
  expires at the message's TTL.
- ``{prefix}g:{Ab3}:i:<msg id>``  set of the gseqs tracked with that id (what a seen report names); an
  expired message's gseq is dropped by the next look at it; expires with its latest message.
- ``{prefix}g:{Ab3}:u:<sender>``  sorted set of gseqs (score = gseq): the sender's tracked messages in this group,
  at most ``max_tracked`` (a new one forgets the oldest: ``groups.max_tracked_per_user`` per sender and
  group in cluster mode, as a sender's messages to several groups are in several slots).
- ``{prefix}g:{Ab3}:p``           set of the gseqs with a pending completion (receipts maybe not staged yet):
  what a sweep reports again.
- ``{prefix}g:{Ab3}:r:<token>``   a ``MARK`` or ``EXPIRE_GROUP`` reply, kept the replay time (storage/redis/queues.py
  "Retries").
- ``{prefix}g:{Ab3}:xp``          set of the gseqs *expiring*: a device's item expired unacked, the ``expired``
  receipt maybe not staged yet (what a sweep reports again). On the message's body (``g:{Ab3}:b:<gseq>``,
  storage/redis/group_log.py): ``x`` '1' while expiring, '2' once its receipt is staged (later expiries
  of its items report nothing); ``xd`` / ``xs``: a ``delivered`` / ``seen`` completion that was pending when
  it expired. An expiring body is kept (its count at 0 or not) until its receipt is staged, or its own expiry.

Times are Redis's (``TIME`` on the group's master): the members' marks of one message come from one clock.
"""

from __future__ import annotations

import json
from typing import Any

from bridge.cluster.group_store import Completed, GroupExpiry, Mark, MarkKind
from bridge.messaging.group_receipts import TrackedRow
from storage.redis.queue_scripts import COMMON

# Part of ``POST`` (storage/redis/group_log.py), after the gseq is taken, with ``now``, ``gseq`` and
# ``members`` set; ARGV[6] is the message's expiry, ARGV[9] its sender. ARGV[10..15]: msg id, tracking
# prefix, index prefix, sender-set prefix, seen_max, max_tracked.
TRACK = """
local sender, msg_id, expires = ARGV[9], ARGV[10], tonumber(ARGV[6])
local waited = {}
for _, member in ipairs(members) do if member ~= sender then table.insert(waited, member) end end
if #waited > 0 then
  local seen_max = tonumber(ARGV[14])
  local st = (seen_max > 0 and #members <= seen_max) and '1' or '0'
  local fields = {'from', sender, 'id', msg_id, 'st', st, 'md', #waited, 'ms', st == '1' and #waited or 0}
  for _, member in ipairs(waited) do
    table.insert(fields, 'd:' .. member); table.insert(fields, 0)
    if st == '1' then table.insert(fields, 's:' .. member); table.insert(fields, 0) end
  end
  local tracking = ARGV[11] .. gseq
  redis.call('HSET', tracking, unpack(fields))
  redis.call('PEXPIREAT', tracking, expires)
  local index, mine = ARGV[12] .. msg_id, ARGV[13] .. sender
  redis.call('SADD', index, gseq)
  redis.call('ZADD', mine, gseq, gseq)
  for _, key in ipairs({index, mine}) do
    if redis.call('PEXPIRETIME', key) < expires then redis.call('PEXPIREAT', key, expires) end
  end
  for _ = 1, 64 do  -- the oldest may have expired (one TTL: they expire in gseq order)
    local oldest = redis.call('ZRANGE', mine, 0, 0)[1]
    if not oldest or redis.call('EXISTS', ARGV[11] .. oldest) == 1 then break end
    redis.call('ZREM', mine, oldest)
  end
  local over = redis.call('ZCARD', mine) - tonumber(ARGV[15])
  if over > 0 then
    for i, old in ipairs(redis.call('ZPOPMIN', mine, over)) do
      if i % 2 == 1 then
        local id = redis.call('HGET', ARGV[11] .. old, 'id')
        redis.call('DEL', ARGV[11] .. old)
        if id then redis.call('SREM', ARGV[12] .. id, old) end
      end
    end
  end
end
"""

# Shared: a tracked message is complete (every member has it and, if tracked, saw it).
COMPLETE = """
local function complete(st, md, ms) return tonumber(md) == 0 and (st ~= '1' or tonumber(ms) == 0) end
"""

# KEYS: replay, the pending set. ARGV: tracking prefix, index prefix, unused, replay ms, then (kind, member,
# gseq or msg id) per mark. A completion is kept pending (``pd`` / ``ps``, its gseq in the pending set) until
# ``RECEIPTED``, and reported again by any later mark of that message ('r': only that, for a sweep; its
# receipts may not be staged: their stage tokens make a second staging answer the first).
# Returns JSON [[gseq, sender, msg id, delivered 0/1, seen 0/1], ...].
MARK = COMMON + COMPLETE + """
local done = redis.call('GET', KEYS[1])
if done then return done end
local now = now_ms()
local TP = ARGV[1]
local out, at = {}, {}
local function mark(gseq, kind, user)
  local key = TP .. gseq
  local from, id, st, md, ms, d, s, pd, ps = unpack(redis.call('HMGET', key, 'from', 'id', 'st', 'md', 'ms',
                                                               'd:' .. user, 's:' .. user, 'pd', 'ps'))
  if not from then redis.call('SREM', KEYS[2], gseq); return end  -- expired (or forgotten)
  local delivered, seen = pd == '1', ps == '1'
  if d and not (kind == 's' and st ~= '1') then
    local md0, ms0 = tonumber(md), tonumber(ms)
    md, ms = md0, ms0
    if kind == 'x' then
      if d == '0' then md = md - 1 end
      if s == '0' then ms = ms - 1 end
      redis.call('HDEL', key, 'd:' .. user, 's:' .. user)
    else
      if d == '0' then md = md - 1; redis.call('HSET', key, 'd:' .. user, now) end
      if kind == 's' and s == '0' then ms = ms - 1; redis.call('HSET', key, 's:' .. user, now) end
    end
    redis.call('HSET', key, 'md', md, 'ms', ms)
    if md0 > 0 and md == 0 then delivered = true; redis.call('HSET', key, 'pd', '1') end
    if st == '1' and ms0 > 0 and ms == 0 then seen = true; redis.call('HSET', key, 'ps', '1') end
    if delivered or seen then redis.call('SADD', KEYS[2], gseq) end
  end
  if delivered or seen then
    local n = at[gseq]
    if not n then
      table.insert(out, {tonumber(gseq), from, id, 0, 0}); n = #out; at[gseq] = n
    end
    if delivered then out[n][4] = 1 end
    if seen then out[n][5] = 1 end
  end
end
for i = 5, #ARGV, 3 do
  if ARGV[i] == 's' then
    local index = ARGV[2] .. ARGV[i + 2]
    for _, gseq in ipairs(redis.call('SMEMBERS', index)) do
      if redis.call('EXISTS', TP .. gseq) == 1 then mark(gseq, 's', ARGV[i + 1])
      else redis.call('SREM', index, gseq) end  -- expired
    end
  else
    mark(ARGV[i + 2], ARGV[i], ARGV[i + 1])
  end
end
if #out == 0 then return '[]' end
return keep(KEYS[1], out, ARGV[4])
"""

# KEYS: the pending set. ARGV: tracking prefix, index prefix, sender-set prefix, then (gseq, delivered 0/1,
# seen 0/1) of completions whose receipts are staged: no longer pending; a complete message with nothing
# pending is forgotten.
RECEIPTED = COMPLETE + """
for i = 4, #ARGV, 3 do
  local key = ARGV[1] .. ARGV[i]
  if ARGV[i + 1] == '1' then redis.call('HDEL', key, 'pd') end
  if ARGV[i + 2] == '1' then redis.call('HDEL', key, 'ps') end
  local from, id, st, md, ms, pd, ps = unpack(redis.call('HMGET', key, 'from', 'id', 'st', 'md', 'ms', 'pd', 'ps'))
  if not pd and not ps then redis.call('SREM', KEYS[1], ARGV[i]) end
  if from and not pd and not ps and complete(st, md, ms) then
    redis.call('DEL', key)
    redis.call('SREM', ARGV[2] .. id, ARGV[i])
    redis.call('ZREM', ARGV[3] .. from, ARGV[i])
  end
end
return 1
"""

# KEYS: the index of a msg id. ARGV: tracking prefix. Returns {gseq, expiry ms, the hash flat, ...} of the
# messages still tracked (complete ones waiting for ``RECEIPTED`` are not).
TRACKED = COMPLETE + """
local out = {}
for _, gseq in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. gseq
  local st, md, ms = unpack(redis.call('HMGET', key, 'st', 'md', 'ms'))
  if st and not complete(st, md, ms) then
    local fields = redis.call('HGETALL', key)
    table.insert(out, gseq); table.insert(out, redis.call('PEXPIRETIME', ARGV[1] .. gseq)); table.insert(out, fields)
  end
end
return out
"""


# Count n member users off a body; deleted at zero, but while expiring (its sender is read from it). Nothing
# if it is gone already.
UNHOLD_BODY = """
local function unhold(body, n)
  if redis.call('EXISTS', body) == 1 and redis.call('HINCRBY', body, 'refs', -n) <= 0
     and redis.call('HGET', body, 'x') ~= '1' then
    redis.call('DEL', body)
  end
end
"""

# KEYS: replay, the expiring set, the pending set. ARGV: body prefix, tracking prefix, index prefix, sender-set
# prefix, replay ms, then (gseq, users to count off) per expired item. The first expiry of a message starts it
# expiring and forgets its tracking (a pending completion kept on the body); each expiring message is answered
# once.
# Returns JSON [[gseq, sender, msg id, delivered 0/1, seen 0/1, 1], ...].
EXPIRE_GROUP = COMMON + UNHOLD_BODY + """
local done = redis.call('GET', KEYS[1])
if done then return done end
local out, answered = {}, {}
for i = 6, #ARGV, 2 do
  local gseq, body = ARGV[i], ARGV[1] .. ARGV[i]
  local x = redis.call('HGET', body, 'x')
  if not x and redis.call('EXISTS', body) == 1 then
    x = '1'
    redis.call('HSET', body, 'x', '1')
    redis.call('SADD', KEYS[2], gseq)
    local key = ARGV[2] .. gseq
    local from, id, pd, ps = unpack(redis.call('HMGET', key, 'from', 'id', 'pd', 'ps'))
    if from then  -- still tracked (clocks apart): forgotten now, so that no mark completes it after this
      if pd then redis.call('HSET', body, 'xd', '1') end
      if ps then redis.call('HSET', body, 'xs', '1') end
      redis.call('DEL', key)
      redis.call('SREM', ARGV[3] .. id, gseq)
      redis.call('ZREM', ARGV[4] .. from, gseq)
      redis.call('SREM', KEYS[3], gseq)
    end
  end
  if ARGV[i + 1] ~= '0' then unhold(body, tonumber(ARGV[i + 1])) end
  if x == '1' and not answered[gseq] then
    answered[gseq] = true
    local wire = cjson.decode(redis.call('HGET', body, 'wire'))
    local xd, xs = unpack(redis.call('HMGET', body, 'xd', 'xs'))
    table.insert(out, {tonumber(gseq), wire['from'], wire['id'], xd and 1 or 0, xs and 1 or 0, 1})
  elseif x ~= '1' then
    redis.call('SREM', KEYS[2], gseq)  -- its receipt is staged, or the body is gone (past its own expiry)
  end
end
if #out == 0 then return '[]' end
return keep(KEYS[1], out, ARGV[5])
"""

# KEYS: the expiring set. ARGV: body prefix, then the gseqs whose ``expired`` receipt is staged.
EXPIRED_DONE = """
for i = 2, #ARGV do
  local body = ARGV[1] .. ARGV[i]
  if redis.call('HGET', body, 'x') == '1' then
    redis.call('HSET', body, 'x', '2')
    redis.call('HDEL', body, 'xd', 'xs')
    if tonumber(redis.call('HGET', body, 'refs') or '0') <= 0 then redis.call('DEL', body) end
  end
  redis.call('SREM', KEYS[1], ARGV[i])
end
return 1
"""


def mark_args(marks: list[Mark]) -> list[str | int]:
    args: list[str | int] = []
    for mark in marks:
        args += [mark.kind.value, mark.member, mark.msg_id if mark.kind == MarkKind.SEEN else mark.gseq]
    return args


def receipted_args(done: list[Completed]) -> list[str | int]:
    args: list[str | int] = []
    for c in done:
        args += [c.gseq, int(c.delivered), int(c.seen)]
    return args


def expiry_args(expiries: list[GroupExpiry]) -> list[str | int]:
    args: list[str | int] = []
    for expiry in expiries:
        args += [expiry.gseq, int(expiry.released)]
    return args


def completed(reply: str) -> list[Completed]:
    """``MARK``'s or ``EXPIRE_GROUP``'s reply (the latter's rows end with ``expired``)."""
    return [Completed(int(gseq), str(sender), str(msg_id), bool(delivered), bool(seen), bool(expired and expired[0]))
            for gseq, sender, msg_id, delivered, seen, *expired in json.loads(reply)]


def tracked_rows(group: str, rows: list[Any]) -> list[TrackedRow]:
    """``TRACKED``'s reply as rows, oldest (lowest gseq) first."""
    found = []
    for gseq, expires, flat in zip(rows[::3], rows[1::3], rows[2::3], strict=True):
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        marks = {name[2:]: (int(value), int(fields.get(f"s:{name[2:]}", 0)))
                 for name, value in fields.items() if name.startswith("d:")}
        found.append(TrackedRow(int(gseq), fields["from"], fields["id"], group, int(expires), tuple(sorted(marks)),
                                fields["st"] == "1", marks))
    return sorted(found, key=lambda row: row.mid)
