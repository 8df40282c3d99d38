#!/usr/bin/env bash
# The servers' own raw limits on this machine, for reference next to Troupe and Dramatiq.
#
#   bench/raw_limits.sh                       # about 30 s
#   ROWS=1000000 AMQP_MESSAGES=20000 bench/raw_limits.sh
#
# Prints one JSON object per line:
#
# - Redis (redis-benchmark, pipelined -P 64, 50 clients, REDIS_REQUESTS requests, on db 15):
#   LPUSH of a short value to one list, and EVALSHA of a one-line loaded Lua script
#   (`return redis.call('RPUSH', KEYS[1], ARGV[1])`), the floor of any broker that makes one
#   script call per operation. {"server":"redis","lpush_per_sec":...,"evalsha_per_sec":...}
# - PostgreSQL (pgbench on database `test`, scratch schema `raw_bench`, dropped at the end): a
#   table jobs(id bigserial primary key, queue text, state smallint, body bytea) with ROWS ready
#   rows (state 0, a Dramatiq-sized JSON body) and a partial index on the ready rows; pgbench
#   clients (-c 4 -j 2, prepared statements) each claim batches of 100 rows with
#     UPDATE ... SET state = 1 WHERE id IN (SELECT id ... WHERE state = 0 ORDER BY id
#                                           LIMIT 100 FOR UPDATE SKIP LOCKED) RETURNING id
#   for a fixed number of transactions (90% of the rows, so claims never come back empty).
#   {"server":"postgres","skip_locked_claim_rows_per_sec": tps x 100,"batch":100,"rows":...}
# - RabbitMQ: bench/raw_amqp.py (confirmed publishes one by one and windowed, manual-ack
#   consume; see that file) with AMQP_MESSAGES messages, its JSON with "server":"rabbitmq" added.
#
# Needs redis-benchmark, redis-cli, pgbench, psql and the Dramatiq venv (for pika); starts the
# local servers through scripts/services.sh when they are not answering.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_redis
ensure_postgres
ensure_rabbitmq
ensure_dramatiq_venv

PY="${TROUPE_DRAMATIQ_PYTHON:-$HOME/.cache/troupe/venv-dramatiq/bin/python}"
ROWS="${ROWS:-200000}"
REDIS_REQUESTS="${REDIS_REQUESTS:-200000}"
AMQP_MESSAGES="${AMQP_MESSAGES:-10000}"
AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
REDIS_DB=15
REDIS_KEY="rawbench:key"
PSQL=(psql -h 127.0.0.1 -U postgres -d test -v ON_ERROR_STOP=1 -qAt)
export PGOPTIONS="-c client_min_messages=warning" # no NOTICEs from DROP ... CASCADE
BATCH=100
CLIENTS=4

scratch="$(mktemp -d)"
cleanup() {
  redis-cli -h 127.0.0.1 -p 6379 -n "$REDIS_DB" del "$REDIS_KEY" >/dev/null 2>&1 || true
  "${PSQL[@]}" -c "DROP SCHEMA IF EXISTS raw_bench CASCADE" >/dev/null 2>&1 || true
  rm -rf "$scratch"
}
trap cleanup EXIT

# --- Redis ---------------------------------------------------------------------------------
# The requests per second of a `redis-benchmark --csv` run: the second field of its data line.
redis_rps() {
  redis-benchmark -h 127.0.0.1 -p 6379 --dbnum "$REDIS_DB" -P 64 -n "$REDIS_REQUESTS" --csv "$@" |
    awk -F'"' 'NR == 2 { printf "%.0f", $4 }'
}
redis-cli -h 127.0.0.1 -p 6379 -n "$REDIS_DB" del "$REDIS_KEY" >/dev/null
lpush="$(redis_rps lpush "$REDIS_KEY" x)"
redis-cli -h 127.0.0.1 -p 6379 -n "$REDIS_DB" del "$REDIS_KEY" >/dev/null
sha="$(redis-cli -h 127.0.0.1 -p 6379 -n "$REDIS_DB" script load "return redis.call('RPUSH', KEYS[1], ARGV[1])")"
evalsha="$(redis_rps evalsha "$sha" 1 "$REDIS_KEY" x)"
pushed="$(redis-cli -h 127.0.0.1 -p 6379 -n "$REDIS_DB" llen "$REDIS_KEY")"
redis-cli -h 127.0.0.1 -p 6379 -n "$REDIS_DB" del "$REDIS_KEY" >/dev/null
if [ "$pushed" != "$REDIS_REQUESTS" ]; then
  echo "raw_limits.sh: EVALSHA pushed $pushed items, expected $REDIS_REQUESTS" >&2
  exit 1
