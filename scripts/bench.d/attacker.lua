-- One client hammering a limited path: measures the reject path.
request = function()
  return wrk.format("GET", "/limited", { ["X-Forwarded-For"] = "192.0.2.66" })
end
