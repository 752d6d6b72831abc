#!/usr/bin/env bash
# keygate's load bench: keygate (release build, Redis-shared quotas) against the nginx peers
# of the shared harness, in the same run on the same machine, in alternating rounds; then
# 5000 requests in flight to a 2-second upstream through keygate and through nginx-swap.
# Prints per-round rps/p50/p99, CPU time per request of each target (and of its Redis), the
# ratios, Redis commands per admitted request and the
# peak RSS. Everything listens on loopback and stops when the script ends.
#
# Usage: benches/load/run.sh [seconds] [rounds]      (defaults: 8 s, 2 rounds)
# Env:   KEYGATE_BIN   the binary (default: $CARGO_TARGET_DIR/release/keygate, built if missing)
#        KEYGATE_BIN_B another keygate binary (e.g. main's, before a change) loaded in the
#                      same rounds as "keygate-b": a before/after comparison from one run
#        INFLIGHT      connections for the in-flight test (default 5000; 0 skips it)
#        PORT_BASE     first of the ports used (default 28080; the shared harness uses 18xxx)
#        STORE_TIMEOUT keygate's store.timeout (default 250ms; keygate's own default is 50ms)
#        UPSTREAM_TLS=1 the upstream stand-ins (fast and slow) speak HTTPS (a CA made here with
#                      openssl) to keygate and to the nginx peers alike, as a real upstream
#                      does; "direct" is then HTTPS too
#        STORE=cluster keygate's quotas on a Redis Cluster of three masters (redis+cluster://)
#                      instead of one Redis; Redis CPU and commands are summed over the three
#        LOCAL_SLICES=1 keygate (not keygate-b) takes local slices of quota ahead of its
#                      requests (store.local_slices); with KEYGATE_BIN_B set to the same
#                      binary, a run compares slices against call-per-decision;
#                      LOCAL_SLICES=both gives them to keygate-b too (e.g. with shards)
#        UPSTREAM_H2=1 keygate (not keygate-b) speaks HTTP/2 to the upstream stand-ins
#                      (upstream.protocol = "http2": h2c on their port + 30, or h2 by ALPN
#                      with UPSTREAM_TLS); UPSTREAM_H2=both gives it to keygate-b too. The
#                      nginx peers keep HTTP/1.1 (nginx proxies to upstreams over nothing else)
#        HAPROXY=0     leaves out the harness's HAProxy peer (haproxy-rl: key swap and per-team
#                      rolling-minute limits in a stick table, per instance, not shared)
# Needs: nginx libnginx-mod-http-lua lua-nginx-redis haproxy wrk redis-server (Debian packages).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
secs=${1:-8}; rounds=${2:-2}
conns=64
inflight=${INFLIGHT:-5000}
base=${PORT_BASE:-28080}
up=$base; swap=$((base + 1)); lua=$((base + 2)); kg=$((base + 3)); kg_admin=$((base + 4))
kg_b=$((base + 5)); kg_b_admin=$((base + 6)); haproxy_port=$((base + 7))
slow=$((base + 10)); swap_slow=$((base + 11)); kg_slow=$((base + 13)); kg_slow_admin=$((base + 14))
redis_lua=$((base + 20)); redis_kg=$((base + 21))
# keygate's Redis: one server, or the three masters of a cluster.
kg_redis_ports=$redis_kg
if [ "${STORE:-redis}" = cluster ]; then kg_redis_ports="$redis_kg $((base + 22)) $((base + 23))"; fi
bin=${KEYGATE_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release/keygate}
if [ ! -x "$bin" ]; then (cd "$repo" && cargo build --release --bin keygate); fi

