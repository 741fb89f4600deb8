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
  wake_waiters()  -- no adaptive limit any more: the waiters may go (up to a fixed cap)
  keep_alive()
  return 0
end

local limit = field("limit") or INITIAL_LIMIT
local fast = field("fast_us")
local last_cut = field("last_cut") or 0
-- Answers judged together (fewer after a cut: fresh ones only); the unloaded latency is only
-- taken from a full window, whose median is steady.
local WINDOW, MIN_SAMPLES = 15, 5

local function cut(factor)
  -- At most once per current latency: the answers already under way carry the same news.
  if limit > MIN_LIMIT and now - last_cut >= (fast or 0) then
    limit = math.max(MIN_LIMIT, limit * factor)
    redis.call("HSET", state, "last_cut", now, "grown", 1)
    -- Judge the new limit by answers sent under it, not by the queue it was cut for.
    redis.call("DEL", samples)
  end
end

local function median(values, first)
  local sorted = {}
  for i = first, #values do sorted[#sorted + 1] = tonumber(values[i]) end
  table.sort(sorted)
  return sorted[math.floor((#sorted + 1) / 2)]
end

if outcome == "ok" and rtt then
  redis.call("RPUSH", samples, rtt)
  redis.call("LTRIM", samples, -WINDOW, -1)
  local recent = redis.call("LRANGE", samples, 0, -1)
  if #recent >= MIN_SAMPLES then
    -- Latency now: the median of about one latency's worth of answers (one slow answer is not
    -- a queue, and a queue shows within a latency, also during slow start) ...
    local span = math.max(MIN_SAMPLES, math.min(WINDOW, math.floor(limit)))
    fast = median(recent, math.max(1, #recent - span + 1))
    -- ... against the unloaded latency: the lowest median of a full window seen (steadier).
    local base = field("base_us")
    local steady = #recent == WINDOW and median(recent, 1) or nil
    if base == nil then base = fast end
    if steady and steady < base then base = steady end
    redis.call("HSET", state, "fast_us", string.format("%.0f", fast), "base_us", string.format("%.0f", base))
    local queued = fast > tolerance * base and fast - base > min_queue
    if queued and limit < 2 and steady then
      -- A whole window of answers one at a time, and still slow: no queue of ours, the server
      -- itself became slower (longer answers, other clients). Its unloaded latency is this.
      base = steady
      redis.call("HSET", state, "base_us", string.format("%.0f", base))
      queued = false
    end
    -- A band, as TCP Vegas has: grow only while latency is near the unloaded one (within half
    -- the tolerance, or below the queueing noise), hold between that and the tolerance, cut
    -- above it. Growing up to the tolerance itself overshoots by one and cuts every few latencies.
    local near = fast <= (1 + (tolerance - 1) / 2) * base or fast - base <= min_queue
    if queued then
      cut(math.max(0.5, tolerance * base / fast))
    elseif near and in_flight * 2 >= limit then
      -- Grow only a limit that is used. Slow start: +1 per answer (doubles per latency);
      -- then +1 per latency's worth of answers.
      if field("grown") == 1 then limit = limit + 1 / limit else limit = limit + 1 end
    end
  end
elseif outcome == "overload" then
  cut(0.5)
  -- The server goes on generating the answer nobody waits for: its slot stays taken a while.
  if fast then redis.call("ZADD", leases, now + fast, token .. ":abandoned") end
end
limit = math.min(MAX_LIMIT, limit)
redis.call("HSET", state, "limit", string.format("%.4f", limit))
wake_waiters()  -- in the same round trip as the release: the freed slot is not left idle
keep_alive()
return 0
