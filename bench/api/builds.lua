-- GET /api/builds?repo=org<N>/app&limit=50, N random over REPOS repositories (from the
-- environment), so no single page stays hot; non-200 answers are reported on stderr.
local repos = tonumber(os.getenv("REPOS") or "200")

function request()
  return wrk.format("GET", string.format("/api/builds?repo=org%d%%2Fapp&limit=50", math.random(0, repos - 1)))
end

function response(status)
  if status ~= 200 then io.stderr:write("unexpected status " .. status .. "\n") end
end

function done(summary, latency)
  local e = summary.errors
  io.write(string.format("RESULT rps=%.1f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, e.connect + e.read + e.write + e.status + e.timeout))
end
