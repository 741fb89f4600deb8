-- ARGV[8]: cool-down in microseconds. Extends the cluster-wide pause, never shortens it.
local cool_until = now + tonumber(ARGV[8])
if cool_until > stored("cool_until") then
  store("cool_until", cool_until)
end
keep_alive()
return 0
