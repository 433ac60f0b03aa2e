-- riskgate: claim a request id, record into and read windows, read a profile.
-- One call per evaluation: this is the round trip a decision waits for.
--
-- KEYS[1]  the request record (hash: fp, d = decision, o<kind> = outcome marks)
-- KEYS[2]  the user's profile (bytes)
-- KEYS[3..] one per key group: a hash of every window of the key, fields
--          <tag>:<bucket> -> sum (series) or <tag>:<value> -> last seen ms
--          (distinct)
-- ARGV[1]  claim | peek | event | none
-- ARGV[2]  the request fingerprint
-- ARGV[3]  TTL of a new record, ms
-- then per key group: its TTL (ms), its number of windows n, and six per window:
--   kind  s (series) | d (distinct)
--   op    r (record, then read) | i (read, counting this request in) | g (read)
--   delta series: the amount or 1; distinct: the value's hash
--   lo    series: oldest bucket the read covers; distinct: oldest ms
--   hi    series: this request's bucket;         distinct: this request's ms
--   tag   the window's field prefix (8 hex digits of its signature)
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

-- One key group: apply its records, then read every window from one HGETALL.
-- Returns the index of the next group's first argument.
local function group(key, a, out)
  local ttl, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local ws, bytag, recorded = {}, {}, false
  for i = 1, n do
    local w = {
      kind = ARGV[a], op = ARGV[a + 1], delta = ARGV[a + 2],
      lo = tonumber(ARGV[a + 3]), hi = tonumber(ARGV[a + 4]), tag = ARGV[a + 5],
      value = 0, newest = nil, stale = {}, seen = false, count = 0,
      oldest = nil, oldest_t = nil,
    }
    a = a + 6
    ws[i], bytag[w.tag] = w, w
    if w.op == 'r' then
      recorded = true
      if w.kind == 's' then
        redis.call('HINCRBY', key, w.tag .. ':' .. ARGV[a - 2], w.delta)
      else
        local f = w.tag .. ':' .. w.delta
        local old = redis.call('HGET', key, f)
        if not old or tonumber(old) < w.hi then redis.call('HSET', key, f, ARGV[a - 2]) end
      end
    end
  end
  if recorded then redis.call('PEXPIRE', key, ttl) end
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    local f = all[i]
    local w = bytag[string.sub(f, 1, 8)]
    if w then
      local x = string.sub(f, 10)
      if w.kind == 's' then
        local b = tonumber(x)
        if b >= w.lo and b <= w.hi then w.value = w.value + tonumber(all[i + 1]) end
        if b < w.lo then w.stale[#w.stale + 1] = f end
        if w.newest == nil or b > w.newest then w.newest = b end
      else
        local t = tonumber(all[i + 1])
        w.count = w.count + 1
        if t >= w.lo and t <= w.hi then
          w.value = w.value + 1
          if x == w.delta then w.seen = true end
        end
        if t < w.lo then w.stale[#w.stale + 1] = f end
        if w.newest == nil or t > w.newest then w.newest = t end
        if w.oldest_t == nil or t < w.oldest_t then w.oldest, w.oldest_t = f, t end
      end
    end
  end
  for i = 1, n do
    local w = ws[i]
    -- Expired entries go only when this read is the newest (not a late event).
    if #w.stale > 0 and w.newest <= w.hi then
      redis.call('HDEL', key, unpack(w.stale))
    elseif w.kind == 'd' and w.op == 'r' and w.count > MAX_DISTINCT then
      redis.call('HDEL', key, w.oldest)
      if w.oldest_t >= w.lo then w.value = w.value - 1 end
    end
    if w.op == 'i' then
      if w.kind == 's' then w.value = w.value + tonumber(w.delta)
      elseif not w.seen then w.value = w.value + 1 end
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
