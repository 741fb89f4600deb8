-- ARGV[8..9]: the provider's request limit and remaining requests; ARGV[10..11]: the same for
-- tokens. "" = absent or unreadable.
local function learn(learnt_field, limit)
  if limit ~= "" then redis.call("HSET", budget, learnt_field, limit) end
end

-- Our schedule would admit up to one burst right now. If the provider has fewer units left (other
-- clients share the key), push the schedule later so that we admit only those; never earlier.
-- `remaining` is not a backlog to wait out: a provider with a sliding 60 s window reports about 0
-- left whenever we pace at exactly the limit.
local function catch_up(tat_field, limit, remaining)
  if not limit or remaining == "" then return end
  local target = now + burst_span_us(limit) - tonumber(remaining) * interval_us(limit)
  if target > stored(tat_field) then
    store(tat_field, target)
  end
end

learn("learnt_rpm", ARGV[8])
learn("learnt_tpm", ARGV[10])
rpm = limit_in_force(ARGV[3], "learnt_rpm", ARGV[5])
tpm = limit_in_force(ARGV[4], "learnt_tpm", ARGV[6])
catch_up("req_tat", rpm, ARGV[9])
catch_up("tok_tat", tpm, ARGV[11])
keep_alive()
return 0
