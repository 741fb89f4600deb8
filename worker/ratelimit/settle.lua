-- ARGV[9]: actual minus reserved tokens, charged to or refunded from the token schedule.
-- A refund reaching back before now is harmless: reserve() never schedules before now.
local extra = tonumber(ARGV[9])
if not tpm then
  return 0
end
store("tok_tat", math.max(stored("tok_tat"), now) + extra * interval_us(tpm))
keep_alive()
return 0
