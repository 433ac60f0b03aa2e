-- riskgate: claim a request id, record into and read windows, read a profile.
-- One call per evaluation: this is the round trip a decision waits for.
--
-- KEYS[1]  the request record (hash: fp, d = decision, o<kind> = outcome marks)
-- KEYS[2]  the user's profile (bytes)
-- KEYS[3..] one per key group: a hash of the key's series windows, fields
--          <tag>:<bucket> -> sum. A distinct window of the key is a sorted
--          set beside it, KEYS[k] .. "\x1e" .. tag (same hash tag, and ids
--          hold no control characters): member the value, score its last
--          seen ms. Every operation on it is O(log n), so a key thousands of
--          users share costs what any other does.
-- ARGV[1]  claim | peek | event | outcome | none
-- ARGV[2]  the request fingerprint; for an outcome, its mark field (o<bit>)
-- ARGV[3]  TTL of a new record, ms; for an outcome, the mark fields of the
--          outcomes that contradict it, space separated
-- then per key group: its TTL (ms), its number of windows n, and six per window:
--   kind  s (series) | d (distinct)
--   op    r (record, then read) | i (read, counting this request in) | g (read)
--   delta series: the amount or 1; distinct: the value's hash
--   lo    series: oldest bucket the read covers; distinct: oldest ms
--   hi    series: this request's bucket;         distinct: this request's ms
--   tag   the window's field prefix (8 hex digits of its signature)
local MAX_DISTINCT = 4096

local mode = ARGV[1]
if mode == 'outcome' then
  -- Marked here, with what the outcome counts below: both or neither.
  if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
  if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return {'seen'} end
  for field in string.gmatch(ARGV[3], '%S+') do
    if redis.call('HEXISTS', KEYS[1], field) == 1 then return {'contradicts', field} end
  end
  redis.call('HSET', KEYS[1], ARGV[2], 1)
elseif mode ~= 'none' then
  local fp = redis.call('HGET', KEYS[1], 'fp')
  if fp then
    if fp ~= ARGV[2] then return {'conflict'} end
    if mode == 'event' then return {'seen'} end
    local d = redis.call('HGET', KEYS[1], 'd')
    if d then return {'replay', d} end
    if mode == 'claim' then return {'pending'} end
  elseif mode == 'claim' or mode == 'event' then
    redis.call('HSET', KEYS[1], 'fp', ARGV[2])
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
  end
end

-- A distinct window: hold the bound, record (ZADD GT keeps the latest
-- time), drop what left the span (only when this read is the newest: not
-- for a late event), and count.
local function distinct(zkey, w, ttl)
  if w.op == 'r' then
    -- A new value at the bound makes room first, as the memory store does:
    -- what left the span as of this event, then the least recently seen
    -- (never the value being recorded, however late it is).
    if not redis.call('ZSCORE', zkey, w.delta) and redis.call('ZCARD', zkey) >= MAX_DISTINCT then
      redis.call('ZREMRANGEBYSCORE', zkey, '-inf', '(' .. w.lo)
      if redis.call('ZCARD', zkey) >= MAX_DISTINCT then redis.call('ZPOPMIN', zkey) end
    end
    redis.call('ZADD', zkey, 'GT', w.hi, w.delta)
    redis.call('PEXPIRE', zkey, ttl)
  end
  local newest = redis.call('ZRANGE', zkey, -1, -1, 'WITHSCORES')[2]
  local value = 0
  if newest and tonumber(newest) <= w.hi then
    redis.call('ZREMRANGEBYSCORE', zkey, '-inf', '(' .. w.lo)
    value = redis.call('ZCARD', zkey)
  elseif newest then
    value = redis.call('ZCOUNT', zkey, w.lo, w.hi)
  end
  if w.op == 'i' then
    local t = redis.call('ZSCORE', zkey, w.delta)
    if not t or tonumber(t) < w.lo or tonumber(t) > w.hi then value = value + 1 end
  end
  return value
end

-- One key group: apply its records, then read its series from one HGETALL
-- (at most a span's buckets each) and each distinct window from its set.
-- Returns the index of the next group's first argument.
local function group(key, a, out)
  local ttl, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local ws, bytag, series, recorded = {}, {}, false, false
  for i = 1, n do
    local w = {
      kind = ARGV[a], op = ARGV[a + 1], delta = ARGV[a + 2],
      lo = tonumber(ARGV[a + 3]), hi = tonumber(ARGV[a + 4]), tag = ARGV[a + 5],
      value = 0, newest = nil, stale = {},
    }
    a = a + 6
    ws[i] = w
    if w.kind == 's' then
      series, bytag[w.tag] = true, w
      if w.op == 'r' then
        recorded = true
        redis.call('HINCRBY', key, w.tag .. ':' .. ARGV[a - 2], w.delta)
      end
    end
  end
  if recorded then redis.call('PEXPIRE', key, ttl) end
  local all = series and redis.call('HGETALL', key) or {}
  for i = 1, #all, 2 do
    local f = all[i]
    local w = bytag[string.sub(f, 1, 8)]
    if w then
      local b = tonumber(string.sub(f, 10))
      if b >= w.lo and b <= w.hi then w.value = w.value + tonumber(all[i + 1]) end
      if b < w.lo then w.stale[#w.stale + 1] = f end
      if w.newest == nil or b > w.newest then w.newest = b end
    end
  end
  for i = 1, n do
    local w = ws[i]
    if w.kind == 'd' then
      w.value = distinct(key .. '\30' .. w.tag, w, ttl)
    else
      -- Expired buckets go only when this read is the newest (not a late event).
      if #w.stale > 0 and w.newest <= w.hi then
        redis.call('HDEL', key, unpack(w.stale))
      end
      if w.op == 'i' then w.value = w.value + tonumber(w.delta) end
    end
    out[#out + 1] = w.value
  end
  return a
end

local out = {'new', false, redis.call('GET', KEYS[2])}
local a = 4
for k = 3, #KEYS do
  a = group(KEYS[k], a, out)
end
return out
