#!/usr/bin/env bash
# Read API benchmark: GET /api/builds?repo=…&limit=50 against `imagebot serve --no-worker` on a
# SQLite database with 100k builds and 1M telemetry events (bench/api/seed.py), under wrk at
# several connection counts, one repo after another. Prints a Markdown table with req/s and
# p50/p90/p99/max per connection count, then single-request timings of the other read
# endpoints on the same data. Loopback only; every wrk run is bounded in time.
#   usage: bench/api/run.sh [--duration 15] [--threads 2] [--connections "1 4 16"] [--builds 100000] [--events 1000000]
set -euo pipefail
cd "$(dirname "$0")/../.."
duration=15 threads=2 connections="1 4 16" builds=100000 events=1000000 repos=200
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --builds) builds=$2; shift 2 ;;
    --events) events=$2; shift 2 ;;
    *) echo "usage: $0 [--duration S] [--threads N] [--connections \"N ...\"] [--builds N] [--events N]" >&2; exit 2 ;;
  esac
done
scripts/bootstrap
scripts/infra up wrk

work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

PYTHONPATH=. .venv/bin/python bench/api/seed.py "$work/bench.db" --builds "$builds" --events "$events" --repos "$repos"
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
(cd "$work" && IMAGEBOT_DATABASE_URL="sqlite:///$work/bench.db" \
  exec "$OLDPWD/.venv/bin/imagebot" serve --no-worker --port "$port" --log-level warning) >"$work/bot.log" 2>&1 &
pid=$!
for _ in $(seq 300); do curl -sf -o /dev/null "http://127.0.0.1:$port/healthz" && break; sleep 0.1; done
curl -sf -o /dev/null "http://127.0.0.1:$port/healthz" || { cat "$work/bot.log" >&2; echo "server did not start" >&2; exit 1; }

url="http://127.0.0.1:$port"
REPOS=$repos wrk -t1 -c4 -d3s -s bench/api/builds.lua "$url" >/dev/null  # warm-up
echo "| connections | req/s | p50 ms | p90 ms | p99 ms | max ms | errors |  (GET /api/builds?repo=…&limit=50, ${builds} builds, ${events} events, SQLite, ${duration}s each)"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for c in $connections; do
  t=$(( c < threads ? c : threads ))
  line=$(REPOS=$repos wrk -t"$t" -c"$c" -d"${duration}s" --timeout 5s -s bench/api/builds.lua "$url" | grep '^RESULT')
  .venv/bin/python - "$c" "$line" <<'PY'
import sys
r = {k: float(v) for k, v in (p.split("=") for p in sys.argv[2].split()[1:])}
print(f"| {sys.argv[1]} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | {r['errors']:.0f} |")
PY
done

echo
echo "single requests (median of 20, ms):"
.venv/bin/python - "$url" <<'PY'
import statistics, sys, time
import httpx
url = sys.argv[1]
paths = ["/api/builds?limit=50", "/api/builds?repo=org7%2Fapp&status=failed&limit=50", "/api/builds/50000",
         "/api/builds/50000/events", "/api/repos", "/", "/builds/50000", "/metrics"]
with httpx.Client(base_url=url, timeout=30) as client:
    for path in paths:
        times = []
        for _ in range(20):
            start = time.perf_counter()
            assert client.get(path).status_code == 200, path
            times.append((time.perf_counter() - start) * 1000)
        print(f"  {path:55} {statistics.median(times):7.2f}")
PY
