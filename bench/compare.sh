#!/usr/bin/env bash
# Troupe and Python Dramatiq side by side on the same brokers, in one run.
#
#   bench/compare.sh [MESSAGES]        # default 20000
#   RATE=2000 STEADY_SECS=10 LATENCY_SAMPLES=500 COMPARE_OUT=/tmp/cmp bench/compare.sh 50000
#
# Runs, in order:
# - bench/raw_limits.sh: the servers' own limits (redis-benchmark LPUSH and EVALSHA, a pgbench
#   FOR UPDATE SKIP LOCKED claim of 100 rows, raw AMQP publish/consume), for reference;
# - troupe-bench (release build) on Redis (db 15), RabbitMQ, PostgreSQL (database `test`,
#   schema `troupe_bench`, dropped before each run) and SQLite (/tmp/troupe-bench.db,
#   durability=full), twice each: at Troupe's default settings first (what users run; the
#   ratios use these), then tuned (labelled "tuned": PostgreSQL --concurrency
#   $TROUPE_PG_CONCURRENCY, default 256, the others --concurrency $TROUPE_CONCURRENCY,
#   default 64);
# - bench/dramatiq_peer.py on Redis and RabbitMQ with 1 process x 8 threads and 2 x 8 (Dramatiq
#   has no PostgreSQL or SQLite broker).
# - the io scenario on Redis (each message awaits 50 ms, a stand-in for an HTTP call; no
#   steady-state or pick-up phases): troupe-bench --scenario io at --concurrency
#   $IO_CONCURRENCY (default 5000: async actors, one process), IO_TROUPE_MESSAGES of them
#   (default 100000: at 5000 at once a run of 20000 is mostly start-up), once with the system
#   allocator (glibc malloc: what a binary gets unless it picks another) and once built with
#   troupe-bench's `mimalloc` feature (labelled), against Dramatiq 2 x 8, 2 x 64 and 2 x 256
#   threads (--io-ms 50), IO_MESSAGES each (default 20000; 0 skips the block).
# - many concurrent single sends: troupe-bench --senders 100 (100 tasks each awaiting one send at
#   a time, what a web server does) on Redis, RabbitMQ and PostgreSQL, MESSAGES each (its
#   enqueue_per_sec is the figure; SENDERS=0 skips it).
# - deep backlogs: troupe-bench --memory-backlog (fill the queue with send_many, then one worker
#   process at the default settings drains it) with 30000 and DEEP_MESSAGES (default 1000000)
#   messages on Redis and RabbitMQ: the drain rate (from the worker's first message, leaving out
#   its start), the worker's and the producer's peak memory (DEEP_MESSAGES=0 skips it);
# - fairness: troupe-bench --fairness-backlog FAIR_BACKLOG (default 1000000) on every broker: one
#   queue holds the backlog while nine quiet queues get 180 messages/s for 5 s, each timed from
#   its send to its actor's start, in one worker process at the default settings (SQLite's in
#   the sending process, as an embedded broker runs) (FAIR_BACKLOG=0 skips it).
# Every run gets the same MESSAGES, RATE (steady-state offered load, messages/s, default 1000),
# STEADY_SECS (default 5) and LATENCY_SAMPLES (idle pick-up probes, default 200).
#
# Then prints, per broker, a table of each figure for Troupe, Dramatiq 1x8 and 2x8 and the ratio
# between them, oriented so that above 1 means Troupe is better: Troupe/Dramatiq for rates,
# Dramatiq/Troupe for latencies and memory. "-" is a figure a run did not report. The Dramatiq
# peer also shows its senders' achieved rate and lag: when they fall behind, its steady-state
# latencies measure the Python sender as much as the worker. On Redis also
# Troupe's script calls and Redis server time per message, the server's limit for that many
# EVALSHA calls per message, and Troupe's process rate as a share of it. Every run's JSON is kept
# in COMPARE_OUT (default: a new temporary directory), whose path is printed at the end.
#
# Needs the servers and the Dramatiq venv that scripts/test sets up (scripts/services.sh starts
# them when they are not answering). A run that fails is reported on stderr and shows as "-".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_redis
ensure_postgres
ensure_rabbitmq
ensure_dramatiq_venv
N="${1:-20000}"
RATE="${RATE:-1000}"
STEADY_SECS="${STEADY_SECS:-5}"
LATENCY_SAMPLES="${LATENCY_SAMPLES:-200}"
PY="${TROUPE_DRAMATIQ_PYTHON:-$HOME/.cache/troupe/venv-dramatiq/bin/python}"
REDIS="redis://127.0.0.1:6379/15"
AMQP="amqp://guest:guest@127.0.0.1:5672/%2f"
POSTGRES="postgres://postgres@127.0.0.1:5432/test?schema=troupe_bench"
SQLITE="sqlite:///tmp/troupe-bench.db?durability=full"
# Troupe's concurrency (async actors: cheap to raise; no-op messages need a wide window).
C="${TROUPE_CONCURRENCY:-64}"
PG_C="${TROUPE_PG_CONCURRENCY:-256}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/troupe/target}"
out="${COMPARE_OUT:-$(mktemp -d)}"
mkdir -p "$out"
# Both builds kept side by side (one target directory holds one troupe-bench at a time).
cargo build -q --release -p troupe-bench --features mimalloc
cp "$CARGO_TARGET_DIR/release/troupe-bench" "$out/troupe-bench-mimalloc"
cargo build -q --release -p troupe-bench
cp "$CARGO_TARGET_DIR/release/troupe-bench" "$out/troupe-bench"
BENCH="$out/troupe-bench"
LOAD=(--rate "$RATE" --steady-secs "$STEADY_SECS" --latency-samples "$LATENCY_SAMPLES")

