"""The Lua scripts of the device queues (storage/redis/queues.py, whose docstring has the keys and
the rules): each runs alone on the master of one user's slot."""

from __future__ import annotations

from typing import Final

from bridge.cluster.store import SEQ_STRIDE

DEDUP_TRIM: Final = 64  # dedup marks dropped at most per write (expired, or beyond the bound)
GW_GRACE_MS: Final = 3_600_000
"""A user's high-water mark of a group they left is kept this long (``STAGE_GROUP``): a fanout that staged
the group's old entries for them and died before dropping them from the log is run again within seconds
(the lease), and must find the mark, or the user would get those entries again (and, rejoined, below
newer ones). An hour covers a group's master failing over many times in between."""

# Shared by the scripts below. An item's ref ("<sender>/<id>" or "") is its third JSON field; ids
# are [A-Za-z0-9_-] (chatproto/ids.py), so a pattern finds it without decoding the payload.
COMMON = f"""
local STRIDE, TRIM = {SEQ_STRIDE}, {DEDUP_TRIM}
""" + """
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
local function ref_of(member) return string.match(member, '^%[%d+,%-?%d+,"([^"]*)"') end
local function take(queue, expiry, seq)
  local member = redis.call('ZRANGE', queue, seq, seq, 'BYSCORE')[1]
  if member then
    redis.call('ZREMRANGEBYSCORE', queue, seq, seq)
    redis.call('ZREM', expiry, seq)
  end
  return member
end
-- Count an item off its record; true when that was the last (the record is deleted). A group message's
-- last item of this user is reported as '~<ref>': its body in the group's slot counts the user off.
local function release(record)
  if redis.call('HINCRBY', record, 'refs', -1) <= 0 then
    redis.call('DEL', record)
    return true
  end
  return false
end
local function group_ref(ref) return string.sub(ref, 1, 2) == 'g:' end
local function tail(queue) return tonumber(redis.call('ZRANGE', queue, -1, -1, 'WITHSCORES')[2] or '0') end
local function earliest(expiry) return redis.call('ZRANGE', expiry, 0, 0, 'WITHSCORES')[2] or false end
local function keep(replay, reply, ms)
  reply = cjson.encode(reply)
  redis.call('SET', replay, reply, 'PX', ms)
  return reply
end
local function marked(marks, ref, now) return tonumber(redis.call('ZSCORE', marks, ref) or '0') > now end
-- Mark ref until the given time (a later mark of it stays), then forget what expired and the marks
-- beyond the bound, earliest first, TRIM at most each (a bound lowered shrinks over a few writes).
local function remember(marks, ref, until_ms, bound, now)
  if until_ms <= now then return end
  redis.call('ZADD', marks, 'GT', until_ms, ref)
  local old = redis.call('ZRANGE', marks, '-inf', now, 'BYSCORE', 'LIMIT', 0, TRIM)
  if #old > 0 then redis.call('ZREM', marks, unpack(old)) end
  local over = redis.call('ZCARD', marks) - bound
  if over > 0 then redis.call('ZPOPMIN', marks, math.min(over, TRIM)) end
  if redis.call('PEXPIRETIME', marks) < until_ms then redis.call('PEXPIREAT', marks, until_ms) end
end
"""

# KEYS: the user's devices (users store), qs, record, dedup marks, pending mark, replay. ARGV: queue
# prefix, expiry prefix, expires_ms, max_queue, dedup_until_ms, track, wire ('' for a receipt),
# recipient, ref as JSON, replay ms, ref, max_dedup, writeback ('1': replaces the pending mark), then
# 'all' and the payload, or 'some' and (device, payload) pairs.
# Returns JSON ["staged", device, seq, ...], ["duplicate"], ["pending"] or ["queue_full"].
STAGE = COMMON + """
local done = redis.call('GET', KEYS[6])
if done then return done end
local dedup_until, ref = tonumber(ARGV[5]), ARGV[11]
local now = dedup_until > 0 and now_ms() or 0
-- A duplicate writes its reply too: the WAIT after it (min_replicas_ack) then covers the first stage.
if dedup_until > 0 and marked(KEYS[4], ref, now) then return keep(KEYS[6], {'duplicate'}, ARGV[10]) end
if ref ~= '' and ARGV[13] ~= '1' and redis.call('EXISTS', KEYS[5]) == 1 then return '["pending"]' end
local targets, payloads = {}, {}
if ARGV[14] == 'all' then
  targets = redis.call('HKEYS', KEYS[1])
  if #targets == 0 then targets = {ARGV[16]} end
  table.sort(targets)
  for i = 1, #targets do payloads[i] = ARGV[15] end
else
  for i = 15, #ARGV, 2 do
    if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
      table.insert(targets, ARGV[i]); table.insert(payloads, ARGV[i + 1])
    end
  end
end
for _, device in ipairs(targets) do
  if redis.call('ZCARD', ARGV[1] .. device) >= tonumber(ARGV[4]) then return '["queue_full"]' end
end
if ARGV[13] == '1' then redis.call('DEL', KEYS[5]) end
if dedup_until > 0 then remember(KEYS[4], ref, dedup_until, tonumber(ARGV[12]), now) end
if ARGV[7] ~= '' and #targets > 0 then
  redis.call('HSETNX', KEYS[3], 'wire', ARGV[7])
  redis.call('HSETNX', KEYS[3], 'to', ARGV[8])
  redis.call('HINCRBY', KEYS[3], 'refs', #targets)
  if ARGV[6] == '1' then redis.call('HSET', KEYS[3], 'track', '1') end
end
local reply = {'staged'}
for i, device in ipairs(targets) do
  local seq = redis.call('HINCRBY', KEYS[2], device, STRIDE)
  local member = '[' .. seq .. ',' .. ARGV[3] .. ',' .. ARGV[9] .. ',' .. payloads[i] .. ']'
  redis.call('ZADD', ARGV[1] .. device, seq, member)
  redis.call('ZADD', ARGV[2] .. device, ARGV[3], seq)
  table.insert(reply, device); table.insert(reply, seq)
end
return keep(KEYS[6], reply, ARGV[10])
"""

