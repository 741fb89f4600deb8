-- ARGV[9]: tokens. Takes one request and the tokens only if both schedules and the cool-down
-- allow; otherwise takes nothing. Returns 0 (granted) or the microseconds to wait.
local tokens = tonumber(ARGV[9])
local req_tat = math.max(stored("req_tat"), now)
local tok_tat = math.max(stored("tok_tat"), now)

local wait = stored("cool_until") - now
if rpm then wait = math.max(wait, req_tat - tolerance_us("req", rpm) - now) end
if tpm then wait = math.max(wait, tok_tat - tolerance_us("tok", tpm) - now) end
if wait > 0 then
  return math.ceil(wait)
end

-- The cost is charged in full even beyond the tolerance, so a request bigger than the burst
-- still gets through and later ones wait for it.
if rpm then store("req_tat", req_tat + interval_us(rpm)) end
if tpm then store("tok_tat", tok_tat + tokens * interval_us(tpm)) end
keep_alive()
return 0
