-- ARGV[5] token, ARGV[6] outcome: "ok" (a latency sample), "overload" (a timeout: the server
-- queues), "other" (no sample); ARGV[7] latency us; ARGV[8] metered (1/0); ARGV[9] tolerance
-- (latency / unloaded latency that counts as queueing); ARGV[10] min queueing us (less is noise).
local token, outcome, rtt = ARGV[5], ARGV[6], tonumber(ARGV[7])
local metered = ARGV[8] == "1"
local tolerance, min_queue = tonumber(ARGV[9]), tonumber(ARGV[10])
-- Counted with this request, which was in flight when it finished.
local in_flight = redis.call("ZCARD", leases)
local held = redis.call("ZREM", leases, token)
if held == 0 then in_flight = in_flight + 1 end

if metered then
  redis.call("HSET", state, "metered", 1)
  keep_alive()
  return 0
end

local limit = field("limit") or INITIAL_LIMIT
local fast = field("fast_us")
local last_cut = field("last_cut") or 0
local ALPHA = 0.2  -- EWMA weight of one sample: smooths one slow answer, follows a queue within a few

local function cut(factor)
  -- At most once per current latency: the answers already under way carry the same news.
  if now - last_cut >= (fast or 0) then
    limit = math.max(MIN_LIMIT, limit * factor)
    redis.call("HSET", state, "last_cut", now, "grown", 1)
  end
end

if outcome == "ok" and rtt then
  fast = fast and (fast + ALPHA * (rtt - fast)) or rtt
  local base = field("base_us")
  if base == nil or fast < base or in_flight <= 1 then
    -- One request alone shows the unloaded latency, also after the server became slower.
    base = fast
  end
  redis.call("HSET", state, "fast_us", string.format("%.0f", fast), "base_us", string.format("%.0f", base))
  if fast > tolerance * base and fast - base > min_queue then
    cut(math.max(0.5, tolerance * base / fast))
  elseif in_flight * 2 >= limit then
    -- Grow only a limit that is used. Slow start: +1 per answer (doubles per latency);
    -- then +1 per latency's worth of answers.
    if field("grown") == 1 then limit = limit + 1 / limit else limit = limit + 1 end
  end
elseif outcome == "overload" then
  cut(0.5)
  -- The server goes on generating the answer nobody waits for: its slot stays taken a while.
  if fast then redis.call("ZADD", leases, now + fast, token .. ":abandoned") end
end
limit = math.min(MAX_LIMIT, limit)
redis.call("HSET", state, "limit", string.format("%.4f", limit))
keep_alive()
return 0
