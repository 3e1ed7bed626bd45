-- wrk script: POST print(1+1) to /v1/exec; prints latency percentiles and errors.
--   wrk -t2 -c64 -d30s --timeout 30s -s scripts/load-exec.lua http://127.0.0.1:8080/v1/exec
wrk.method = "POST"
wrk.body = '{"code": "print(1+1)"}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format("p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms\n",
    latency:percentile(50)/1000, latency:percentile(90)/1000, latency:percentile(99)/1000, latency.max/1000))
  io.write(string.format("requests %d, errors: connect %d read %d write %d status %d timeout %d\n",
    summary.requests, summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout))
end
