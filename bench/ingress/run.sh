#!/usr/bin/env bash
# Ingress benchmark: imagebot's /webhooks/github (signature check, JSON parse, routing, delivery
# + build rows in SQLite, no worker) next to a bare Starlette endpoint, in one run, same server
# settings (one uvicorn process each, --no-access-log). Prints a Markdown table with req/s and
# p50/p99 for both and the ratio. Only loopback is targeted; every wrk run is bounded in time.
#   usage: bench/ingress/run.sh [--connections 16] [--duration 20] [--threads 2]
set -euo pipefail
cd "$(dirname "$0")/../.."
connections=16 duration=20 threads=2
while [ $# -gt 0 ]; do
  case "$1" in
    --connections) connections=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    *) echo "usage: $0 [--connections N] [--duration S] [--threads N]" >&2; exit 2 ;;
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
import hashlib, hmac, sys
print(hmac.new(b'$secret', open('$work/body.json','rb').read(), hashlib.sha256).hexdigest())")"
port_bot=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
port_bare=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

wait_up() {  # poll until the port answers, at most 30 s
  for _ in $(seq 300); do
    curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.1
  done
  echo "server on port $1 did not start" >&2; exit 1
}

(cd "$work" && IMAGEBOT_DATABASE_URL="sqlite:///$work/bench.db" IMAGEBOT_GITHUB_WEBHOOK_SECRET=$secret \
  exec "$OLDPWD/.venv/bin/imagebot" serve --no-worker --port "$port_bot" --log-level warning) \
  >"$work/bot.log" 2>&1 & pids+=($!)
.venv/bin/uvicorn --app-dir bench/ingress bare_app:app --port "$port_bare" --log-level warning \
  --no-access-log >"$work/bare.log" 2>&1 & pids+=($!)
wait_up "$port_bot"; wait_up "$port_bare"

run() {  # name port -> RESULT line
  BODY_FILE="$work/body.json" SIGNATURE="$signature" wrk -t"$threads" -c"$connections" \
    -d"${duration}s" --timeout 5s -s bench/ingress/deliveries.lua "http://127.0.0.1:$2" \
    | grep '^RESULT' | sed "s/^RESULT/$1/"
}
# warm both up, then measure
BODY_FILE="$work/body.json" SIGNATURE="$signature" wrk -t1 -c4 -d2s -s bench/ingress/deliveries.lua "http://127.0.0.1:$port_bot" >/dev/null
BODY_FILE="$work/body.json" SIGNATURE="$signature" wrk -t1 -c4 -d2s -s bench/ingress/deliveries.lua "http://127.0.0.1:$port_bare" >/dev/null
bare=$(run bare "$port_bare")
bot=$(run imagebot "$port_bot")
rows=$(sqlite3 "$work/bench.db" 'select count(*) from deliveries' 2>/dev/null || \
  .venv/bin/python -c "import sqlite3; print(sqlite3.connect('$work/bench.db').execute('select count(*) from deliveries').fetchone()[0])")

.venv/bin/python - "$bare" "$bot" "$rows" "$connections" "$duration" <<'PY'
import sys
def parse(line):
    name, *pairs = line.split()
    return name, {k: float(v) for k, v in (p.split("=") for p in pairs)}
(_, bare), (_, bot) = parse(sys.argv[1]), parse(sys.argv[2])
rows, conns, dur = sys.argv[3], sys.argv[4], sys.argv[5]
print(f"| endpoint | req/s | p50 ms | p99 ms | errors |  ({conns} connections, {dur}s, SQLite)")
print("| --- | ---: | ---: | ---: | ---: |")
for name, r in (("bare Starlette", bare), ("imagebot /webhooks/github", bot)):
    print(f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']:.0f} |")
ratio = bot["rps"] / bare["rps"]
print(f"\nratio imagebot/bare: {ratio:.2f} (target >= 0.5); imagebot p99 {bot['p99_ms']:.1f} ms "
      f"(target < 50 ms); deliveries stored: {rows} (wrk counted {bot['requests']:.0f} incl. warm-up excluded)")
PY