# run NAME COMMAND...: the command's stdout into $out/NAME.json; a failure is reported, not fatal.
run() {
  local name=$1
  shift
  echo "compare.sh: $name" >&2
  local rc=0
  "$@" >"$out/$name.json" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "compare.sh: $name failed (exit $rc)" >&2
  fi
}

run raw-limits bench/raw_limits.sh
run troupe-redis "$BENCH" --broker-url "$REDIS" --messages "$N" "${LOAD[@]}" --json
run troupe-redis-tuned "$BENCH" --broker-url "$REDIS" --concurrency "$C" --messages "$N" "${LOAD[@]}" --json
run dramatiq-redis-1x8 "$PY" bench/dramatiq_peer.py --broker redis --url "$REDIS" --messages "$N" --processes 1 --threads 8 "${LOAD[@]}"
run dramatiq-redis-2x8 "$PY" bench/dramatiq_peer.py --broker redis --url "$REDIS" --messages "$N" --processes 2 --threads 8 "${LOAD[@]}"
run troupe-rabbitmq "$BENCH" --broker-url "$AMQP" --messages "$N" "${LOAD[@]}" --json
run troupe-rabbitmq-tuned "$BENCH" --broker-url "$AMQP" --concurrency "$C" --messages "$N" "${LOAD[@]}" --json
run dramatiq-rabbitmq-1x8 "$PY" bench/dramatiq_peer.py --broker rabbitmq --url "$AMQP" --messages "$N" --processes 1 --threads 8 "${LOAD[@]}"
run dramatiq-rabbitmq-2x8 "$PY" bench/dramatiq_peer.py --broker rabbitmq --url "$AMQP" --messages "$N" --processes 2 --threads 8 "${LOAD[@]}"
# A fresh jobs table for each PostgreSQL run: one many runs filled and drained claims at less
# than half the rate (docs/performance.md).
drop_bench_schema() {
  PGOPTIONS="-c client_min_messages=warning" psql -h 127.0.0.1 -U postgres -d test -qAt \
    -c "DROP SCHEMA IF EXISTS troupe_bench CASCADE" >/dev/null
}
drop_bench_schema
run troupe-postgres "$BENCH" --broker-url "$POSTGRES" --messages "$N" "${LOAD[@]}" --json
drop_bench_schema
run troupe-postgres-tuned "$BENCH" --broker-url "$POSTGRES" --concurrency "$PG_C" --messages "$N" "${LOAD[@]}" --json
drop_bench_schema
run troupe-sqlite "$BENCH" --broker-url "$SQLITE" --messages "$N" "${LOAD[@]}" --json
run troupe-sqlite-tuned "$BENCH" --broker-url "$SQLITE" --concurrency "$C" --messages "$N" "${LOAD[@]}" --json
if [ "${SENDERS:-100}" -gt 0 ]; then
  for pair in "redis $REDIS" "rabbitmq $AMQP" "postgres $POSTGRES"; do
    set -- $pair
    run "sends-troupe-$1" "$BENCH" --broker-url "$2" --senders "${SENDERS:-100}" --messages "$N" \
      --steady-secs 0 --latency-samples 0 --json
  done
