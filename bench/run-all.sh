#!/usr/bin/env bash
# The measurements behind docs/performance.md: the machine's limits, then every scenario
# three times against a release server started as below, each result as JSON in $OUT, then
# the medians (bench/summarize.py). Takes about 20 minutes.
# Usage: bench/run-all.sh [out-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
mkdir -p "$OUT"
cargo build --release --bins --features tools
ulimit -n 20000
DB=rookery_bench_$$
DATA=$(mktemp -d)
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    psql -X -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" postgres >/dev/null 2>&1 || true
    rm -rf "$DATA"
}
trap cleanup EXIT

if [ -z "${SKIP_LIMITS:-}" ]; then
    for i in 1 2 3; do bench/limits.sh "$OUT/limits-$i.json"; done
fi

# The bench setup (bench/server.toml): bcrypt cost 4 (set-up must not dominate), limits per IP
# and per connection raised (every client comes from 127.0.0.1), wss with the development
# certificate.
start_server() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
    DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB" \
    ROOKERY__DATA_DIR="$DATA" \
    ROOKERY__SERVER__BIND=127.0.0.1:18443 \
    RUST_LOG=warn target/release/rookery serve --config bench/server.toml >> "$OUT/server.log" 2>&1 &
    SERVER_PID=$!
    sleep 3
}
start_server
bench() {
    target/release/rookery-bench --url wss://127.0.0.1:18443/ws --insecure --server-pid "$SERVER_PID" \
        --pg-url "postgres://postgres@127.0.0.1:5432/$DB" "$@"
}
run() { # name, args... (a run whose verdict is not clean is kept and reported, not retried)
    local name=$1; shift
    for i in 1 2 3; do bench --json "$OUT/$name-$i.json" "$@" | tee "$OUT/$name-$i.txt" || true; done
}
median_of() { # json files, python expression on the figures -> median
    python3 bench/summarize.py --median "$@"
}
if [ -z "${SKIP_THROUGHPUT:-}" ]; then
    run throughput throughput --rooms 200 --members 5 --duration 10 --inflight 4
    peak=$(median_of "$OUT"/throughput-?.json acked_per_s)
    half=$(python3 -c "print(round($peak / 2 / 1000, 3))")
    run throughput-half throughput --rooms 200 --members 5 --duration 10 --inflight 4 --rate "$half"
    # Where latency turns: one run at each of a few fixed rates (total msgs/s = rate × 1000).
    for rate in 1 2 4 6 8; do
        bench --json "$OUT/throughput-at-${rate}k-1.json" throughput --rooms 200 --members 5 \
            --duration 10 --inflight 4 --rate "$rate" | tee "$OUT/throughput-at-${rate}k-1.txt" || true
    done
fi
run fanout fanout --members 1000 --senders 4 --messages 3000
peak=$(median_of "$OUT"/fanout-?.json deliveries_per_s)
half=$(python3 -c "print(round($peak / 2 / 1000, 1))")
run fanout-half fanout --members 1000 --senders 4 --messages 1500 --rate "$half"
run history history --messages 5000 --clients 10 --duration 10
run reconnect reconnect --clients 5000 --rooms 50 --senders 10 --rate 20 --phase 3 --concurrency 200
# A fresh server: one that ran the scenarios above has a grown heap that new connections
# partly reuse, which would understate the memory each connection costs.
start_server
bench --json "$OUT/connections-1.json" connections --count 15000 --hold "${HOLD:-300}" | tee "$OUT/connections-1.txt"
python3 bench/summarize.py "$OUT"
