-- Prepended to every script. One hash per budget (KEYS[1]) holds:
--   req_tat, tok_tat  theoretical arrival times (GCRA) of the request and token schedules
--   cool_until        end of the cluster-wide cool-down
--   learnt_rpm/tpm    limits read from the provider's headers
--   req_head, tok_head  headroom: the burst span (us) the provider's `remaining` has shown room
--                     for, above our own burst; grows while evidence comes in (observe.lua)
--   req_seen, tok_seen  the most `remaining` any response reported (the provider's capacity, at least)
--   req_left, tok_left  `remaining` in the latest response ("" fields are deleted)
--   head_at           when the headroom last grew
--   quantized         "1": a 429 came while the provider said there was room, so it enforces over
--                     a shorter period than it reports; headroom is off for this budget from then on
-- Times are integer microseconds on one clock: Redis TIME, unless a test passes its own.
-- ARGV: 1 now ("" = TIME), 2 idle expiry ms, 3-4 configured rpm/tpm, 5-6 fallback rpm/tpm
-- ("" = none), 7 burst us, 8 headroom allowed ("1"/"0"); script-specific arguments start at 9.
local budget = KEYS[1]
local MINUTE_US = 60000000

local burst_us = tonumber(ARGV[7])
local headroom_allowed = ARGV[8] == "1"

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
local quantized = redis.call("HGET", budget, "quantized") == "1"

local function interval_us(limit)
  return MINUTE_US / limit
end

-- Our own burst: burst_us worth of the rate, and at least one unit.
local function nominal_span_us(limit)
  return math.max(burst_us, interval_us(limit))
end

-- What a schedule that has caught up with now admits at one instant (dim: "req" or "tok"): our
-- burst, or the headroom the provider has shown, whichever is larger.
local function burst_span_us(dim, limit)
  local span = nominal_span_us(limit)
  if headroom_allowed and not quantized then
    span = math.max(span, stored(dim .. "_head"))
  end
  return span
end

-- A unit is admitted while the schedule is at most this far ahead of now.
local function tolerance_us(dim, limit)
  return burst_span_us(dim, limit) - interval_us(limit)
end

-- Kept while idle for the expiry, and never dropped before its schedules have run out.
local function keep_alive()
  local horizon = math.max(stored("req_tat"), stored("tok_tat"), stored("cool_until"), now) - now
  redis.call("PEXPIRE", budget, tonumber(ARGV[2]) + math.ceil(horizon / 1000))
end