# KEYS: the user's devices, dedup marks, pending mark, replay. ARGV: queue prefix, max_queue,
# hold_ms, whole_user ('1'/'0'), ref, replay ms, then the devices. Writes no item. The pending mark is
# not waited on by replicas (no WAIT): one lost in a failover only lets a concurrent repeat through
# as a second copy, which the recipient's SDK drops by (from, id).
# Returns JSON ["staged", device, tail, ...] (tail: the highest seq queued for the device, 0 if
# none), ["duplicate"], ["pending"], ["changed"] or ["queue_full"].
RESERVE = COMMON + """
local done = redis.call('GET', KEYS[4])
if done then return done end
if marked(KEYS[2], ARGV[5], now_ms()) then return '["duplicate"]' end
if redis.call('EXISTS', KEYS[3]) == 1 then return '["pending"]' end
local targets = {}
for i = 7, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then targets[ARGV[i]] = true
  elseif ARGV[4] == '1' then return '["changed"]' end
end
if ARGV[4] == '1' then
  local current = redis.call('HKEYS', KEYS[1])
  if #current == 0 then return '["changed"]' end
  for _, device in ipairs(current) do
    if not targets[device] then return '["changed"]' end
  end
end
for device in pairs(targets) do
  if redis.call('ZCARD', ARGV[1] .. device) >= tonumber(ARGV[2]) then return '["queue_full"]' end
end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
local reply = {'staged'}
for device in pairs(targets) do
  table.insert(reply, device); table.insert(reply, tail(ARGV[1] .. device))
end
return keep(KEYS[4], reply, ARGV[6])
"""

# KEYS: the device queues of one user. Returns the highest seq queued in each (0: none).
TAILS = COMMON + """
local out = {}
for i = 1, #KEYS do out[i] = tail(KEYS[i]) end
return out
"""

# KEYS: dedup marks, pending mark. ARGV: ref, dedup_until_ms, max_dedup.
SETTLE = COMMON + """
redis.call('DEL', KEYS[2])
remember(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), now_ms())
return 1
"""

# KEYS: queue. ARGV: after seq, limit, record prefix. Returns flat {member, wire or ''}.
READ = COMMON + """
local out, wires = {}, {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], '(' .. ARGV[1], '+inf', 'BYSCORE', 'LIMIT', 0, ARGV[2])) do
  local ref = ref_of(member)
  if ref ~= '' and not group_ref(ref) and not wires[ref] then
    wires[ref] = redis.call('HGET', ARGV[3] .. ref, 'wire') or ''
  end
  table.insert(out, member); table.insert(out, wires[ref] or '')
end
return out
"""

# KEYS: queue, expiry, replay. ARGV: user, device, record prefix, replay ms, then seqs.
# Returns JSON [items removed, ref delivered, '+' group ref acked (by a device, not the placeholder) or
# '~' group ref released, ...].
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
      if group_ref(ref) and ARGV[2] ~= '*' then table.insert(reply, '+' .. ref) end
      if release(record) and group_ref(ref) then table.insert(reply, '~' .. ref) end
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
# Returns JSON [items dropped, earliest expiry left or false, ref, recipient, ...]; a group message's item:
# '!' group ref, '1' if it was its user's last item of it (the group's slot counts the user off), else '0'.
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
    local last = release(record)
    if group_ref(ref) then table.insert(reply, '!' .. ref); table.insert(reply, last and '1' or '0') end
  end
