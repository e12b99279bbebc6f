-- One client hammering a limited path: measures the reject path.
request = function()
  return wrk.format("GET", "/status/200", { ["X-Forwarded-For"] = "192.0.2.66" })
end
