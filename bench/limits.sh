#!/usr/bin/env bash
# The machine's own limits, measured on the same box and in the same session as Rookery's
# figures (docs/performance.md compares against them):
#   1. pgbench, one message-sized row per transaction, at $CLIENTS connections: commits/s
#   2. pgbench, 100 such rows per transaction, at $CLIENTS connections: rows/s
#   3. WebSocket echo through a minimal actix-web + actix-web-actors server (plain ws, no
#      parsing, no storage), driven by rookery-bench: frames/s
#   4. Fan-out through a plain actix broadcast chat server of the same stack (plain ws, no TLS,
#      no storage; `rookery-bench broadcast-server`), driven by the same `fanout` scenario as
#      Rookery: deliveries/s, and the verdict that every member got every message
# Needs PostgreSQL on 127.0.0.1:5432 (user postgres) and `cargo build --release --bins --features tools`.
# Usage: bench/limits.sh [output.json]
#   CLIENTS=4 DURATION=10 FANOUT_MEMBERS=1000 FANOUT_MESSAGES=3000 by default; BIN=target/release
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-4}
DURATION=${DURATION:-10}
FANOUT_MEMBERS=${FANOUT_MEMBERS:-1000}
FANOUT_MESSAGES=${FANOUT_MESSAGES:-3000}
OUT=${1:-}
DB=rookery_limits_$$
BENCH=${BIN:-target/release}/rookery-bench
PSQL=(psql -X -q -h 127.0.0.1 -U postgres)
WORK=$(mktemp -d)
ECHO_PID=
BROADCAST_PID=
cleanup() {
    [ -n "$ECHO_PID" ] && kill "$ECHO_PID" 2>/dev/null || true
    [ -n "$BROADCAST_PID" ] && kill "$BROADCAST_PID" 2>/dev/null || true
    "${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" postgres >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

"${PSQL[@]}" -c "CREATE DATABASE $DB" postgres
# The same shape as Rookery's messages table: a 216-byte ciphertext (200-byte body + tag).
"${PSQL[@]}" -d "$DB" -c "CREATE TABLE messages (id BIGSERIAL PRIMARY KEY, room_id BIGINT NOT NULL,
  seq BIGINT NOT NULL, sender_id BIGINT NOT NULL, client_msg_id TEXT, key_id INTEGER NOT NULL,
  nonce BYTEA NOT NULL, ciphertext BYTEA NOT NULL, created_at TIMESTAMPTZ NOT NULL)"
cat > "$WORK/one.sql" <<'SQL'
INSERT INTO messages (room_id, seq, sender_id, client_msg_id, key_id, nonce, ciphertext, created_at)
VALUES (1, 1, 1, md5(random()::text), 1, decode(repeat('ab', 12), 'hex'), decode(repeat('cd', 216), 'hex'), now());
SQL
cat > "$WORK/hundred.sql" <<'SQL'
INSERT INTO messages (room_id, seq, sender_id, client_msg_id, key_id, nonce, ciphertext, created_at)
SELECT 1, g, 1, md5(random()::text), 1, decode(repeat('ab', 12), 'hex'), decode(repeat('cd', 216), 'hex'), now()
FROM generate_series(1, 100) g;
SQL

tps() { # script -> transactions/s
    pgbench -n -h 127.0.0.1 -U postgres -c "$CLIENTS" -j "$CLIENTS" -T "$DURATION" -f "$1" "$DB" 2>/dev/null \
        | awk '/^tps = / {print $3; exit}'
}
one=$(tps "$WORK/one.sql")
hundred=$(tps "$WORK/hundred.sql")
rows=$(awk -v t="$hundred" 'BEGIN {printf "%.0f", t * 100}')

port() { # a free local port at or above $1
    for p in $(seq "$1" $(($1 + 200))); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    echo "no free port near $1" >&2; exit 1
}
listening() { # port: waits up to 5 s for it to accept
    for _ in $(seq 1 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing is listening on port $1" >&2; exit 1
}

ECHO_PORT=$(port 9109)
"$BENCH" echo-server --bind "127.0.0.1:$ECHO_PORT" >/dev/null 2>&1 &
ECHO_PID=$!
listening "$ECHO_PORT"
echo_out=$("$BENCH" --url "ws://127.0.0.1:$ECHO_PORT/" echo --connections 50 --inflight 16 --duration "$DURATION")
frames=$(awk '/^frames_per_s/ {print $2; exit}' <<<"$echo_out")
kill "$ECHO_PID" 2>/dev/null || true
ECHO_PID=

BROADCAST_PORT=$(port 9110)
"$BENCH" broadcast-server --bind "127.0.0.1:$BROADCAST_PORT" >/dev/null 2>&1 &
BROADCAST_PID=$!
listening "$BROADCAST_PORT"
# The same scenario and flags as Rookery's fan-out figure (docs/performance.md), over plain ws.
"$BENCH" --url "ws://127.0.0.1:$BROADCAST_PORT/ws" --server-pid "$BROADCAST_PID" --json "$WORK/fanout.json" \
    fanout --members "$FANOUT_MEMBERS" --senders 4 --messages "$FANOUT_MESSAGES" >/dev/null
fanout_figure() { # key -> its value in the fan-out run's results
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["figures"][sys.argv[2]])' "$WORK/fanout.json" "$1"
}
deliveries=$(fanout_figure deliveries_per_s)
server_cpu=$(fanout_figure server_cpu_us_per_delivery)

printf '%-44s %12s\n' "pgbench 1 row/tx, $CLIENTS clients (commits/s)" "$one"
printf '%-44s %12s\n' "pgbench 100 rows/tx, $CLIENTS clients (rows/s)" "$rows"
printf '%-44s %12s\n' "ws echo, 50 connections (frames/s)" "$frames"
printf '%-44s %12.0f\n' "ws broadcast, $FANOUT_MEMBERS members (deliveries/s)" "$deliveries"
printf '%-44s %12.2f\n' "  its server CPU per delivery (µs)" "$server_cpu"
if [ -n "$OUT" ]; then
    printf '{"clients": %s, "duration_s": %s, "fanout_members": %s, "fanout_messages": %s, "pgbench_single_row_commits_per_s": %s, "pgbench_100_rows_per_s": %s, "ws_echo_frames_per_s": %s, "broadcast_fanout_deliveries_per_s": %s, "broadcast_server_cpu_us_per_delivery": %s}\n' \
        "$CLIENTS" "$DURATION" "$FANOUT_MEMBERS" "$FANOUT_MESSAGES" "$one" "$rows" "$frames" "$deliveries" "$server_cpu" > "$OUT"
fi
