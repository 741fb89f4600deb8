-- ARGV[9..10]: the provider's request limit and remaining requests; ARGV[11..12]: the same for
-- tokens. "" = absent or unreadable.
local function learn(learnt_field, limit)
  if limit ~= "" then redis.call("HSET", budget, learnt_field, limit) end
end

-- Our schedule would admit up to one burst right now. If the provider has fewer units left (other
-- clients share the key), push the schedule later so that we admit only those; never earlier.
-- `remaining` is not a backlog to wait out: a provider with a sliding 60 s window reports about 0
-- left whenever we pace at exactly the limit.
local function catch_up(dim, limit, remaining)
  if not limit or remaining == "" then return end
  local tat_field = dim .. "_tat"
  local target = now + burst_span_us(dim, limit) - tonumber(remaining) * interval_us(limit)
  if target > stored(tat_field) then
    store(tat_field, target)
  end
end

-- Headroom: `remaining` is evidence of what the provider would take at once. While it stays above
-- our own burst and no 429 has said otherwise, the burst we allow grows (doubling each second,
-- at least 2 s of the rate per second, at most one request per response) up to the most the
-- provider ever reported: a token bucket
-- never holds less than it reported, and our schedule counts every request we sent, in flight or
-- not, so the provider's bucket is never emptier than ours.
local HEAD_GROWTH_MIN = 2

local function probe(dim, limit, remaining)
  if remaining == "" then
    redis.call("HDEL", budget, dim .. "_left")
    return false
  end
  redis.call("HSET", budget, dim .. "_left", remaining)
  if not limit or not headroom_allowed or quantized then return false end
  local left = math.min(tonumber(remaining), limit)
  local cap = math.max(stored(dim .. "_seen"), left)
  store(dim .. "_seen", cap)
  local head = math.max(stored(dim .. "_head"), nominal_span_us(limit))
  local last = redis.call("HGET", budget, "head_at")
  if last and left * interval_us(limit) >= nominal_span_us(limit) then
    local elapsed = math.max(0, now - tonumber(last))
    -- At most one request's worth per response: extra requests go out one by one, so the first
    -- 429 of a provider that enforces a shorter period comes back before many follow it.
    local step = rpm and interval_us(rpm) or math.huge
    head = head + math.min(step, elapsed * math.max(HEAD_GROWTH_MIN, head / 1000000))
  end
  -- floor: the headroom never exceeds what the provider reported
  redis.call("HSET", budget, dim .. "_head", string.format("%.0f", math.floor(math.min(head, cap * interval_us(limit)))))
  return true
end

learn("learnt_rpm", ARGV[9])
learn("learnt_tpm", ARGV[11])
rpm = limit_in_force(ARGV[3], "learnt_rpm", ARGV[5])
tpm = limit_in_force(ARGV[4], "learnt_tpm", ARGV[6])
catch_up("req", rpm, ARGV[10])
catch_up("tok", tpm, ARGV[12])
local probed_requests = probe("req", rpm, ARGV[10])
local probed_tokens = probe("tok", tpm, ARGV[12])
if probed_requests or probed_tokens then store("head_at", now) end
keep_alive()
return 0