work=$(mktemp -d /tmp/keygate-load.XXXX)
pids=()
# shellcheck source=benches/load/common.sh
. "$here/common.sh"
cleanup() {
  stop_pidfiles "$work"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

redis_up() { # port [more redis-server arguments]
  local port=$1; shift
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$work/redis-$port.pid" --logfile "$work/redis-$port.log" "$@"
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "redis on $port did not start" >&2; exit 1
}
# keygate's store: one Redis, or three cluster masters joined (cluster bus on port + 100).
kg_store_up() {
  if [ "${STORE:-redis}" != cluster ]; then
    redis_up "$redis_kg"; store_url="redis://127.0.0.1:$redis_kg"; return
  fi
  local p nodes=()
  for p in $kg_redis_ports; do
    redis_up "$p" --cluster-enabled yes --cluster-config-file "$work/nodes-$p.conf" \
      --cluster-port $((p + 100)) --cluster-node-timeout 5000
    nodes+=("127.0.0.1:$p")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
  for p in $kg_redis_ports; do
    for _ in $(seq 100); do
      redis-cli -p "$p" CLUSTER INFO | grep -q 'cluster_state:ok' && continue 2; sleep 0.1
    done
    echo "the cluster never reported ok on $p" >&2; exit 1
  done
  store_url="redis+cluster://$(IFS=,; echo "${nodes[*]}")"
}
# A command to each of keygate's Redis servers.
kg_redis() { local p; for p in $kg_redis_ports; do redis-cli -p "$p" "$@"; done; }
nginx_up() { # conf
  sed -e "s#PREFIX#$work#g" -e "s#REDISPORT#$redis_lua#g" -e "s#SWAPSLOWPORT#$swap_slow#g" \
    -e "s#UPPORT#$up#g" -e "s#SWAPPORT#$swap#g" -e "s#LUAPORT#$lua#g" -e "s#SLOWPORT#$slow#g" \
    -e "s#SLOWSECS#2#g" "$here/$1.conf" > "$work/$1.conf"
  if [ -n "${UPSTREAM_TLS:-}" ]; then
    case $1 in
      upstream | upstream-slow) sed -i -e "s#listen \(127.0.0.1:[0-9]*\) #listen \1 ssl #" \
        -e "s#^http {#http {\n  ssl_certificate $work/upstream.pem; ssl_certificate_key $work/upstream.key;#" \
        "$work/$1.conf" ;;
      *) sed -i "s#proxy_pass http://imagen#proxy_pass https://imagen#" "$work/$1.conf" ;;
    esac
  fi
  if [ -n "${UPSTREAM_H2:-}" ]; then
    case $1 in
      upstream | upstream-slow) if [ -n "${UPSTREAM_TLS:-}" ]; then
          sed -i "s#listen \(127.0.0.1:[0-9]*\) ssl #listen \1 ssl http2 #" "$work/$1.conf"
        else # h2c needs a port of its own on nginx 1.22: prior knowledge only
          local port=$up; [ "$1" = upstream-slow ] && port=$slow
          add_h2c_listener "$work/$1.conf" "$port"
        fi ;;
    esac
  fi
  nginx -c "$work/$1.conf" -p "$work" -e "$work/$1.err"
}
haproxy_up() {
  cp "$here/tokens.map" "$work/tokens.map"
  sed -e "s#PREFIX#$work#g" -e "s#HAPROXYPORT#$haproxy_port#" -e "s#UPPORT#$up#" \
    "$here/haproxy-ratelimit.cfg" > "$work/haproxy.cfg"
  if [ -n "${UPSTREAM_TLS:-}" ]; then
    sed -i "s#\(server up1 .*\)#\1 ssl ca-file $work/ca.pem verifyhost localhost#" "$work/haproxy.cfg"
  fi
  haproxy -q -f "$work/haproxy.cfg"
}
# A CA and a certificate for localhost / 127.0.0.1 signed by it, for UPSTREAM_TLS.
make_upstream_cert() {
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/ca.key" -out "$work/ca.pem" -days 2 \
    -subj "/CN=keygate bench CA" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout "$work/upstream.key" -out "$work/upstream.csr" \
    -subj "/CN=localhost" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > "$work/upstream.ext"
  openssl x509 -req -in "$work/upstream.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
    -out "$work/upstream.pem" -days 2 -extfile "$work/upstream.ext" 2>/dev/null
}
keygate_up() { # name listen admin upstream_port [binary]
  sed -e "s#LISTENPORT#$2#" -e "s#ADMINPORT#$3#" -e "s#UPPORT#$4#" -e "s#STOREURL#$store_url#" \
    -e "s#STORETIMEOUT#${STORE_TIMEOUT:-250ms}#" -e "s#USAGELOG#$work/$1-usage.log#" "$here/keygate.toml" > "$work/$1.toml"
  if [ "${LOCAL_SLICES:-}" = both ] || { [ -n "${LOCAL_SLICES:-}" ] && [ "$1" = "${1#keygate-b}" ]; }; then
    sed -i "s#^\[store\]#[store]\nlocal_slices = true#" "$work/$1.toml"
  fi
  if [ -n "${UPSTREAM_TLS:-}" ]; then
    sed -i "s#^url = \"http://127.0.0.1:$4\"#url = \"https://localhost:$4\"\nca_file = \"$work/ca.pem\"#" "$work/$1.toml"
  fi
  if [ "${UPSTREAM_H2:-}" = both ] || { [ -n "${UPSTREAM_H2:-}" ] && [ "$1" = "${1#keygate-b}" ]; }; then
    use_upstream_http2 "$work/$1.toml" "$4"
  fi
  # The allocator settings of deploy/systemd and deploy/docker.
  BENCH_UPSTREAM_KEY=sk-upstream-REAL-0123456789 KEYGATE_LOG=warn \
    MIMALLOC_ARENA_EAGER_COMMIT=0 \
    "${5:-$bin}" serve --config "$work/$1.toml" > "$work/$1.out" 2>&1 &
  echo $! > "$work/$1.pid"
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$3/readyz" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "keygate $1 did not become ready:" >&2; cat "$work/$1.out" >&2; exit 1
}
hwm_kb() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# CPU time (user + system, clock ticks, all threads) of some processes so far.
cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$t"; }
# The system part of it alone.
sys_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$t"; }
# System calls, context switches and page faults of the serving processes, when perf may count them.
if perf stat -e raw_syscalls:sys_enter,context-switches,page-faults -- true >/dev/null 2>&1; then count_kernel=1; else count_kernel=; fi
# The processes that serve a target (its Redis apart): what its CPU per request counts.
serving_pids() { # name
  case $1 in
    direct) pgrep -P "$(cat "$work/upstream.pid")" ;;
    nginx-swap) pgrep -P "$(cat "$work/swap.pid")" ;;
    nginx-lua-redis) pgrep -P "$(cat "$work/lua.pid")" ;;
    haproxy-rl) cat "$work/haproxy.pid" ;;
    *) cat "$work/$1.pid" ;;
  esac
}
redis_pid() { # name
  case $1 in
    nginx-lua-redis) cat "$work/redis-$redis_lua.pid" ;;
    keygate*) for p in $kg_redis_ports; do cat "$work/redis-$p.pid"; done | xargs ;;
  esac
}

