-- ARGV: 1 spent according to the database (nano-USD), 2 idle expiry ms. Called when a sweep is
-- (re)started: `spent` is raised to what the database knows (a Redis that lost the budget must not
-- forget money already spent), never lowered. Returns {spent, reserved}.
local budget = KEYS[1]
local spent = tonumber(redis.call("HGET", budget, "spent") or 0)
local known = tonumber(ARGV[1])
if known > spent then
  redis.call("HSET", budget, "spent", string.format("%.0f", known))
  spent = known
end
redis.call("PEXPIRE", budget, tonumber(ARGV[2]))
return {spent, tonumber(redis.call("HGET", budget, "reserved") or 0)}
