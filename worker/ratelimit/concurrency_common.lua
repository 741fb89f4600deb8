-- Prepended to both in-flight scripts. Per endpoint:
--   KEYS[1] a hash: limit (float), fast_us (recent median latency), base_us (unloaded latency),
--           last_cut (when the limit was last cut), grown (1 once slow start has ended),
--           metered (1: the endpoint sends x-ratelimit-* headers, the rate budget governs it)
--   KEYS[2] a sorted set of leases: token -> expiry (a crashed worker's slot frees itself)
--   KEYS[3] a sorted set of waiters: token -> expiry (how many wait: to space polls, size wake-ups)
--   KEYS[4] a list of the latest latencies (us)
--   KEYS[5] a list of wake-up tokens that waiters BLPOP: one per slot free for a waiter
-- Times are integer microseconds on one clock: Redis TIME, unless a test passes its own.
-- ARGV: 1 now ("" = TIME), 2 fixed cap ("" = none), 3 adaptive (1/0), 4 idle expiry ms;
-- script-specific arguments start at 5.
local state, leases, waiters, samples, wakeups = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

local cap = tonumber(ARGV[2])  -- nil when ""
local adaptive = ARGV[3] == "1"
local idle_ms = tonumber(ARGV[4])

-- Slow start begins at one request in flight, so the first sample is the unloaded latency.
local INITIAL_LIMIT = 1
local MIN_LIMIT = 1
local MAX_LIMIT = 1000

local function field(name)
  return tonumber(redis.call("HGET", state, name))
end

-- nil = no limit at all (no lease is taken)
local function limit_in_force()
  local limit = nil
  if adaptive and field("metered") ~= 1 then
    limit = field("limit") or INITIAL_LIMIT
  end
  if cap and (limit == nil or cap < limit) then limit = cap end
  return limit
end

local function keep_alive()
  for _, key in ipairs({state, leases, waiters, samples, wakeups}) do
    redis.call("PEXPIRE", key, idle_ms)
  end
end

-- Call before keep_alive. Leaves one wake-up token per slot that is free for a waiter, no more:
-- a release (or a grown limit) wakes that many blocked waiters at once instead of at their next
-- poll, and a token left over after its slot was taken (or the limit cut) is dropped, so a later
-- waiter is not woken for nothing. Redis hands a pushed token to a client already blocked in BLPOP
-- before it runs any other command; one that is not blocked yet finds it in the list.
local function wake_waiters()
  local limit = limit_in_force()
  local want = redis.call("ZCARD", waiters)
  if limit ~= nil then want = math.min(want, math.floor(limit) - redis.call("ZCARD", leases)) end
  want = math.min(want, MAX_LIMIT)
  local have = redis.call("LLEN", wakeups)
  if want <= 0 then
    if have > 0 then redis.call("DEL", wakeups) end
  elseif have > want then
    redis.call("LTRIM", wakeups, 0, want - 1)
  else
    for _ = have + 1, want do redis.call("RPUSH", wakeups, 1) end
  end
end

redis.call("ZREMRANGEBYSCORE", leases, "-inf", now)
redis.call("ZREMRANGEBYSCORE", waiters, "-inf", now)
