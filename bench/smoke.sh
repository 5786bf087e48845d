#!/usr/bin/env bash
# Runs every rookery-bench scenario once at a tiny size against a fresh server, so the tool
# keeps working (CI runs this; no timing is asserted, but every checker verdict must be clean).
# Usage: bench/smoke.sh [target/debug|target/release]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug}
DB=rookery_smoke_$$
DATA=$(mktemp -d)
port() { # a free local port
    for p in $(seq "$1" $(($1 + 200))); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    echo "no free port near $1" >&2; exit 1
}
listening() { # port: waits up to 20 s for it to accept
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing is listening on port $1" >&2; exit 1
}
PORT=$(port 18800)
ECHO_PORT=$(port 19800)
BROADCAST_PORT=$(port 20800)
SERVER_PID=
ECHO_PID=
BROADCAST_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
    [ -n "$ECHO_PID" ] && kill "$ECHO_PID" 2>/dev/null || true
    [ -n "$BROADCAST_PID" ] && kill "$BROADCAST_PID" 2>/dev/null || true
    psql -X -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" postgres >/dev/null 2>&1 || true
    rm -rf "$DATA"
}
trap cleanup EXIT

DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB" \
ROOKERY__DATA_DIR="$DATA" \
ROOKERY__SERVER__BIND="127.0.0.1:$PORT" ROOKERY__METRICS__BIND=127.0.0.1:0 \
RUST_LOG=warn "$BIN/rookery" serve --config bench/server.toml > "$DATA/server.log" 2>&1 &
SERVER_PID=$!
listening "$PORT"

B=("$BIN/rookery-bench" --url "wss://127.0.0.1:$PORT/ws" --insecure --server-pid "$SERVER_PID")
"${B[@]}" throughput --rooms 3 --members 3 --duration 1
"${B[@]}" fanout --members 20 --senders 2 --messages 50
"${B[@]}" connections --count 50 --hold 1
"${B[@]}" reconnect --clients 20 --rooms 3 --senders 2 --rate 20 --phase 1
"${B[@]}" history --messages 200 --clients 3 --duration 1

"$BIN/rookery-bench" echo-server --bind "127.0.0.1:$ECHO_PORT" >/dev/null 2>&1 &
ECHO_PID=$!
listening "$ECHO_PORT"
"$BIN/rookery-bench" --url "ws://127.0.0.1:$ECHO_PORT/" echo --connections 5 --duration 1

# The fan-out baseline, driven by the same scenario (its verdict must be clean too).
"$BIN/rookery-bench" broadcast-server --bind "127.0.0.1:$BROADCAST_PORT" >/dev/null 2>&1 &
BROADCAST_PID=$!
listening "$BROADCAST_PORT"
"$BIN/rookery-bench" --url "ws://127.0.0.1:$BROADCAST_PORT/ws" fanout --members 20 --senders 2 --messages 50
echo "bench smoke: every scenario ran and every verdict was clean"
