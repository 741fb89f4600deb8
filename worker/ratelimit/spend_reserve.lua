-- The spend budget of one sweep (KEYS[1], a hash): `spent` and `reserved`, integer nano-USD.
-- ARGV: 1 amount to reserve, 2 the cap, 3 idle expiry ms. Reserves only if spent + reserved +
-- amount stays within the cap; otherwise takes nothing. Returns {granted 0|1, spent, reserved}.
local budget = KEYS[1]
local amount = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local spent = tonumber(redis.call("HGET", budget, "spent") or 0)
local reserved = tonumber(redis.call("HGET", budget, "reserved") or 0)
if spent + reserved + amount > cap then
  return {0, spent, reserved}
end
reserved = redis.call("HINCRBY", budget, "reserved", amount)
redis.call("PEXPIRE", budget, tonumber(ARGV[3]))
return {1, spent, reserved}
