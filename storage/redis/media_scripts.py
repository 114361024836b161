"""The Lua scripts of ``storage/redis/media.py`` (the keys are listed there). Each runs on one shard's
slot: ARGV[1] is the key prefix and ARGV[2] the shard's hash tag, from which ``K`` builds the shard's
keys, and KEYS[1] is one key of that shard, so the cluster client routes the script to its slot.
Every script is safe to run twice (a reply lost in a failover)."""

from __future__ import annotations

# Builds a key of this shard: K('mb', sha) -> '<prefix>mb:{mb3}:<sha>'.
_HEAD = """
local P, T = ARGV[1], ARGV[2]
local function K(kind, part)
  if part then return P .. kind .. ':' .. T .. ':' .. part end
  return P .. kind .. ':' .. T
end
-- A usage figure changes; one back at 0 goes (a user who has nothing stored costs nothing).
local function add(usage, field, by)
  if redis.call('HINCRBY', usage, field, by) == 0 then redis.call('HDEL', usage, field) end
end
"""

# --- the uploader's shard (tag mu<c>) ---------------------------------------------------------

# Takes a token of the user's creation bucket (by Redis's clock: one for every node), false if it is
# empty. The bucket is a hash {tokens, stamp (ms)} that expires once it would be full again, so an idle
# user has none (a missing bucket is a full one).
_TAKE = """
local function take(bucket, burst, per_ms)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local b = redis.call('HMGET', bucket, 'tokens', 'stamp')
  local tokens = burst
  if b[1] then tokens = math.min(burst, tonumber(b[1]) + (now - tonumber(b[2])) * per_ms) end
  if tokens < 1 then return false end
  tokens = tokens - 1
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'stamp', now)
  redis.call('PEXPIRE', bucket, math.max(1, math.ceil((burst - tokens) / per_ms)))
  return true
end
"""

# ARGV: p, t, id, user, device, to, size, charge, created, touched, quota (0: none), max uploads (0: none),
# burst (0: no rate), rate (uploads per ms). Checks the uploads in progress, the quota, then takes a
# token of the creation rate, and records the upload charged ``charge``. Returns {'ok'}, or
# {'exists', user, device, to, size, created, touched, blob or ''} if the id is recorded already (an
# Idempotency-Key repeated, or a retry), or the limit refused {'uploads' | 'quota' | 'rate', bytes in use}.
ADD_UPLOAD = _HEAD + _TAKE + """
local id, user, cost = ARGV[3], ARGV[4], tonumber(ARGV[8])
local rec = K('mup', id)
local r = redis.call('HMGET', rec, 'user', 'device', 'to', 'size', 'created', 'touched', 'blob')
if r[1] then return {'exists', r[1], r[2], r[3], r[4], r[5], r[6], r[7] or ''} end
local usage = K('muq')
local u = redis.call('HMGET', usage, user .. ':n', user .. ':u', user .. ':b')
local n, used = tonumber(u[1] or '0'), tonumber(u[2] or '0') + tonumber(u[3] or '0')
local quota, max_uploads, burst = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
if max_uploads > 0 and n >= max_uploads then return {'uploads', used} end
if quota > 0 and used + cost > quota then return {'quota', used} end
if burst > 0 and not take(K('mur', user), burst, tonumber(ARGV[14])) then return {'rate', used} end
redis.call('HSET', rec, 'user', user, 'device', ARGV[5], 'to', ARGV[6], 'size', ARGV[7], 'created', ARGV[9],
           'touched', ARGV[10])
redis.call('ZADD', K('mui'), ARGV[10], id)
redis.call('HSET', K('muc', user), 'u:' .. id, cost)
add(usage, user .. ':n', 1)
add(usage, user .. ':u', cost)
add(usage, 'n', 1)
return {'ok'}
"""

