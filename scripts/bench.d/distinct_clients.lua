-- One request from each of N distinct client addresses (X-Forwarded-For
-- from a trusted proxy; N is the script's argument), in order, then the
-- last address again until wrk is stopped. Use with one wrk thread.
local i, n = 0, 1
function init(args)
  n = tonumber(args[1])
end
request = function()
  local k = math.min(i, n - 1)
  i = i + 1
  local ip = string.format("10.%d.%d.%d", math.floor(k / 65536) % 256, math.floor(k / 256) % 256, k % 256)
  return wrk.format("GET", "/", { ["X-Forwarded-For"] = ip })
end