redis_up "$redis_lua"; kg_store_up
if [ -n "${UPSTREAM_TLS:-}" ]; then make_upstream_cert; fi
for c in upstream nginx-swap nginx-lua-redis; do nginx_up "$c"; done
keygate_up keygate "$kg" "$kg_admin" "$up"
targets="direct:$up nginx-swap:$swap nginx-lua-redis:$lua"
if [ "${HAPROXY:-1}" != 0 ]; then haproxy_up; targets="$targets haproxy-rl:$haproxy_port"; fi
targets="$targets keygate:$kg"
if [ -n "${KEYGATE_BIN_B:-}" ]; then
  keygate_up keygate-b "$kg_b" "$kg_b_admin" "$up" "$KEYGATE_BIN_B"
  targets="$targets keygate-b:$kg_b"
fi
alpha="Bearer kg_team_alpha_secret_token_0001"
for t in $targets; do
  port=${t##*:}; [ "${t%%:*}" = direct ] && continue
  curl -fsS -X POST -H "Authorization: $alpha" "http://127.0.0.1:$port/v1/text-to-image" >/dev/null
done

echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# wrk -t1 -c$conns -d${secs}s, POST text-to-image (post.lua), $rounds rounds alternating${UPSTREAM_TLS:+, HTTPS upstream}${UPSTREAM_H2:+, keygate to the upstream over HTTP/2 ($UPSTREAM_H2)}"
declare -A sum_rps
results="$work/results"
for r in $(seq 1 "$rounds"); do
  for t in $targets; do
    name=${t%%:*}; port=${t##*:}
    auth=$alpha; [ "$name" = direct ] && auth="Bearer sk-upstream-REAL-0123456789"
    case $name in keygate*) kg_redis CONFIG RESETSTAT >/dev/null ;; esac
    pids=$(serving_pids "$name"); rpid=$(redis_pid "$name")
    # shellcheck disable=SC2086
    cpu0=$(cpu_ticks $pids); rcpu0=$(cpu_ticks $rpid); sys0=$(sys_ticks $pids)
    if [ -n "$count_kernel" ]; then
      # shellcheck disable=SC2086
      perf stat -x, -e raw_syscalls:sys_enter,context-switches,page-faults -p "$(echo $pids | tr ' ' ,)" \
        -o "$work/perf.txt" -- sleep "$secs" &
      perf_pid=$!
    fi
    url="http://127.0.0.1:$port/v1/text-to-image"
    if [ "$name" = direct ] && [ -n "${UPSTREAM_TLS:-}" ]; then url="https://localhost:$port/v1/text-to-image"; fi
    out=$(WRK_AUTH="$auth" wrk -t1 -c$conns -d"${secs}s" --latency -s "$here/post.lua" "$url")
    # shellcheck disable=SC2086
    cpu1=$(cpu_ticks $pids); rcpu1=$(cpu_ticks $rpid); sys1=$(sys_ticks $pids)
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    total=$(echo "$out" | awk '/requests in/ {print $1}')
    p50=$(echo "$out" | awk '$1=="50%" {print $2}'); p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $5}'); errs=$(echo "$out" | awk '/Socket errors/ {print $0}')
    # Ticks are 10 ms: over a round of tens of thousands of requests, ~1 us of resolution.
    extra=$(awk -v c=$((cpu1 - cpu0)) -v s=$((sys1 - sys0)) -v r=$((rcpu1 - rcpu0)) -v n="$total" -v hz="$(getconf CLK_TCK)" -v redis="$rpid" \
      'BEGIN {printf "cpu=%.1fus/req (sys %.1f)", c * 1e6 / hz / n, s * 1e6 / hz / n; if (redis != "") printf " +redis %.1fus/req", r * 1e6 / hz / n}')
    if [ -n "$count_kernel" ]; then
      wait "$perf_pid" || true
      # perf counted for the round's length, as wrk ran: per request of wrk's count.
      extra="$extra $(awk -F, -v n="$total" '$3 == "raw_syscalls:sys_enter" {s = $1} $3 == "context-switches" {c = $1}
        $3 == "page-faults" {f = $1}
        END {printf "syscalls=%.1f/req ctxsw=%.2f/req faults=%.2f/req", s / n, c / n, f / n}' "$work/perf.txt")"
    fi
    echo "$name cpu $(awk -v c=$((cpu1 - cpu0)) -v n="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN {print c * 1e6 / hz / n}')" >> "$work/cpu"
    if [ "$name" != "${name#keygate}" ]; then
      extra="$extra $(kg_redis INFO commandstats | tr -d '\r' | awk -F'[:=,]' -v n="$total" \
        '/^cmdstat_evalsha:/ {e += $3} /^cmdstat_/ && !/cmdstat_(info|config)/ {a += $3}
        END {printf "redis: %.3f EVALSHA/request, %.2f commands run/request (script calls included)", e/n, a/n}')"
    fi
    printf 'round %s %-16s rps=%-10s p50=%-8s p99=%-8s non2xx=%s %s %s\n' "$r" "$name" "$rps" "$p50" "$p99" \
      "${non2xx:-0}" "$errs" "$extra"
    echo "$name $rps $p99" >> "$results"
  done
