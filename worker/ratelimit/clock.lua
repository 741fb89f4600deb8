-- Prepended to every rate-budget and in-flight script: `now` in integer microseconds, from ARGV[1]
-- (a test's own clock) or, when that is "", the Redis server's TIME (one clock for every host).
local now
if ARGV[1] ~= "" then
  now = tonumber(ARGV[1])
else
  local time = redis.call("TIME")
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