# ARGV: p, t, id, now (0: do not touch), sealed 0/1 (1: a sealed upload's record, else one in progress),
# client id ('': anyone's). Returns the record {user, device, to, size, created, touched, blob or '',
# sealing or ''} or nil; only the uploading device's request touches it.
UPLOAD = _HEAD + """
local rec = K('mup', ARGV[3])
local r = redis.call('HMGET', rec, 'user', 'device', 'to', 'size', 'created', 'touched', 'blob', 'sealing')
if not r[1] then return nil end
if (r[7] and '1' or '0') ~= ARGV[5] then return nil end
if ARGV[6] ~= '' and ARGV[6] ~= r[1] .. '.' .. r[2] then return nil end
if ARGV[4] ~= '0' and not r[7] then
  redis.call('HSET', rec, 'touched', ARGV[4])
  redis.call('ZADD', K('mui'), ARGV[4], ARGV[3])
  r[6] = ARGV[4]
end
r[7] = r[7] or ''
r[8] = r[8] or ''
return r
"""

# An upload in progress ends (sealed, abandoned or deleted): its charge, its count and its index entry go.
_END_UPLOAD = """
local function end_upload(id, user)
  redis.call('ZREM', K('mui'), id)
  local charges = K('muc', user)
  local cost = redis.call('HGET', charges, 'u:' .. id)
  if cost then
    redis.call('HDEL', charges, 'u:' .. id)
    local usage = K('muq')
    add(usage, user .. ':n', -1)
    add(usage, user .. ':u', -tonumber(cost))
    add(usage, 'n', -1)
  end
end
"""

# ARGV: p, t, id, sha. The upload in progress is about to be sealed as the blob ``sha``: recorded before
# the bytes move (field 'sealing'). Returns 1, or 0 if it is not in progress.
SEALING = _HEAD + """
local rec = K('mup', ARGV[3])
local r = redis.call('HMGET', rec, 'user', 'blob')
if not r[1] or r[2] then return 0 end
redis.call('HSET', rec, 'sealing', ARGV[4])
return 1
"""

# ARGV: p, t, id. Forgets the upload: in progress, its charge is freed; sealed, its answer goes.
DROP_UPLOAD = _HEAD + _END_UPLOAD + """
local id = ARGV[3]
local rec = K('mup', id)
local r = redis.call('HMGET', rec, 'user', 'blob')
if r[1] and not r[2] then end_upload(id, r[1]) end
redis.call('DEL', rec)
redis.call('ZREM', K('mus'), id)
redis.call('SREM', K('mud'), id)
redis.call('HDEL', K('muh'), id)
return 1
"""

# ARGV: p, t, before, limit. Uploads in progress last touched at or before ``before`` end (their charge
# is freed) and join the set of stagings to discard, their 'sealing' digest kept aside (``muh``); returns
# that whole set, {id, sealing or ''} each: the caller discards each staging and the bytes a seal cut
# off left, then drops the id (DROP_UPLOAD), so a crash between is finished next round.
ABANDON = _HEAD + _END_UPLOAD + """
local idle = redis.call('ZRANGE', K('mui'), '-inf', ARGV[3], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(idle) do
  local rec = K('mup', id)
  local r = redis.call('HMGET', rec, 'user', 'sealing')
  if r[1] then end_upload(id, r[1]) else redis.call('ZREM', K('mui'), id) end
  if r[2] then redis.call('HSET', K('muh'), id, r[2]) end
  redis.call('DEL', rec)
  redis.call('SADD', K('mud'), id)
end
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', K('mud'))) do
  table.insert(out, id)
  table.insert(out, redis.call('HGET', K('muh'), id) or '')
end
return out
"""

