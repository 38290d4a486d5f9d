-- Granted handshakes from new devices: every request names a new clientUuid.
-- Arguments (after `--` on wrk's command line): the first keeps the names of
-- several wrk processes started in the same second apart; the third, N > 0,
-- spreads the requests over N items: request n names the code
-- 216998-I<n mod N> (each of the licenses I000 ... of run.py holds one item,
-- and its default code draws on it); else every request names 216998-BENCH.
local counter = 0
local thread_id = 0
local prefix = "0"
local items = 0
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  thread_id = tid
  prefix = args[1] or "0"
  items = tonumber(args[3]) or 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local code, kind = "216998-BENCH", "bench"
  if items > 0 then
    code, kind = string.format("216998-I%03d", (counter * 7 + thread_id) % items), "items"
  end
  local body = string.format(
    '{"handshakeCode":"%s","clientUuid":"%s-%s-%d-%d-%d","product":"barcode-reader","deploymentType":"browser"}',
    code, kind, prefix, os.time(), thread_id, counter)
  return wrk.format(nil, "/api/v1/handshake", nil, body)
end

function done(summary, latency, requests)
  io.write(string.format("LATENCY p50=%.3f p99=%.3f\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
  io.write(string.format("STATUS non2xx=%d errors=%d\n", summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
