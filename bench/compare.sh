#!/usr/bin/env bash
# Troupe and Python Dramatiq side by side on the same brokers, in one run.
#
#   bench/compare.sh [MESSAGES]        # default 20000
#
# Needs the servers and the Dramatiq venv that scripts/test sets up. Prints each run's JSON and
# the ratio Troupe / Dramatiq for enqueue and process rates, per broker and Dramatiq setting.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_redis
ensure_rabbitmq
ensure_dramatiq_venv
N="${1:-20000}"
PY="${TROUPE_DRAMATIQ_PYTHON:-$HOME/.cache/troupe/venv-dramatiq/bin/python}"
REDIS="redis://127.0.0.1:6379/15"
AMQP="amqp://guest:guest@127.0.0.1:5672/%2f"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/troupe/target}"
cargo build -q --release -p troupe-bench
BENCH="$CARGO_TARGET_DIR/release/troupe-bench"
out="$(mktemp -d)"
"$BENCH" --broker-url "$REDIS" --messages "$N" --json > "$out/troupe-redis.json"
"$PY" bench/dramatiq_peer.py --broker redis --url "$REDIS" --messages "$N" --processes 1 --threads 8 > "$out/dramatiq-redis-1x8.json"
"$PY" bench/dramatiq_peer.py --broker redis --url "$REDIS" --messages "$N" --processes 2 --threads 8 > "$out/dramatiq-redis-2x8.json"
"$BENCH" --broker-url "$AMQP" --messages "$N" --json > "$out/troupe-rabbitmq.json"
"$PY" bench/dramatiq_peer.py --broker rabbitmq --url "$AMQP" --messages "$N" --processes 1 --threads 8 > "$out/dramatiq-rabbitmq-1x8.json"
"$PY" bench/dramatiq_peer.py --broker rabbitmq --url "$AMQP" --messages "$N" --processes 2 --threads 8 > "$out/dramatiq-rabbitmq-2x8.json"
"$PY" bench/raw_amqp.py --url "$AMQP" --messages "$N" > "$out/raw-amqp.json"
"$PY" - "$out" <<'PYEOF'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
load = lambda n: json.loads((d / f"{n}.json").read_text())
for broker in ("redis", "rabbitmq"):
    t = load(f"troupe-{broker}")
    print(f"troupe   {broker:8} enqueue {t['enqueue_per_sec']:>9,.0f}/s  process {t['process_per_sec']:>9,.0f}/s  (lost {t['lost']}, duplicates {t['duplicates']})")
    for setting in ("1x8", "2x8"):
        p = load(f"dramatiq-{broker}-{setting}")
        print(f"dramatiq {broker:8} {setting} enqueue {p['enqueue_per_sec']:>7,.0f}/s  process {p['process_per_sec']:>7,.0f}/s"
              f"   ratio troupe/dramatiq: enqueue {t['enqueue_per_sec']/p['enqueue_per_sec']:.1f}x  process {t['process_per_sec']/p['process_per_sec']:.1f}x")
print("raw amqp:", (d / "raw-amqp.json").read_text().strip())
PYEOF
