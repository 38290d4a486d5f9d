-- Devices that already hold seats asking again: every request names one of
-- a fixed set of clientUuids (seated-0 ... seated-N-1, seated before the
-- rounds by run.py), cycling over them. Arguments (after `--`): the wrk
-- process's index, which offsets where its threads start, and N.
local counter = 0
local thread_id = 0
local devices = 5000
local start = 0
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  thread_id = tid
  devices = tonumber(args[2]) or 5000
  -- Threads (and wrk processes) start far apart, so they rarely ask for the same device at once.
  start = ((tonumber(args[1]) or 0) * 7 + thread_id) * 997
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"handshakeCode":"216998-BENCH","clientUuid":"seated-%d","product":"barcode-reader","deploymentType":"browser"}',
    (start + counter) % devices)
  return wrk.format(nil, "/api/v1/handshake", nil, body)
end

function done(summary, latency, requests)
  io.write(string.format("LATENCY p50=%.3f p99=%.3f\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
  io.write(string.format("STATUS non2xx=%d errors=%d\n", summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