done
echo "# ratios (mean rps over the rounds)"
awk '
  function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
  { rps[$1] += $2; n[$1]++; p = ms($3); if (p > p99[$1]) p99[$1] = p }
  END {
    for (t in rps) printf "%-16s mean rps %8.0f   worst p99 %6.2f ms\n", t, rps[t] / n[t], p99[t]
    k = rps["keygate"] / n["keygate"]
    printf "keygate / nginx-swap      = %.2f (goal >= 1.0)\n", k / (rps["nginx-swap"] / n["nginx-swap"])
    printf "keygate / nginx-lua-redis = %.2f (goal >= 2.5)\n", k / (rps["nginx-lua-redis"] / n["nginx-lua-redis"])
    if (n["haproxy-rl"]) printf "keygate / haproxy-rl      = %.2f (no goal: per-instance limits, not shared)\n", k / (rps["haproxy-rl"] / n["haproxy-rl"])
    printf "p99 keygate %.2f ms vs nginx-swap %.2f ms\n", p99["keygate"], p99["nginx-swap"]
    if (n["keygate-b"]) {
      b = rps["keygate-b"] / n["keygate-b"]
      printf "keygate-b / nginx-swap    = %.2f, keygate-b / nginx-lua-redis = %.2f, keygate / keygate-b = %.2f\n", b / (rps["nginx-swap"] / n["nginx-swap"]), b / (rps["nginx-lua-redis"] / n["nginx-lua-redis"]), k / b
    }
  }' "$results"
echo "# CPU per request of the serving processes (their Redis apart), mean over the rounds"
awk '$2 == "cpu" { c[$1] += $3; n[$1]++ } END { for (t in c) printf "%-16s %6.1f us/request\n", t, c[t] / n[t] }' "$work/cpu"
# Where a tail is: keygate's own latency per request (from reading the request to its last
# byte written, its usage log) against wrk's, which adds the time a request waited in the
# sockets before keygate read it and after keygate wrote it.
echo "# keygate's own latency over all its rounds (usage log latency_ms / upstream_latency_ms)"
for name in keygate keygate-b; do
  [ -f "$work/$name-usage.log" ] || continue
  grep -o '"latency_ms":[0-9.e-]*,"upstream_latency_ms":[0-9.e-]*' "$work/$name-usage.log" \
    | awk -F'[:,]' -v name="$name" '{ l[NR] = $2; u[NR] = $4 }
      END { if (NR == 0) exit; n = asort(l); asort(u)
        printf "%-16s p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms; upstream p50 %.2f ms, p99 %.2f ms (%d requests)\n", name,
          l[int(n * 0.5)], l[int(n * 0.99)], l[int(n * 0.999)], u[int(n * 0.5)], u[int(n * 0.99)], n }'