fi
IO_N="${IO_MESSAGES:-20000}"
IO_TN="${IO_TROUPE_MESSAGES:-100000}"
IO_C="${IO_CONCURRENCY:-5000}"
if [ "$IO_N" -gt 0 ]; then
  IO_LOAD=(--steady-secs 0 --latency-samples 0)
  run io-troupe-redis "$BENCH" --broker-url "$REDIS" --scenario io --concurrency "$IO_C" --messages "$IO_TN" "${IO_LOAD[@]}" --json
  run io-troupe-mimalloc-redis "$out/troupe-bench-mimalloc" --broker-url "$REDIS" --scenario io --concurrency "$IO_C" \
    --messages "$IO_TN" "${IO_LOAD[@]}" --json
  for threads in 8 64 256; do
    run "io-dramatiq-redis-2x$threads" "$PY" bench/dramatiq_peer.py --broker redis --url "$REDIS" --io-ms 50 \
      --messages "$IO_N" --processes 2 --threads "$threads" "${IO_LOAD[@]}"
  done
fi
DEEP="${DEEP_MESSAGES:-1000000}"
if [ "$DEEP" -gt 0 ]; then
  for pair in "redis $REDIS" "rabbitmq $AMQP"; do
    set -- $pair
    for count in 30000 "$DEEP"; do
      run "deep-troupe-$1-$count" "$BENCH" --broker-url "$2" --memory-backlog "$count" --memory-secs 600 --json
    done
  done
fi
FAIR="${FAIR_BACKLOG:-1000000}"
if [ "$FAIR" -gt 0 ]; then
  drop_bench_schema
  for pair in "redis $REDIS" "rabbitmq $AMQP" "postgres $POSTGRES"; do
    set -- $pair
    run "fair-troupe-$1" "$BENCH" --broker-url "$2" --fairness-backlog "$FAIR" --json
  done
  # SQLite is embedded: its worker runs in the process that sends (one in another process
  # polls the file, every 50 ms by default).
  run fair-troupe-sqlite "$BENCH" --broker-url "$SQLITE" --fairness-backlog "$FAIR" --fairness-in-process --json
  drop_bench_schema
fi

"$PY" - "$out" <<'PYEOF'
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])


def load(name):
    """The run's JSON object, or {} when the run failed or printed nothing usable."""
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