# ARGV: p, t, id, blob, kept 0/1 (the blob is new: it keeps the charge), charge field ('b:<sha>:<created>'),
# now, the blob's charge. The upload names its blob; its charge ends and the blob's is taken, or none.
# Returns 1, or 0 if there was nothing to seal (sealed already, or abandoned).
SEAL_UPLOAD = _HEAD + _END_UPLOAD + """
local id = ARGV[3]
local rec = K('mup', id)
local r = redis.call('HMGET', rec, 'user', 'blob')
if not r[1] or r[2] then return 0 end
local user, cost = r[1], tonumber(ARGV[8])
end_upload(id, user)
redis.call('HSET', rec, 'blob', ARGV[4], 'touched', ARGV[7])
redis.call('ZADD', K('mus'), ARGV[7], id)
if ARGV[5] == '1' and redis.call('HSETNX', K('muc', user), ARGV[6], cost) == 1 then
  add(K('muq'), user .. ':b', cost)
end
return 1
"""

# ARGV: p, t, owner, charge field. The blob's charge is freed (once: the field goes with it).
RELEASE = _HEAD + """
local owner = ARGV[3]
local charges = K('muc', owner)
local size = redis.call('HGET', charges, ARGV[4])
if not size then return 0 end
redis.call('HDEL', charges, ARGV[4])
add(K('muq'), owner .. ':b', -tonumber(size))
return 1
"""

# ARGV: p, t. Returns {uploads in progress, then per user with bytes in live blobs: user, bytes}.
USAGE = _HEAD + """
local out = {redis.call('HGET', K('muq'), 'n') or '0'}
local all = redis.call('HGETALL', K('muq'))
for i = 1, #all, 2 do
  local user = string.match(all[i], '^(.*):b$')
  if user and tonumber(all[i + 1]) > 0 then
    table.insert(out, user)
    table.insert(out, all[i + 1])
  end
end
return out
"""

# ARGV: p, t. Returns the records of the uploads in progress, 8 fields each: id, user, device, to, size,
# created, touched, sealing or ''.
UPLOADS = _HEAD + """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', K('mui'), 0, -1)) do
  local r = redis.call('HMGET', K('mup', id), 'user', 'device', 'to', 'size', 'created', 'touched', 'sealing')
  if r[1] then
    r[7] = r[7] or ''
    table.insert(out, id)
    for _, v in ipairs(r) do table.insert(out, v) end
  end
end
return out
"""

# --- the blob's shard (tag mb<c>) ---------------------------------------------------------------

# A live blob becomes deleted: nobody waits any more, its charge joins the releases pending (member
# '<sha>:<created>:<owner>', stamped with Redis's clock), its record stays (answering gone) until
# forgotten. Returns its fields: sha, owner, size, created, expires, charge.
_DELETE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function delete_blob(sha)
  local blob = K('mb', sha)
  local b = redis.call('HMGET', blob, 'owner', 'size', 'created', 'expires', 'deleted', 'charge')
  if not b[1] or b[5] == '1' then return nil end
  redis.call('HSET', blob, 'deleted', '1')
  local waiting = K('mbw', sha)
  for _, device in ipairs(redis.call('SMEMBERS', waiting)) do
    local index = K('mbd', device)
    redis.call('SREM', index, sha)
    if redis.call('SCARD', index) == 0 then redis.call('SREM', K('mbv'), device) end
  end
  redis.call('DEL', waiting)
  redis.call('ZREM', K('mbx'), sha)
  redis.call('ZADD', K('mbg'), b[4], sha)
  redis.call('ZADD', K('mbp'), now_ms(), sha .. ':' .. b[3] .. ':' .. b[1])
  redis.call('HINCRBY', K('mbt'), 'bytes', -tonumber(b[2]))
  redis.call('HINCRBY', K('mbt'), 'blobs', -1)
  return {sha, b[1], b[2], b[3], b[4], b[6] or b[2]}
end
"""

# ARGV: p, t, sha, owner, size, created, expires, upload, readers (JSON), waiting (JSON), charge.
# Returns {1, created} if this upload's blob is new (or was made by this upload already: a retry),
# else {0, created of the live blob}.
SEAL_BLOB = _HEAD + """
local sha = ARGV[3]
local blob = K('mb', sha)
local b = redis.call('HMGET', blob, 'deleted', 'upload', 'created')
local new = 1
if b[1] == '0' then
  if b[2] ~= ARGV[8] then new = 0 end