done
echo "# keygate peak RSS after the throughput rounds: $(( $(hwm_kb "$(cat "$work/keygate.pid")") / 1024 )) MB"

if [ "$inflight" -gt 0 ]; then
  nginx_up upstream-slow; nginx_up nginx-swap-slow
  keygate_up keygate-slow "$kg_slow" "$kg_slow_admin" "$slow"
  slow_targets="nginx-swap:$swap_slow keygate:$kg_slow"
  echo "$kg_slow_admin" > "$work/keygate-slow.admin"
  if [ -n "${KEYGATE_BIN_B:-}" ]; then
    keygate_up keygate-b-slow $((base + 15)) $((base + 16)) "$slow" "$KEYGATE_BIN_B"
    slow_targets="$slow_targets keygate-b:$((base + 15))"
    echo $((base + 16)) > "$work/keygate-b-slow.admin"
  fi
  echo "# in flight: wrk -t1 -c$inflight -d10s --timeout 10s, upstream answers after 2 s${UPSTREAM_TLS:+ over HTTPS} (fd hard limit $(ulimit -Hn))"
  for t in $slow_targets; do
    name=${t%%:*}; port=${t##*:}
    # Let the previous target's 5000 connections close (upstream and client side) first.
    sleep 5
    case $name in keygate*) kg_redis CONFIG RESETSTAT >/dev/null ;; esac
    out=$(WRK_AUTH="$alpha" wrk -t1 -c"$inflight" -d10s --timeout 10s --latency -s "$here/post.lua" \
      "http://127.0.0.1:$port/v1/text-to-image")
    total=$(echo "$out" | awk '/requests in/ {print $1}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $5}'); errs=$(echo "$out" | awk '/Socket errors/ {print $0}')
    if [ "$name" != "${name#keygate}" ]; then
      rss="$name VmHWM $(( $(hwm_kb "$(cat "$work/$name-slow.pid")") / 1024 )) MB"
      # What the refusals were, from keygate's usage log (written off the request path:
      # a line or two may still be on its way).
      refused=$(grep -v '"outcome":"forwarded"' "$work/$name-slow-usage.log" 2>/dev/null \
        | grep -o '"status":[0-9]*,.*"outcome":"[a-z_]*"' | sed -E 's/"status":([0-9]+),.*"outcome":"([a-z_]+)"/\1 \2/' \
        | sort | uniq -c | awk '{printf "%s%s %s x%s", (NR > 1 ? ", " : ""), $2, $3, $1}' || true)
      if [ -n "$refused" ]; then rss="$rss | refused: $refused"; fi
      # How long its decisions took (keygate_quota_decision_duration_seconds; binaries
      # from before that metric print nothing here).
      decided=$(curl -s "http://127.0.0.1:$(cat "$work/$name-slow.admin")/metrics" \
        | awk '/^keygate_quota_decision_duration_seconds_bucket/ {
            match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5); n[le] = $2; k++ }
          END { if (k == 0) exit; total = n["+Inf"]; if (total == 0) exit
            printf "decisions: %d, within 1 ms %.1f %%, 10 ms %.1f %%, 50 ms %.1f %%", total,
              100 * n["0.001"] / total, 100 * n["0.01"] / total, 100 * n["0.05"] / total }')
      if [ -n "$decided" ]; then rss="$rss | $decided"; fi
      # The decisions' script calls (this target alone shares keygate's Redis meanwhile).
      rss="$rss | $(kg_redis INFO commandstats | tr -d '\r' | awk -F'[:=,]' -v n="$total" \
        '/^cmdstat_evalsha:/ {c += $3; u += $5}
        END {if (c) printf "redis: %d EVALSHA (%.1f requests each), %.0f us each", c, n / c, u / c}')"
    else
      rss="nginx workers VmHWM:"
      for w in $(pgrep -P "$(cat "$work/swap-slow.pid")"); do rss="$rss $(( $(hwm_kb "$w") / 1024 )) MB"; done
    fi
    printf 'in-flight %-12s requests=%-6s p99=%-8s non2xx=%s %s | %s\n' "$name" "$total" "$p99" "${non2xx:-0}" \
      "${errs:-socket errors: none}" "$rss"
  done
fi
