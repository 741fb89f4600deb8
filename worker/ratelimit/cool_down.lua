-- ARGV[9]: cool-down in microseconds (called after a 429, once observe.lua has read its headers).
-- Extends the cluster-wide pause, never shortens it.
local cool_until = math.max(now + tonumber(ARGV[9]), stored("cool_until"))
store("cool_until", cool_until)

-- A 429 while the provider's own headers say more than our burst is left: it enforces over a
-- shorter period than it reports (e.g. R/60 per second). Headroom is off for this budget from now
-- on.
local function room(dim, limit)
  local left = redis.call("HGET", budget, dim .. "_left")
  if not left or not limit then return nil end
  return tonumber(left) * interval_us(limit) >= nominal_span_us(limit)
end

if headroom_allowed and not quantized then
  local req_room, tok_room = room("req", rpm), room("tok", tpm)
  if (req_room or tok_room) and req_room ~= false and tok_room ~= false then
    redis.call("HSET", budget, "quantized", "1")
    redis.call("HDEL", budget, "req_head", "tok_head", "req_seen", "tok_seen", "head_at")
    quantized = true
  end
end

-- A quantized budget restarts at the pause's end at the rate, without a burst: a burst there would
-- land in one period with the paced requests and be refused again. What it spent before (the
-- probe's too) is forgotten: such a provider does not remember past its period. A token bucket's
-- budget keeps its schedule: the bucket refills during the pause as the schedule does.
if quantized then
  if rpm then store("req_tat", cool_until + tolerance_us("req", rpm)) end
  if tpm then store("tok_tat", cool_until + tolerance_us("tok", tpm)) end
end
keep_alive()
return 0
