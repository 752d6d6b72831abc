#!/usr/bin/env bash
# keygate's memory by phase (phases.py): N idle client connections, then N requests in
# flight to a 2-second upstream, then idle again, for a few rounds; the memory store, so
# that only the proxy's own memory is measured. The bench's 5000-in-flight test gives the
# peak alone; this says what an idle connection, a request in flight and an idle upstream
# connection each add, and whether rounds leave anything behind.
#
# Usage: benches/load/phases.sh [N] [ROUNDS]        (defaults: 5000, 3)
# Env:   KEYGATE_BIN (default: $CARGO_TARGET_DIR/release/keygate), PORT_BASE (default 28280)
#        WRAP        a command put before keygate (e.g. "heaptrack -o /tmp/kg"), the
#                    process measured being keygate's
#        UPSTREAM_H2=1 keygate speaks HTTP/2 (h2c) to the upstream stand-in, on its port + 30
#                    (upstream.protocol = "http2"; the stand-in takes 128 streams a connection)
# Needs: nginx libnginx-mod-http-lua (Debian packages), python3, ss.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
n=${1:-5000}; rounds=${2:-3}
base=${PORT_BASE:-28280}
kg=$((base + 3)); kg_admin=$((base + 4)); slow=$((base + 10))
bin=${KEYGATE_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release/keygate}
ulimit -n 20000
work=$(mktemp -d /tmp/keygate-phases.XXXX)
# shellcheck source=benches/load/common.sh
. "$here/common.sh"
trap 'stop_pidfiles "$work"; wait 2>/dev/null || true' EXIT
sed -e "s#PREFIX#$work#g" -e "s#SLOWPORT#$slow#g" -e "s#SLOWSECS#2#g" "$here/upstream-slow.conf" > "$work/slow.conf"
up=$slow   # the port keygate's upstream connections go to
if [ -n "${UPSTREAM_H2:-}" ]; then
  add_h2c_listener "$work/slow.conf" "$slow"
  up=$(h2c_port "$slow")
fi
nginx -c "$work/slow.conf" -p "$work" -e "$work/slow.err"
# The bench's config without its [store] table: the memory store.
sed -e "s#LISTENPORT#$kg#" -e "s#ADMINPORT#$kg_admin#" -e "s#UPPORT#$slow#" -e "s#USAGELOG#$work/usage.log#" \
  "$here/keygate.toml" | sed -e '/^\[store\]/,/^timeout/d' > "$work/keygate.toml"
if [ -n "${UPSTREAM_H2:-}" ]; then use_upstream_http2 "$work/keygate.toml" "$slow"; fi
# shellcheck disable=SC2086
BENCH_UPSTREAM_KEY=sk-upstream-REAL-0123456789 KEYGATE_LOG=warn MIMALLOC_ARENA_EAGER_COMMIT=0 \
  ${WRAP:-} "$bin" serve --config "$work/keygate.toml" > "$work/keygate.out" 2>&1 &
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$kg_admin/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
pid=$(pgrep -f "^$bin serve --config $work/keygate.toml" | head -1)
echo "$pid" > "$work/keygate.pid"
python3 "$here/phases.py" "$n" "$kg" "$pid" "$up" "$rounds"
