#!/usr/bin/env bash
# Two builds of the server side by side on the same box and in the same session: each round
# runs every scenario (SCENARIOS, default "fanout throughput"; also "latency", throughput at
# RATE thousand msgs/s, default 6, "history" and "reconnect") against build A and build B, in
# turns (a fresh server and database per
# measurement), RUNS rounds. The load tool is B's for both. Redis is not configured (single node).
# Usage: bench/ab.sh A-release-dir B-release-dir [out-dir]
#   e.g. git worktree add /tmp/old <commit>; (cd /tmp/old && CARGO_TARGET_DIR=/tmp/oldtarget
#        cargo build --release --bins --features tools); bench/ab.sh /tmp/oldtarget/release target/release
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1 B=$2 OUT=${3:-bench/results-ab}
mkdir -p "$OUT"
ulimit -n 20000
DATA=$(mktemp -d)
PID= DB=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
    [ -n "$DB" ] && psql -X -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" postgres >/dev/null 2>&1 || true
    rm -rf "$DATA"
}
trap cleanup EXIT
measure() { # build label, build dir, scenario name, round, scenario args...
    local label=$1 dir=$2 name=$3 round=$4; shift 4
    DB=rookery_ab_$$_$round
    DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB" ROOKERY__DATA_DIR="$DATA" \
    ROOKERY__SERVER__BIND=127.0.0.1:18443 \
    RUST_LOG=warn "$dir/rookery" serve --config bench/server.toml >> "$OUT/server.log" 2>&1 &
    PID=$!
    sleep 3
    "$B/rookery-bench" --url wss://127.0.0.1:18443/ws --insecure --server-pid "$PID" \
        --json "$OUT/$label-$name-$round.json" "$@" > "$OUT/$label-$name-$round.txt" || true
    kill "$PID" && wait "$PID" 2>/dev/null || true
    PID=
    psql -X -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" postgres >/dev/null
    DB=
    rm -rf "${DATA:?}"/*
}
# The builds take turns going first, so neither always runs on the box the other left behind.
for round in $(seq 1 "${RUNS:-3}"); do
    if [ $((round % 2)) = 1 ]; then order=("a $A" "b $B"); else order=("b $B" "a $A"); fi
    for build in "${order[@]}"; do
        set -- $build
        for scenario in ${SCENARIOS:-fanout throughput}; do
            case $scenario in
                fanout) measure "$1" "$2" fanout "$round" fanout --members 1000 --senders 4 --messages 3000 ;;
                throughput) measure "$1" "$2" throughput "$round" throughput --rooms 200 --members 5 --duration 10 --inflight 4 ;;
                latency) measure "$1" "$2" latency "$round" throughput --rooms 200 --members 5 --duration 10 --inflight 4 --rate "${RATE:-6}" ;;
                history) measure "$1" "$2" history "$round" history --messages 5000 --clients 10 --duration 10 ;;
                reconnect) measure "$1" "$2" reconnect "$round" reconnect --clients 5000 --rooms 50 --senders 10 --rate 20 --phase 3 ;;
            esac
        done
    done
done
python3 - "$OUT" <<'PY'
import json, sys, glob, statistics
out = sys.argv[1]
def figure(run, key):
    value = run["figures"].get(key.split(".")[0])
    for part in key.split(".")[1:]:
        value = value.get(part) if isinstance(value, dict) else None
    return value
for name, key in (("fanout", "deliveries_per_s"), ("throughput", "acked_per_s"),
                  ("latency", "send_to_deliver.p99_ms"), ("latency", "send_to_ack.p99_ms"),
                  ("history", "pages_per_s"), ("history", "latency.p99_ms"),
                  ("reconnect", "all_back_seconds")):
    for label in ("a", "b"):
        runs = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/{label}-{name}-*.json"))]
        vals = [figure(r, key) for r in runs if figure(r, key) is not None]
        clean = [bool(r["verdict"] and r["verdict"]["clean"]) for r in runs]
        if vals:
            print(f"{name:<10} {label}: {key} median {statistics.median(vals):10.1f} min {min(vals):10.1f} max {max(vals):10.1f}  clean {clean}")
PY
