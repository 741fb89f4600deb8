-- Prepended to both in-flight scripts. Per endpoint:
--   KEYS[1] a hash: limit (float), fast_us (recent median latency), base_us (unloaded latency),
--           last_cut (when the limit was last cut), grown (1 once slow start has ended),
--           metered (1: the endpoint sends x-ratelimit-* headers, the rate budget governs it)
--   KEYS[2] a sorted set of leases: token -> expiry (a crashed worker's slot frees itself)
--   KEYS[3] a sorted set of waiters: token -> expiry (how many wait, to space their polls)
--   KEYS[4] a list of the latest latencies (us)
-- Times are integer microseconds on one clock: Redis TIME, unless a test passes its own.
-- ARGV: 1 now ("" = TIME), 2 fixed cap ("" = none), 3 adaptive (1/0), 4 idle expiry ms;
-- script-specific arguments start at 5.
local state, leases, waiters, samples = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

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
  for _, key in ipairs({state, leases, waiters, samples}) do
    redis.call("PEXPIRE", key, idle_ms)
  end
end

redis.call("ZREMRANGEBYSCORE", leases, "-inf", now)
redis.call("ZREMRANGEBYSCORE", waiters, "-inf", now)
