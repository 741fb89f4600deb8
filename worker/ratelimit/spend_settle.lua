-- ARGV: 1 the amount reserved before the call, 2 what it actually cost (nano-USD), 3 idle expiry
-- ms. Moves the reservation into `spent` at its actual cost. A reservation never goes below 0
-- (a budget reset between reserve and settle must not hand out money).
local budget = KEYS[1]
local reserved = tonumber(redis.call("HGET", budget, "reserved") or 0)
redis.call("HSET", budget, "reserved", string.format("%.0f", math.max(0, reserved - tonumber(ARGV[1]))))
local spent = redis.call("HINCRBY", budget, "spent", tonumber(ARGV[2]))
redis.call("PEXPIRE", budget, tonumber(ARGV[3]))
return spent
