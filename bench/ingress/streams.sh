#!/usr/bin/env bash
# Ingress with live streams open: the webhook benchmark of run.sh (signed GitHub pushes under
# wrk, SQLite, no worker) first with no stream open, then with IDLE streams of a build that does
# nothing and BUSY /api/events?logs=1 streams (every delivery moves two builds: each busy stream
# is sent their states) held open by bench/ingress/streams.py, then with none again (the
# database grows during the run: the two runs without streams bound the drift). Prints a
# Markdown table of req/s and p50/p99 for the three. Only loopback is targeted; every run is bounded in time.
#   usage: bench/ingress/streams.sh [--idle 200] [--busy 20] [--connections 16] [--duration 20]
set -euo pipefail
cd "$(dirname "$0")/../.."
idle=200 busy=20 connections=16 duration=20 threads=2
while [ $# -gt 0 ]; do
  case "$1" in
    --idle) idle=$2; shift 2 ;;
    --busy) busy=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    *) echo "usage: $0 [--idle N] [--busy N] [--connections N] [--duration S]" >&2; exit 2 ;;
  esac
done
scripts/bootstrap
scripts/infra up wrk

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

secret=bench-secret
cp tests/data/webhooks/github/push.payload.4.json "$work/body.json"
signature="sha256=$(.venv/bin/python -c "
import hashlib, hmac
print(hmac.new(b'$secret', open('$work/body.json','rb').read(), hashlib.sha256).hexdigest())")"
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"

(cd "$work" && IMAGEBOT_DATABASE_URL="sqlite:///$work/bench.db" IMAGEBOT_GITHUB_WEBHOOK_SECRET=$secret \
  IMAGEBOT_STREAM_MAX=$((idle + busy + 16)) IMAGEBOT_STREAM_MAX_PER_CLIENT=$((idle + busy + 16)) \
  exec "$OLDPWD/.venv/bin/imagebot" serve --no-worker --port "$port" --log-level warning) \
  >"$work/bot.log" 2>&1 & pids+=($!)
for _ in $(seq 300); do curl -s -o /dev/null "$url/healthz" && break; sleep 0.1; done

deliver() { BODY_FILE="$work/body.json" SIGNATURE="$signature" wrk "$@" -s bench/ingress/deliveries.lua "$url"; }
run() {  # name -> RESULT line
  deliver -t"$threads" -c"$connections" -d"${duration}s" --timeout 5s | grep '^RESULT' | sed "s/^RESULT/$1/"
}
deliver -t1 -c4 -d2s >/dev/null  # warm up; the first build is the idle streams' build
quiet=$(run "no streams")

.venv/bin/python bench/ingress/streams.py "$url" --build 1 --idle "$idle" --busy "$busy" \
  --seconds $((duration * 3)) >"$work/streams.out" 2>&1 & streams=$!; pids+=($streams)
for _ in $(seq 600); do grep -q '^OPEN' "$work/streams.out" && break; sleep 0.1; done
opened=$(grep '^OPEN' "$work/streams.out" || echo "OPEN ? (streams.py did not report)")
loaded=$(run "with streams")
kill -TERM "$streams"; wait "$streams" || true
messages=$(grep '^MESSAGES' "$work/streams.out" || echo "MESSAGES ?")
after=$(run "no streams again")  # the database has grown meanwhile: this bounds the drift

.venv/bin/python - "$quiet" "$loaded" "$opened" "$messages" "$connections" "$duration" "$idle" "$busy" "$after" <<'PY'
import sys
def parse(line):  # "<name words> key=value ..."
    return {k: float(v) for k, v in (p.split("=") for p in line.split() if "=" in p)}
quiet, loaded, after = parse(sys.argv[1]), parse(sys.argv[2]), parse(sys.argv[9])
conns, dur, idle, busy = sys.argv[5:9]
print(f"| webhook ingress | req/s | p50 ms | p99 ms | errors |  ({conns} connections, {dur}s, SQLite)")
print("| --- | ---: | ---: | ---: | ---: |")
for name, r in (("no streams", quiet), (f"{idle} idle + {busy} busy streams", loaded), ("no streams, after", after)):
    print(f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']:.0f} |")
print(f"\n{sys.argv[3]}; {sys.argv[4]}")
PY
