-- ARGV[5] token, ARGV[6] lease us (how long a slot stays taken if nobody releases it).
-- Returns -1: granted, no limit applies (nothing to release); 0: granted, a lease is held;
-- > 0: microseconds to wait before asking again (nothing taken).
local token, lease_us = ARGV[5], tonumber(ARGV[6])
local limit = limit_in_force()
if limit == nil then
  return -1
end
if redis.call("ZCARD", leases) < math.floor(limit) then
  redis.call("ZADD", leases, now + lease_us, token)
  redis.call("ZREM", waiters, token)
  wake_waiters()
  keep_alive()
  return 0
end
-- About one slot frees per latency / limit; with `waiting` callers asking, each asks again after
-- `waiting` of those intervals, so polls stay near one per completed request.
local fast = field("fast_us") or 100000
local waiting = redis.call("ZCARD", waiters) + 1
local wait = math.max(1000, fast * waiting / math.max(limit, 1))
redis.call("ZADD", waiters, now + 2 * wait + 1000000, token)
wake_waiters()  -- no slot is free: drops any token left over
keep_alive()
return math.ceil(wait)