def fmt(v, decimals=None):
    """Thousands separators; `decimals` fixed (the ms figures), else up to 3 for a fraction."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "-" if v is None else str(v)
    if decimals is not None:
        return f"{v:,.{decimals}f}"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.3f}".rstrip("0")
    return f"{int(v):,}"


def ratio(num, den):
    if not isinstance(num, (int, float)) or not isinstance(den, (int, float)) or den == 0:
        return "-"
    return f"{num / den:.2f}x"


# (field, how the ratio is oriented): "T/D" for rates, "D/T" for latencies and memory (>1 = Troupe better).
FIGURES = [
    ("enqueue_per_sec", "T/D"),
    ("enqueue_batched_per_sec", "T/D"),
    ("process_per_sec", "T/D"),
    ("latency_offered_per_sec", None),
    ("latency_sent_per_sec", None),  # Dramatiq's senders: below the offered rate = they fell behind
    ("sender_lag_ms_p99", None),  # Dramatiq: how late its sends started against the schedule
    ("latency_ms_p50", "D/T"),
    ("latency_ms_p90", "D/T"),
    ("latency_ms_p99", "D/T"),
    ("latency_ms_max", "D/T"),
    ("idle_pickup_ms_p50", "D/T"),
    ("idle_pickup_ms_p99", "D/T"),
    ("idle_pickup_ms_max", "D/T"),
    ("worker_rss_idle_kib", "D/T"),
    ("worker_rss_peak_kib", "D/T"),
    ("lost", None),
    ("duplicates", None),
]

raw = {}
raw_lines = []
try:
    for line in (out / "raw-limits.json").read_text().splitlines():
        if line.strip():
            raw_lines.append(line.strip())
            obj = json.loads(line)
            raw[obj.get("server")] = obj
except (OSError, ValueError):
    pass

print("Ratios (Troupe at its defaults): rates Troupe/Dramatiq, latencies and memory Dramatiq/Troupe; above 1x = Troupe better.")
for broker in ("redis", "rabbitmq", "postgres", "sqlite"):
    t = load(f"troupe-{broker}")
    tt = load(f"troupe-{broker}-tuned")
    peer = broker in ("redis", "rabbitmq")
    d1 = load(f"dramatiq-{broker}-1x8") if peer else {}
    d2 = load(f"dramatiq-{broker}-2x8") if peer else {}
    print()
    print(f"== {broker} (troupe: defaults, concurrency {fmt(t.get('concurrency'))}; tuned, {fmt(tt.get('concurrency'))}) "
          + "=" * max(0, 72 - len(broker)))
    if peer:
        print(f"{'figure':<32}{'troupe':>12}{'tuned':>12}{'dramatiq 1x8':>14}{'dramatiq 2x8':>14}   {'ratio':<5}{'vs 1x8':>9}{'vs 2x8':>9}")
    else:
        print(f"{'figure':<32}{'troupe':>12}{'tuned':>12}   (Dramatiq has no {broker} broker)")
    for field, orient in FIGURES:
        decimals = 2 if "_ms_" in field else None
        tv, tuned, v1, v2 = t.get(field), tt.get(field), d1.get(field), d2.get(field)
        if not peer:
            print(f"{field:<32}{fmt(tv, decimals):>12}{fmt(tuned, decimals):>12}")
            continue
        if orient == "T/D":
            r1, r2 = ratio(tv, v1), ratio(tv, v2)
        elif orient == "D/T":
            r1, r2 = ratio(v1, tv), ratio(v2, tv)
        else:
            r1 = r2 = ""
        print(
            f"{field:<32}{fmt(tv, decimals):>12}{fmt(tuned, decimals):>12}{fmt(v1, decimals):>14}{fmt(v2, decimals):>14}"
            f"   {orient or '':<5}{r1:>9}{r2:>9}".rstrip()
        )
    if broker == "redis":
        calls = t.get("redis_script_calls_per_message")
        usec = t.get("redis_server_usec_per_message")
        evalsha = raw.get("redis", {}).get("evalsha_per_sec")
        print(f"{'redis_script_calls_per_message':<32}{fmt(calls):>12}")
        print(f"{'redis_server_usec_per_message':<32}{fmt(usec):>12}")
        limit = evalsha / calls if isinstance(evalsha, (int, float)) and isinstance(calls, (int, float)) and calls else None
        share = "-"
        process = t.get("process_per_sec")
        if limit and isinstance(process, (int, float)):
            share = f"{100 * process / limit:.1f}%"
        print(f"{'server limit / calls per message':<32}{fmt(None if limit is None else round(limit)):>12}"
              f"   (EVALSHA {fmt(evalsha)}/s / {fmt(calls)} calls per message)")
        print(f"{'troupe process_per_sec of limit':<32}{share:>12}")

sends = {b: load(f"sends-troupe-{b}") for b in ("redis", "rabbitmq", "postgres")}
if any(sends.values()):
    print()
    print("== concurrent single sends (troupe-bench --senders) " + "=" * 47)
    print(f"{'broker':<12}{'senders':>9}{'enqueue_per_sec':>17}")
    for b, r in sends.items():
        print(f"{b:<12}{fmt(r.get('senders')):>9}{fmt(r.get('enqueue_per_sec')):>17}")

io = {"troupe": load("io-troupe-redis"), "troupe (mimalloc)": load("io-troupe-mimalloc-redis")}
for threads in (8, 64, 256):
    io[f"dramatiq 2x{threads}"] = load(f"io-dramatiq-redis-2x{threads}")
if any(io.values()):
    print()
    print("== io scenario on redis (each message awaits 50 ms) " + "=" * 47)
    rates = {k: v.get("process_per_sec") for k, v in io.items() if isinstance(v.get("process_per_sec"), (int, float))}
    best = max((v for k, v in rates.items() if not k.startswith("troupe")), default=None)
    print(f"{'run':<20}{'concurrency':>12}{'messages':>10}{'process_per_sec':>17}{'worker_rss_peak_kib':>21}{'lost':>6}{'dup':>6}")
    for name, r in io.items():
        conc = r.get("concurrency") or (r.get("processes", 0) * r.get("threads", 0) or None)
        print(f"{name:<20}{fmt(conc):>12}{fmt(r.get('messages')):>10}{fmt(r.get('process_per_sec')):>17}"
              f"{fmt(r.get('worker_rss_peak_kib')):>21}{fmt(r.get('lost')):>6}{fmt(r.get('duplicates')):>6}")
    print(f"{'troupe / best dramatiq':<20}{'':>22}{ratio(rates.get('troupe'), best):>17}")
    print(f"{'mimalloc / best':<20}{'':>22}{ratio(rates.get('troupe (mimalloc)'), best):>17}")

deep = {}
for b in ("redis", "rabbitmq"):
    runs = sorted(
        (r for r in (load(p.stem) for p in out.glob(f"deep-troupe-{b}-*.json")) if r),
        key=lambda r: r.get("messages", 0),
    )
    if runs:
        deep[b] = runs
if deep:
    print()
    print("== deep backlogs (troupe-bench --memory-backlog: one worker process at the defaults) " + "=" * 15)
    print(f"{'broker':<10}{'messages':>10}{'fill_per_sec':>14}{'drain_per_sec':>15}{'vs smallest':>13}"
          f"{'worker_rss_peak_mb':>20}{'producer_rss_peak_mb':>22}")
    for b, runs in deep.items():
        base = runs[0].get("drain_per_sec")
        for r in runs:
            print(f"{b:<10}{fmt(r.get('messages')):>10}{fmt(r.get('fill_per_sec')):>14}{fmt(r.get('drain_per_sec')):>15}"
                  f"{ratio(r.get('drain_per_sec'), base):>13}{fmt(r.get('worker_rss_peak_mb')):>20}"
                  f"{fmt(r.get('producer_rss_peak_mb')):>22}")

fair = {b: load(f"fair-troupe-{b}") for b in ("redis", "rabbitmq", "postgres", "sqlite")}
if any(fair.values()):
    print()
    print("== fairness (troupe-bench --fairness-backlog: 9 quiet queues beside one backlog) " + "=" * 18)
    print(f"{'broker':<10}{'backlog':>10}{'samples':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'backlog_per_sec':>17}{'left':>10}{'lost':>6}")
    for b, r in fair.items():
        print(f"{b:<10}{fmt(r.get('backlog')):>10}{fmt(r.get('trickle_samples')):>9}{fmt(r.get('trickle_ms_p50'), 2):>9}"
              f"{fmt(r.get('trickle_ms_p99'), 2):>9}{fmt(r.get('trickle_ms_max'), 2):>9}{fmt(r.get('backlog_per_sec')):>17}"
              f"{fmt(r.get('backlog_left')):>10}{fmt(r.get('lost')):>6}")

print()
print("Raw limits (bench/raw_limits.sh):")
for line in raw_lines or ["-"]:
    print("  " + line)
PYEOF
echo "JSON of every run: $out"
