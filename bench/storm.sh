#!/usr/bin/env bash
# The reconnect storm of docs/performance.md: `reconnect` with 5,000 and 10,000 clients
# dropped at once, three runs each, also with a CPU-bound process beside the server (one
# `yes > /dev/null`, standing in for a slower box). At most 1,000 of the tool's reconnects are
# in their handshakes at once: its one thread cannot carry 10,000 TLS handshakes in parallel
# within the server's handshake timeouts (docs/performance.md). A fresh server and database per run.
# Results as JSON in $OUT. Usage: bench/storm.sh [out-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results-storm}
mkdir -p "$OUT"
cargo build --release --bins --features tools
ulimit -n 20000
DATA=$(mktemp -d)
SERVER_PID= HOG_PID= DB=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    [ -n "$HOG_PID" ] && kill "$HOG_PID" 2>/dev/null || true
    [ -n "$DB" ] && psql -X -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" postgres >/dev/null 2>&1 || true
    rm -rf "$DATA"
}
trap cleanup EXIT
run() { # clients, hog (0/1), run number
    local clients=$1 hog=$2 i=$3 name
    name="storm-$clients$([ "$hog" = 1 ] && echo -hog || true)-$i"
    DB=rookery_storm_$$_$i
    DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB" ROOKERY__DATA_DIR="$DATA" \
    ROOKERY__SERVER__BIND=127.0.0.1:18443 \
    RUST_LOG=warn target/release/rookery serve --config bench/server.toml >> "$OUT/server.log" 2>&1 &
    SERVER_PID=$!
    sleep 3
    if [ "$hog" = 1 ]; then yes > /dev/null & HOG_PID=$!; fi
    target/release/rookery-bench --url wss://127.0.0.1:18443/ws --insecure --server-pid "$SERVER_PID" \
        --json "$OUT/$name.json" reconnect --clients "$clients" --rooms 50 --senders 10 --rate 20 \
        --phase 3 --concurrency 200 --handshakes 1000 | tee "$OUT/$name.txt" || true
    [ -n "$HOG_PID" ] && kill "$HOG_PID" 2>/dev/null && wait "$HOG_PID" 2>/dev/null || true
    HOG_PID=
    kill "$SERVER_PID" && wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
    psql -X -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" postgres >/dev/null
    DB=
}
for clients in ${CLIENTS:-5000 10000}; do
    for hog in ${HOGS:-0 1}; do
        for i in $(seq 1 "${RUNS:-3}"); do run "$clients" "$hog" "$i"; done
    done
done
