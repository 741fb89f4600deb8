-- Prepended to every script. One hash per budget (KEYS[1]) holds:
--   req_tat, tok_tat  theoretical arrival times (GCRA) of the request and token schedules
--   cool_until        end of the cluster-wide cool-down
--   learnt_rpm/tpm    limits read from the provider's headers
-- Times are integer microseconds on one clock: Redis TIME, unless a test passes its own.
-- ARGV: 1 now ("" = TIME), 2 idle expiry ms, 3-4 configured rpm/tpm, 5-6 fallback rpm/tpm
-- ("" = none), 7 burst us; script-specific arguments start at 8.
local budget = KEYS[1]
local MINUTE_US = 60000000

local now
if ARGV[1] ~= "" then
  now = tonumber(ARGV[1])
else
  local time = redis.call("TIME")
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local burst_us = tonumber(ARGV[7])

local function stored(field)
  return tonumber(redis.call("HGET", budget, field) or 0)
end

local function store(field, value)
  -- ceil: rounding never hands out budget
  redis.call("HSET", budget, field, string.format("%.0f", math.ceil(value)))
end

-- configured > learnt > fallback; nil means that dimension is unlimited
local function limit_in_force(configured, learnt_field, fallback)
  if configured ~= "" then return tonumber(configured) end
  local learnt = redis.call("HGET", budget, learnt_field)
  if learnt then return tonumber(learnt) end
  if fallback ~= "" then return tonumber(fallback) end
  return nil
end

local rpm = limit_in_force(ARGV[3], "learnt_rpm", ARGV[5])
local tpm = limit_in_force(ARGV[4], "learnt_tpm", ARGV[6])

local function interval_us(limit)
  return MINUTE_US / limit
end

-- What a schedule that has caught up with now admits at one instant: burst_us worth of the rate,
-- and at least one unit.
local function burst_span_us(limit)
  return math.max(burst_us, interval_us(limit))
end

-- A unit is admitted while the schedule is at most this far ahead of now.
local function tolerance_us(limit)
  return burst_span_us(limit) - interval_us(limit)
end

-- Kept while idle for the expiry, and never dropped before its schedules have run out.
local function keep_alive()
  local horizon = math.max(stored("req_tat"), stored("tok_tat"), stored("cool_until"), now) - now
  redis.call("PEXPIRE", budget, tonumber(ARGV[2]) + math.ceil(horizon / 1000))
end
