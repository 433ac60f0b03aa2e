-- riskgate: after a decision. Stores it for retries, takes a blocked
-- request's reservations back out of its windows, and updates the profile by
-- compare-and-set, so instances never lose each other's updates. Outcomes
-- use it too, to release and to learn, with no decision to store.
--
-- KEYS[1]  the request record
-- KEYS[2]  the user's profile
-- KEYS[3..] windows to release from
-- ARGV[1]  the decision to store ('' : none)
-- ARGV[2]  the record's TTL, ms
-- ARGV[3]  keep | cas
-- ARGV[4]  the profile as read ('' : none)
-- ARGV[5]  the profile to write
-- ARGV[6]  the profile's TTL, ms
-- ARGV[7]  the request's fingerprint (with a decision to store)
-- then two per window key: the field (<tag>:<bucket>), the amount to take back
--
-- Returns {1 | 0 (the profile changed since it was read), the profile as it
-- is, 1 when this call released}.
if ARGV[1] ~= '' then
  -- A claim that lapsed before this landed leaves no fingerprint: put it
  -- back, so that a retry replays this decision instead of deciding (and
  -- counting) again. Another request's claim of the id keeps its record.
  local fp = redis.call('HGET', KEYS[1], 'fp')
  if not fp or fp == ARGV[7] then
    redis.call('HSET', KEYS[1], 'd', ARGV[1], 'fp', ARGV[7])
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
end
-- A request is released once: a retried settle, or a failed challenge and
-- then the failed payment, take nothing back a second time.
local released = 0
if #KEYS >= 3 and redis.call('EXISTS', KEYS[1]) == 1
    and redis.call('HSETNX', KEYS[1], 'rel', 1) == 1 then
  released = 1
  for k = 3, #KEYS do
    local a = 8 + (k - 3) * 2
    if redis.call('HEXISTS', KEYS[k], ARGV[a]) == 1 then
      redis.call('HINCRBY', KEYS[k], ARGV[a], -tonumber(ARGV[a + 1]))
    end
  end
end
if ARGV[3] == 'cas' then
  local cur = redis.call('GET', KEYS[2]) or ''
  if cur ~= ARGV[4] then return {0, cur, released} end
  redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[6])
end
return {1, '', released}