else
  redis.call('HSET', blob, 'owner', ARGV[4], 'size', ARGV[5], 'created', ARGV[6], 'expires', ARGV[7],
             'deleted', '0', 'upload', ARGV[8], 'charge', ARGV[11])
  redis.call('ZADD', K('mbx'), ARGV[7], sha)
  redis.call('ZREM', K('mbg'), sha)
  redis.call('HINCRBY', K('mbt'), 'bytes', tonumber(ARGV[5]))
  redis.call('HINCRBY', K('mbt'), 'blobs', 1)
  b[3] = ARGV[6]
end
for _, user in ipairs(cjson.decode(ARGV[9])) do redis.call('SADD', K('mbr', sha), user) end
for _, device in ipairs(cjson.decode(ARGV[10])) do
  redis.call('SADD', K('mbw', sha), device)
  redis.call('SADD', K('mbd', device), sha)
  redis.call('SADD', K('mbv'), device)
end
return {new, b[3]}
"""

# ARGV: p, t, sha, client id. Returns the blob deleted (delete_blob's fields) or nil.
FETCHED = _HEAD + _DELETE + """
local sha, device = ARGV[3], ARGV[4]
local waiting = K('mbw', sha)
if redis.call('SREM', waiting, device) == 0 then return nil end
local index = K('mbd', device)
redis.call('SREM', index, sha)
if redis.call('SCARD', index) == 0 then redis.call('SREM', K('mbv'), device) end
if redis.call('SCARD', waiting) > 0 then return nil end
return delete_blob(sha)
"""

# ARGV: p, t, client ids... Returns the blobs deleted, 6 fields each.
REMOVE_DEVICES = _HEAD + _DELETE + """
local out = {}
for i = 3, #ARGV do
  local device = ARGV[i]
  local index = K('mbd', device)
  for _, sha in ipairs(redis.call('SMEMBERS', index)) do
    local waiting = K('mbw', sha)
    redis.call('SREM', waiting, device)
    if redis.call('SCARD', waiting) == 0 then
      local done = delete_blob(sha)
      if done then for _, v in ipairs(done) do table.insert(out, v) end end
    end
  end
  redis.call('DEL', index)
  redis.call('SREM', K('mbv'), device)
end
return out
"""

# ARGV: p, t, now, limit. The live blobs expired by ``now`` are deleted; returns them, 6 fields each.
EXPIRE = _HEAD + _DELETE + """
local out = {}
for _, sha in ipairs(redis.call('ZRANGE', K('mbx'), '-inf', ARGV[3], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[4]))) do
  local done = delete_blob(sha)
  if done then for _, v in ipairs(done) do table.insert(out, v) end else redis.call('ZREM', K('mbx'), sha) end
end
return out
"""

# ARGV: p, t, grace (ms), limit. Returns the releases pending for longer than ``grace`` (by Redis's clock).
PENDING = _HEAD + _DELETE + """
return redis.call('ZRANGE', K('mbp'), '-inf', now_ms() - tonumber(ARGV[3]), 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[4]))
"""

# ARGV: p, t, before (exclusive), limit. Drops the records of deleted blobs that expire before ``before``.
FORGET = _HEAD + """
local out = {}
local rows = redis.call('ZRANGE', K('mbg'), '-inf', '(' .. ARGV[3], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[4]))
for _, sha in ipairs(rows) do
  if redis.call('HGET', K('mb', sha), 'deleted') == '1' then
    redis.call('DEL', K('mb', sha), K('mbr', sha), K('mbw', sha))
    table.insert(out, sha)
  end
  redis.call('ZREM', K('mbg'), sha)
end
return out
"""
