#!/bin/sh
# Runs keygate with `server.shards` set, for run.sh's KEYGATE_BIN_B: the config run.sh
# gives (`serve --config PATH`) plus `shards = N` under [server] (the shared runtime then
# has one thread, keygate's default with shards).
# Usage: KEYGATE_BIN_B=benches/load/with-shards.sh [SHARDS=2] [SHARDED_BIN=...] run.sh 8 2
set -eu
config=$3
sed -e "/^\[server\]/a shards = ${SHARDS:-2}" "$config" > "$config.sharded.toml"
exec "${SHARDED_BIN:-${KEYGATE_BIN:-target/release/keygate}}" serve --config "$config.sharded.toml"
