-- riskgate: after a decision. Stores it for retries, takes a blocked
-- request's reservations back out of its windows, and updates the profile by
-- compare-and-set, so instances never lose each other's updates.
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
-- then two per window key: the field (<tag>:<bucket>), the amount to take back
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'd', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
for k = 3, #KEYS do
  local a = 7 + (k - 3) * 2
  if redis.call('HEXISTS', KEYS[k], ARGV[a]) == 1 then
    redis.call('HINCRBY', KEYS[k], ARGV[a], -tonumber(ARGV[a + 1]))
  end
end
if ARGV[3] == 'cas' then
  local cur = redis.call('GET', KEYS[2]) or ''
  if cur ~= ARGV[4] then return {0, cur} end
  redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[6])
end
return {1}
