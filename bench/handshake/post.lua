-- The same request shape against the bare endpoint.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"handshakeCode":"216998-BENCH","clientUuid":"bench-0-0-0","product":"barcode-reader","deploymentType":"browser"}'

function done(summary, latency, requests)
  io.write(string.format("LATENCY p50=%.3f p99=%.3f\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
  io.write(string.format("STATUS non2xx=%d errors=%d\n", summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
