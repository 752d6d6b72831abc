#!/usr/bin/env bash
# Profiles keygate (release build, Redis-shared quotas) under callgrind over a fixed number
# of proxied requests: the nginx stand-in upstream and a Redis on loopback, wrk stopping
# after N responses (post-n.lua). Prints the top inclusive and exclusive costs and leaves
# the callgrind file for callgrind_annotate / kcachegrind.
#
# Usage: benches/load/profile.sh [requests] [connections]   (defaults: 20000, 16)
# Env:   KEYGATE_BIN, PORT_BASE (default 28180), OUT (the callgrind file)
#        PROFILER=perf  sample wall-clock CPU instead (perf record -e cpu-clock; for
#                       machines without hardware counters), report in $OUT.perf.txt
#        PERF_CALL_GRAPH=dwarf  call stacks that see through the release build's missing
#                       frame pointers (default fp), PERF_FREQ samples/s (default 2000)
#        LOCAL_SLICES=1 store.local_slices on; SHARDS=N server.shards = N
#        UPSTREAM_H2=1 keygate speaks HTTP/2 (h2c) to the upstream stand-in, on its port + 30
#        VALGRIND_EXTRA more callgrind options, e.g. "--separate-callers12=FUNCTION" to see
#                      the call chains into one function
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
n=${1:-20000}; conns=${2:-16}
base=${PORT_BASE:-28180}
up=$base; kg=$((base + 3)); kg_admin=$((base + 4)); redis_port=$((base + 21))
bin=${KEYGATE_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release/keygate}
out=${OUT:-/tmp/keygate.callgrind}
work=$(mktemp -d /tmp/keygate-profile.XXXX)
# shellcheck source=benches/load/common.sh
. "$here/common.sh"
cleanup() {
  stop_pidfiles "$work"
  wait 2>/dev/null || true
}
trap cleanup EXIT

redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --pidfile "$work/redis.pid" --logfile "$work/redis.log"
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$redis_port" ping >/dev/null || { echo "redis on $redis_port did not start" >&2; exit 1; }
sed -e "s#PREFIX#$work#g" -e "s#UPPORT#$up#g" "$here/upstream.conf" > "$work/upstream.conf"
if [ -n "${UPSTREAM_H2:-}" ]; then add_h2c_listener "$work/upstream.conf" "$up"; fi
nginx -c "$work/upstream.conf" -p "$work" -e "$work/upstream.err"
sed -e "s#LISTENPORT#$kg#" -e "s#ADMINPORT#$kg_admin#" -e "s#UPPORT#$up#" -e "s#STOREURL#redis://127.0.0.1:$redis_port#" \
  -e "s#STORETIMEOUT#5s#" -e "s#USAGELOG#$work/usage.log#" "$here/keygate.toml" > "$work/keygate.toml"
if [ -n "${LOCAL_SLICES:-}" ]; then sed -i "s#^\[store\]#[store]\nlocal_slices = true#" "$work/keygate.toml"; fi
if [ -n "${SHARDS:-}" ]; then sed -i "/^\[server\]/a shards = $SHARDS" "$work/keygate.toml"; fi
if [ -n "${UPSTREAM_H2:-}" ]; then use_upstream_http2 "$work/keygate.toml" "$up"; fi
if [ "${PROFILER:-callgrind}" = perf ]; then
  profiler=(perf record -e cpu-clock -F "${PERF_FREQ:-2000}" --call-graph "${PERF_CALL_GRAPH:-fp}" -o "$out.perf")
else
  profiler=(valgrind --tool=callgrind --callgrind-out-file="$out" --dump-instr=no ${VALGRIND_EXTRA:-})
fi
BENCH_UPSTREAM_KEY=sk-upstream-REAL-0123456789 KEYGATE_LOG=warn \
  "${profiler[@]}" "$bin" serve --config "$work/keygate.toml" > "$work/keygate.out" 2>&1 &
echo $! > "$work/keygate.pid"
for _ in $(seq 600); do
  curl -fsS "http://127.0.0.1:$kg_admin/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
# wrk's thread:stop() does not always end wrk: stop it once the usage log shows n requests.
WRK_AUTH="Bearer kg_team_alpha_secret_token_0001" N=$n \
  wrk -t1 -c"$conns" -d600s -s "$here/post-n.lua" "http://127.0.0.1:$kg/v1/text-to-image" > "$work/wrk.out" &
wrk_pid=$!
while kill -0 "$wrk_pid" 2>/dev/null && [ "$(wc -l < "$work/usage.log" 2>/dev/null || echo 0)" -lt "$n" ]; do
  sleep 0.5
done
kill "$wrk_pid" 2>/dev/null || true
wait "$wrk_pid" 2>/dev/null || true
kill -INT "$(cat "$work/keygate.pid")"
for _ in $(seq 100); do kill -0 "$(cat "$work/keygate.pid")" 2>/dev/null || break; sleep 0.2; done
rm -f "$work/keygate.pid"
# Counted after the exit: under valgrind the usage-log writer lags far behind the requests,
# and only the final count says how many requests the profile covers.
served=$(wc -l < "$work/usage.log")
proxied=$(grep -c '"status":200,' "$work/usage.log" || true)
echo "# requests served (usage log lines after exit): $served, answered 200: $proxied"
# A profile of refusals (a Redis that was not ready under valgrind, say) is not a profile
# of the proxy path: say so instead of printing misleading numbers.
if [ $((proxied * 100)) -lt $((served * 99)) ]; then
  echo "# NOT a profile of proxied requests; statuses:" >&2
  grep -o '"status":[0-9]*' "$work/usage.log" | sort | uniq -c >&2
  grep -o '"outcome":"[a-z_]*"' "$work/usage.log" | sort | uniq -c >&2
  exit 1
fi
if [ "${PROFILER:-callgrind}" = perf ]; then
  perf report -i "$out.perf" --no-children --sort dso,symbol --stdio 2>/dev/null | grep -v '^$' | head -60 > "$out.perf.txt"
  perf report -i "$out.perf" --no-children --sort dso --stdio 2>/dev/null | grep '%' | head -12 >> "$out.perf.txt"
  cat "$out.perf.txt"
else
  total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  echo "# instructions per request, start-up and shutdown included: $((total / served))"
  callgrind_annotate --inclusive=yes "$out" 2>/dev/null | head -70
  echo "# exclusive"
  callgrind_annotate "$out" 2>/dev/null | head -45
fi