fi
printf '{"server":"redis","lpush_per_sec":%s,"evalsha_per_sec":%s,"pipeline":64,"clients":50,"requests":%s}\n' \
  "$lpush" "$evalsha" "$REDIS_REQUESTS"

# --- PostgreSQL ----------------------------------------------------------------------------
"${PSQL[@]}" <<SQL
DROP SCHEMA IF EXISTS raw_bench CASCADE;
CREATE SCHEMA raw_bench;
CREATE TABLE raw_bench.jobs (
    id bigserial PRIMARY KEY,
    queue text NOT NULL,
    state smallint NOT NULL,
    body bytea NOT NULL
);
INSERT INTO raw_bench.jobs (queue, state, body)
SELECT 'bench', 0, convert_to(json_build_object(
    'queue_name', 'bench', 'actor_name', 'noop', 'args', json_build_array(n), 'kwargs', '{}'::json,
    'options', '{}'::json, 'message_id', md5(n::text), 'message_timestamp', 0)::text, 'UTF8')
FROM generate_series(1, $ROWS) AS n;
CREATE INDEX jobs_ready ON raw_bench.jobs (id) WHERE state = 0;
VACUUM ANALYZE raw_bench.jobs;
SQL
cat >"$scratch/claim.sql" <<SQL
UPDATE raw_bench.jobs SET state = 1
WHERE id IN (SELECT id FROM raw_bench.jobs WHERE state = 0 ORDER BY id LIMIT $BATCH FOR UPDATE SKIP LOCKED)
RETURNING id;
SQL
# 90% of the rows, split over the clients: every claim finds a full batch.
per_client=$((ROWS * 9 / 10 / BATCH / CLIENTS))
if [ "$per_client" -lt 1 ]; then
  echo "raw_limits.sh: ROWS=$ROWS is too small for $CLIENTS clients claiming $BATCH rows" >&2
  exit 1
fi
pgbench -h 127.0.0.1 -U postgres -n -M prepared -c "$CLIENTS" -j 2 -t "$per_client" -f "$scratch/claim.sql" test \
  >"$scratch/pgbench.out" 2>&1 || {
  cat "$scratch/pgbench.out" >&2
  exit 1
}
tps="$(awk '/^tps = / { print $3; exit }' "$scratch/pgbench.out")"
claimed="$("${PSQL[@]}" -c "SELECT count(*) FROM raw_bench.jobs WHERE state = 1")"
expected=$((per_client * CLIENTS * BATCH))
if [ "$claimed" != "$expected" ]; then
  echo "raw_limits.sh: pgbench claimed $claimed rows, expected $expected" >&2
  exit 1
fi
printf '{"server":"postgres","skip_locked_claim_rows_per_sec":%.0f,"tps":%.1f,"batch":%s,"clients":%s,"rows":%s,"claimed":%s}\n' \
  "$(awk -v t="$tps" -v b="$BATCH" 'BEGIN { print t * b }')" "$tps" "$BATCH" "$CLIENTS" "$ROWS" "$claimed"
"${PSQL[@]}" -c "DROP SCHEMA raw_bench CASCADE"

# --- RabbitMQ ------------------------------------------------------------------------------
"$PY" bench/raw_amqp.py --url "$AMQP_URL" --messages "$AMQP_MESSAGES" |
  "$PY" -c 'import json, sys; print(json.dumps({"server": "rabbitmq", **json.load(sys.stdin)}, separators=(",", ":")))'
