#!/usr/bin/env bash
# Fan-out across two nodes (docs/performance.md, docs/cluster.md): the `fanout` scenario with
# its members spread over two nodes (two processes on one database and one Redis) against the
# same load on one node of a cluster, and on one node with Redis unset, taken in turn in one
# run: RUNS rounds of the three. A fresh database (and Redis prefix) per measurement.
# Results as JSON in $OUT. Usage: bench/cluster.sh [out-dir]
#   (MEMBERS=1000 SENDERS=4 MESSAGES=3000 RATE=0 RUNS=3 by default; RATE in msgs/s, 0: as fast as acks allow)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results-cluster}
mkdir -p "$OUT"
cargo build --release --bins --features tools
ulimit -n 20000
DATA=$(mktemp -d)
PIDS=() DB=
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -n "$DB" ] && psql -X -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" postgres >/dev/null 2>&1 || true
    rm -rf "$DATA"
}
trap cleanup EXIT
publishes() { redis-cli INFO commandstats | sed -n 's/^cmdstat_publish:calls=\([0-9]*\),.*/\1/p' | grep . || echo 0; }
node() { # port, redis url ("" for none), prefix, node id (metrics on port + 1000)
    DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB" ROOKERY__DATA_DIR="$DATA" \
    ROOKERY__SERVER__BIND="127.0.0.1:$1" ROOKERY__REDIS__URL="$2" ROOKERY__REDIS__PREFIX="$3" \
    ROOKERY__CLUSTER__NODE_ID="$4" ROOKERY__METRICS__BIND="127.0.0.1:$(($1 + 1000))" \
    RUST_LOG=warn target/release/rookery serve --config bench/server.toml >> "$OUT/server.log" 2>&1 &
    PIDS+=($!)
}
measure() { # name, mode (alone | one | two), round
    local name=$1-$3 mode=$1 prefix urls
    DB=rookery_cluster_$$_$3_$mode
    prefix="bench-$$-$3-$mode"
    case $mode in
        alone) node 18443 "" "$prefix" n1; sleep 3; urls=wss://127.0.0.1:18443/ws ;;
        one) node 18443 redis://127.0.0.1:6379 "$prefix" n1; sleep 3; urls=wss://127.0.0.1:18443/ws ;;
        # The second node starts once the first has made the database and the message key.
        two) node 18443 redis://127.0.0.1:6379 "$prefix" n1; sleep 3
             node 18444 redis://127.0.0.1:6379 "$prefix" n2; sleep 3
             urls=wss://127.0.0.1:18443/ws,wss://127.0.0.1:18444/ws ;;
    esac
    local before after
    before=$(publishes)
    target/release/rookery-bench --url "$urls" --insecure --server-pid "${PIDS[0]}" \
        --json "$OUT/$name.json" fanout --members "${MEMBERS:-1000}" --senders "${SENDERS:-4}" \
        --messages "${MESSAGES:-3000}" --rate "${RATE:-0}" | tee "$OUT/$name.txt" || true
    after=$(publishes)
    # Every PUBLISH Redis served meanwhile (messages, presence changes, heartbeats' beats).
    echo "redis PUBLISH commands during the run: $((after - before))" | tee -a "$OUT/$name.txt"
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; done
    PIDS=()
    psql -X -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" postgres >/dev/null
    DB=
    rm -rf "${DATA:?}"/*
}
for round in $(seq 1 "${RUNS:-3}"); do
    for mode in ${MODES:-alone one two}; do measure "$mode" "$mode" "$round"; done
done
python3 - "$OUT" <<'PY'
import json, sys, glob, statistics
out = sys.argv[1]
def get(run, path):
    value = run["figures"]
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value
rows = [("deliveries/s", ("deliveries_per_s",)), ("send->deliver p50 ms", ("send_to_deliver", "p50_ms")),
        ("send->deliver p99 ms", ("send_to_deliver", "p99_ms")), ("send->ack p99 ms", ("send_to_ack", "p99_ms"))]
for mode in ("alone", "one", "two"):
    runs = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/{mode}-*.json"))]
    if not runs:
        continue
    print(f"{mode}: {len(runs)} runs, verdicts clean: {[r['verdict'] and r['verdict']['clean'] for r in runs]}")
    for label, path in rows:
        vals = [v for v in (get(r, path) for r in runs) if v is not None]
        if vals:
            print(f"  {label:<22} median {statistics.median(vals):10.1f}  min {min(vals):10.1f}  max {max(vals):10.1f}")
PY
