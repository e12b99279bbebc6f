-- Every request from a different client address (X-Forwarded-For from a
-- trusted proxy), over 100 000 addresses, so per-client tables really fill.
math.randomseed(os.time())
request = function()
  local n = math.random(0, 99999)
  local ip = string.format("10.%d.%d.%d", math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256)
  return wrk.format("GET", "/", { ["X-Forwarded-For"] = ip })
end