end
reply[2] = earliest(KEYS[2])
if #reply == 2 then return cjson.encode(reply) end
return keep(KEYS[3], reply, ARGV[3])
"""

# ``stage_group``. KEYS: the user's devices (users store), qs, the user's group high-water marks, their
# drop times. ARGV: queue prefix, expiry prefix, record prefix, group id, max_queue, grace ms (GW_GRACE_MS),
# then per entry (in gseq order): gseq, expires_ms, payload JSON, the device left out ('' none), 'm' (a
# message), 'r' (the event that ends the user's membership) or 'e'. The mark of a group the user left is
# dropped the grace after (unless an entry of it is staged for the user again first), by this script run
# for the user then or later. The mark is '<hwm>' or '<hwm>:<gseq>,...': the messages up to it this user got
# no item of, kept while they may still be in the group's log (a fanout that stopped before ``FANNED`` is run
# again and must count the user off their bodies again: ``FANNED`` counts once, what is still logged); one
# below a call's first entry has left the log, and is forgotten.
# Returns {{device, seq, ...}, {gseq of a message this user got no item of, ...}, devices skipped (full),
# {the user's devices, if an entry was staged before (a second fanout: the first may have woken nobody)}}.
STAGE_GROUP = COMMON + """
local devices = redis.call('HKEYS', KEYS[1])
if #devices == 0 then devices = {'*'} end
table.sort(devices)
local hwm, listed = string.match(redis.call('HGET', KEYS[3], ARGV[4]) or '0', '^(%d+):?(.*)$')
hwm = tonumber(hwm)
local none, was_none, first = {}, {}, tonumber(ARGV[7])
for g in string.gmatch(listed, '%d+') do
  g = tonumber(g)
  if g >= first then table.insert(none, g); was_none[g] = true end
end
local staged, unheld, skipped, again, left = {}, {}, 0, {}, nil
for i = 7, #ARGV, 5 do
  local gseq = tonumber(ARGV[i])
  if gseq <= hwm then
    again = devices
    if was_none[gseq] then table.insert(unheld, gseq) end
  else
    hwm = gseq
    left = ARGV[i + 4] == 'r'
    local ref = ''
    if ARGV[i + 4] == 'm' then ref = ARGV[4] .. '/' .. ARGV[i] end
    local n = 0
    for _, device in ipairs(devices) do
      if device ~= ARGV[i + 3] then
        if redis.call('ZCARD', ARGV[1] .. device) < tonumber(ARGV[5]) then
          local seq = redis.call('HINCRBY', KEYS[2], device, STRIDE)
          local member = '[' .. seq .. ',' .. ARGV[i + 1] .. ',"' .. ref .. '",' .. ARGV[i + 2] .. ']'
          redis.call('ZADD', ARGV[1] .. device, seq, member)
          redis.call('ZADD', ARGV[2] .. device, ARGV[i + 1], seq)
          table.insert(staged, device); table.insert(staged, seq)
          n = n + 1
        else
          skipped = skipped + 1
        end
      end
    end
    if ref ~= '' then
      if n > 0 then redis.call('HINCRBY', ARGV[3] .. ref, 'refs', n)
      else table.insert(unheld, gseq); table.insert(none, gseq) end
    end
  end
end
redis.call('HSET', KEYS[3], ARGV[4], #none == 0 and hwm or (hwm .. ':' .. table.concat(none, ',')))
local now = now_ms()
if left then redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), ARGV[4])
elseif left == false then redis.call('ZREM', KEYS[4], ARGV[4]) end  -- a member again
local old = redis.call('ZRANGE', KEYS[4], '-inf', now, 'BYSCORE', 'LIMIT', 0, TRIM)
if #old > 0 then
  redis.call('HDEL', KEYS[3], unpack(old))
  redis.call('ZREM', KEYS[4], unpack(old))
end
return {staged, unheld, skipped, again}
"""

# KEYS: placeholder queue, placeholder expiry, device queue, device expiry, qs. ARGV: device.
# Returns {moved, earliest expiry of the device's queue or nil}.
ADOPT = COMMON + """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, member in ipairs(members) do
  local seq = redis.call('HINCRBY', KEYS[5], ARGV[1], STRIDE)
  local expires, rest = string.match(member, '^%[%d+,(%-?%d+)(,.*)$')
  redis.call('ZADD', KEYS[3], seq, '[' .. seq .. ',' .. expires .. rest)
  redis.call('ZADD', KEYS[4], expires, seq)
end
redis.call('DEL', KEYS[1], KEYS[2])
return {#members, earliest(KEYS[4])}
"""

# KEYS: queue, expiry. ARGV: record prefix. Returns {items dropped, group ref released, ...}.
REMOVE = COMMON + """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local reply = {#members}
for _, member in ipairs(members) do
  local ref = ref_of(member)
  if ref ~= '' and release(ARGV[1] .. ref) and group_ref(ref) then table.insert(reply, ref) end
end
redis.call('DEL', KEYS[1], KEYS[2])
return reply
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

# ``import_dedup_mark`` (chat-broker migrate). KEYS: dedup marks. ARGV: ref, until (ms), max_dedup.
# A mark already lasting as long or longer stays.
IMPORT_DEDUP = COMMON + """
remember(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), now_ms())
return 1
"""

# ``import_seq_floor`` (chat-broker migrate). KEYS: qs. ARGV: device, floor. The device's next seq
# will be above the floor.
SEQ_FLOOR = """
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if last < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""

# ``seq_block``. KEYS: qs. ARGV: device, stride. The base of the block (run with WAIT: a promoted
# replica that lacks it would give later items seqs the device already had as local ones).
SEQ_BLOCK = "return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])"
