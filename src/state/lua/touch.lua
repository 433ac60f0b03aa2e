-- riskgate: claim a request id, record into and read windows, read a profile.
-- One call per evaluation: this is the round trip a decision waits for.
--
-- KEYS[1]  the request record (hash: fp, d = decision, o<kind> = outcome marks)
-- KEYS[2]  the user's profile (bytes)
-- KEYS[3..] one per window: a hash of bucket -> sum (series) or value -> last
--          seen ms (distinct)
-- ARGV[1]  claim | peek | event | none
-- ARGV[2]  the request fingerprint
-- ARGV[3]  TTL of a new record, ms
-- then six per window key:
--   kind  s (series) | d (distinct)
--   op    r (record, then read) | i (read, counting this request in) | g (read)
--   delta series: the amount or 1; distinct: the value's hash
--   lo    series: oldest bucket the read covers; distinct: oldest ms
--   hi    series: this request's bucket;         distinct: this request's ms
--   ttl   ms: the window's span plus a bucket
local MAX_DISTINCT = 4096

local mode = ARGV[1]
if mode ~= 'none' then
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

local function series(key, op, delta, lo, hi, ttl)
  if op == 'r' then
    redis.call('HINCRBY', key, hi, delta)
    redis.call('PEXPIRE', key, ttl)
  end
  local lo_n, hi_n = tonumber(lo), tonumber(hi)
  local all = redis.call('HGETALL', key)
  local sum, newest, stale = 0, nil, {}
  for i = 1, #all, 2 do
    local b = tonumber(all[i])
    if b >= lo_n and b <= hi_n then sum = sum + tonumber(all[i + 1]) end
    if b < lo_n then stale[#stale + 1] = all[i] end
    if newest == nil or b > newest then newest = b end
  end
  -- Expired buckets go only when this read is the newest (not a late event).
  if #stale > 0 and newest <= hi_n then redis.call('HDEL', key, unpack(stale)) end
  if op == 'i' then sum = sum + tonumber(delta) end
  return sum
end

local function distinct(key, op, value, lo, hi, ttl)
  local lo_n, hi_n = tonumber(lo), tonumber(hi)
  if op == 'r' then
    local old = redis.call('HGET', key, value)
    if not old or tonumber(old) < hi_n then redis.call('HSET', key, value, hi) end
    redis.call('PEXPIRE', key, ttl)
  end
  local all = redis.call('HGETALL', key)
  local n, stale, current, seen = 0, {}, true, false
  local oldest, oldest_t = nil, nil
  for i = 1, #all, 2 do
    local t = tonumber(all[i + 1])
    if t >= lo_n and t <= hi_n then
      n = n + 1
      if all[i] == value then seen = true end
    end
    if t < lo_n then stale[#stale + 1] = all[i] end
    if t > hi_n then current = false end
    if oldest_t == nil or t < oldest_t then oldest, oldest_t = all[i], t end
  end
  if #stale > 0 and current then
    redis.call('HDEL', key, unpack(stale))
  elseif op == 'r' and #all / 2 > MAX_DISTINCT then
    redis.call('HDEL', key, oldest)
    n = n - 1
  end
  if op == 'i' and not seen then n = n + 1 end
  return n
end

local out = {'new', false, redis.call('GET', KEYS[2])}
for k = 3, #KEYS do
  local a = 4 + (k - 3) * 6
  local f = series
  if ARGV[a] == 'd' then f = distinct end
  out[#out + 1] = f(KEYS[k], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5])
end
return out
