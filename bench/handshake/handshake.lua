-- Granted handshakes from new devices: every request names a new clientUuid.
-- The script's argument (after `--` on wrk's command line) keeps the names of
-- several wrk processes started in the same second apart.
local counter = 0
local thread_id = 0
local prefix = "0"
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  thread_id = tid
  prefix = args[1] or "0"
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"handshakeCode":"216998-BENCH","clientUuid":"bench-%s-%d-%d-%d","product":"barcode-reader","deploymentType":"browser"}',
    prefix, os.time(), thread_id, counter)
  return wrk.format(nil, "/api/v1/handshake", nil, body)
end

function done(summary, latency, requests)
  io.write(string.format("LATENCY p50=%.3f p99=%.3f\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
  io.write(string.format("STATUS non2xx=%d errors=%d\n", summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
