-- Granted handshakes from new devices spread over 100 items: request n names
-- a new clientUuid and the code 216998-I<n mod 100> (each of the 100 licenses
-- I000 ... I099 of run.py holds one item, and its default code draws on it).
-- The script's argument keeps the names of several wrk processes apart.
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
    '{"handshakeCode":"216998-I%03d","clientUuid":"items-%s-%d-%d-%d","product":"barcode-reader","deploymentType":"browser"}',
    (counter * 7 + thread_id) % 100, prefix, os.time(), thread_id, counter)
  return wrk.format(nil, "/api/v1/handshake", nil, body)
end

function done(summary, latency, requests)
  io.write(string.format("LATENCY p50=%.3f p99=%.3f\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
  io.write(string.format("STATUS non2xx=%d errors=%d\n", summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
