-- ARGV[9]: cool-down in microseconds (called after a 429, once observe.lua has read its headers).
-- Extends the cluster-wide pause, never shortens it.
local cool_until = math.max(now + tonumber(ARGV[9]), stored("cool_until"))
store("cool_until", cool_until)

-- A 429 while the provider's own headers say more than our burst is left: it enforces over a
-- shorter period than it reports (e.g. R/60 per second). Headroom is off for this budget from now
-- on. What the probe spent above the rate is forgotten (such a provider does not remember it past
-- its period): the schedules wait no longer than the pause, then go on as before any headroom.
local function room(dim, limit)
  local left = redis.call("HGET", budget, dim .. "_left")
  if not left or not limit then return nil end
  return tonumber(left) * interval_us(limit) >= nominal_span_us(limit)
end

local function forget_probe(dim, limit)
  if limit and stored(dim .. "_tat") > cool_until + tolerance_us(dim, limit) then
    store(dim .. "_tat", cool_until + tolerance_us(dim, limit))
  end
end

if headroom_allowed and not quantized then
  local req_room, tok_room = room("req", rpm), room("tok", tpm)
  if (req_room or tok_room) and req_room ~= false and tok_room ~= false then
    redis.call("HSET", budget, "quantized", "1")
    redis.call("HDEL", budget, "req_head", "tok_head", "req_seen", "tok_seen", "head_at")
    quantized = true
    forget_probe("req", rpm)
    forget_probe("tok", tpm)
  end
end
keep_alive()
return 0
