"""Python Dramatiq side of Troupe's benchmark: the same no-op scenario on the same Redis or RabbitMQ.

    python bench/dramatiq_peer.py --url redis://127.0.0.1:6379/0 --messages 20000 --processes 2 --threads 8
    python bench/dramatiq_peer.py --broker rabbitmq --url 'amqp://guest:guest@127.0.0.1:5672/%2f' \
        --messages 20000 --processes 2 --threads 8
    # quick check:
    python bench/dramatiq_peer.py --messages 2000 --steady-secs 2 --rate 500 --latency-samples 20

Our own code; it only drives the dramatiq package (run it with the venv that
scripts/services.sh's ensure_dramatiq_venv makes). Prints one JSON object with the fields
troupe-bench reports, phase by phase:

1. Enqueue: N no-op messages to the `noop` actor, one `send` at a time (timed):
   `enqueue_per_sec`. Dramatiq has no batch-enqueue API (a group or pipeline also sends its
   messages one by one), so `enqueue_batched_per_sec` is null.
2. Burn-down: start Dramatiq's own CLI worker (`python -m dramatiq bench.dramatiq_peer -p P -t T`)
   and time until every message ran: `process_per_sec` (includes the CLI's start-up). Each worker
   process notes the numbers its `noop` actor ran; `lost` (numbers that never ran) and
   `duplicates` (runs beyond one per number) check exactly-once delivery.
3. Steady state, the same worker still running: `--rate` messages/s for `--steady-secs` seconds
   to a second actor, `stamp`, on a queue of its own. Message i carries its scheduled send time
   (t0 + i/rate, epoch microseconds) and the actor takes (now - scheduled) as its first
   statement, so a sender that falls behind is charged for it (no coordinated omission).
   `--sender-threads` threads (default 8) share the schedule, each with its connection opened
   before the clock starts: with publisher confirms one RabbitMQ publish waits for the server's
   disk sync (a few ms), so one thread cannot keep 1000/s. `latency_offered_per_sec` (the rate
   asked for), `latency_sent_per_sec` (what the senders achieved), `sender_lag_ms_p50/p99` (how
   late the sends started against their schedule: large means the figures measure the sender,
   not the worker), `latency_ms_p50/p90/p99/max`.
   On Redis, Dramatiq's consumer of an idle queue polls with an exponential back-off of up to
   the worker timeout (1 s), so the `stamp` queue, idle during the burn-down, starts the phase
   with up to a second of backlog; in short phases that start shows in p90 and above.
4. Idle pick-up: `--latency-samples` times, 20 ms of idle then one `stamp` message carrying its
   send time (taken just before `send`): `idle_pickup_ms_p50/p99/max`.
5. Memory: `worker_rss_idle_kib` is the sum of VmRSS over the CLI's process and all its
   descendants (the worker processes), read right after phase 4 with the worker idle;
   `worker_rss_peak_kib` is the sum of their VmHWM at that point (the peak of each process).

Percentiles use the same nearest-rank rule as troupe-bench (index round((n-1)p) of the sorted
samples), in ms with 2 decimals.

How numbers get out of the worker processes: each process appends to in-memory lists (under a
lock, no I/O on the actor's path) and a daemon thread of its own flushes them to Redis
(--counter-url, db 0 by default) every 5 ms: SADD of the `noop` numbers to `<run>:seen`, INCRBY
of their count to `<run>:runs`, RPUSH of the `stamp` latencies (µs) to `<run>:lat`.

Drain detection:
- Redis: until the queue and its in-flight hash (`<ns>:bench.msgs`) are empty.
- RabbitMQ (`RabbitmqBroker(url=..., confirm_delivery=True)`, as Troupe's bench publishes with
  confirms): AMQP shows no unacked count, so the drain ends once `<run>:runs` reaches N and a
  passive declare shows the queue empty.
Queues (RabbitMQ, with their .DQ and .XQ), the Redis namespace and the `<run>:*` keys are unique
per run and deleted at the end.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

# Settings for the worker processes, which import this module through the CLI; the driver
# (main()) passes them in the environment.
BROKER = os.environ.get("BENCH_BROKER", "redis")
URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("BENCH_NAMESPACE", "dramatiq-bench")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
LATENCY_QUEUE = os.environ.get("BENCH_LATENCY_QUEUE", "bench_latency")
COUNTER_URL = os.environ.get("BENCH_COUNTER_URL", "redis://127.0.0.1:6379/0")
KEY_PREFIX = os.environ.get("BENCH_KEY_PREFIX", "dramatiq-bench")
# The io scenario: the `noop` actor blocks this long (a stand-in for an HTTP call), ms.
IO_MS = float(os.environ.get("BENCH_IO_MS", "0"))

FLUSH_SECS = 0.005


def rabbitmq_broker(url):
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    return RabbitmqBroker(url=url, confirm_delivery=True)


if BROKER == "rabbitmq":
    broker = rabbitmq_broker(AMQP_URL)
else:
    broker = RedisBroker(url=URL, namespace=NAMESPACE)
dramatiq.set_broker(broker)

# What this process's actors ran, moved to Redis by a flusher thread (started on first use, so
# nothing runs in a process that only imports the module).
_pending = {"seen": [], "lat": []}
_lock = threading.Lock()
_flusher = []


def _flush_forever():
    client = redis.Redis.from_url(COUNTER_URL)
    while True:
        time.sleep(FLUSH_SECS)
        with _lock:
            seen, lat = _pending["seen"], _pending["lat"]
            if not seen and not lat:
                continue
            _pending["seen"], _pending["lat"] = [], []
        pipe = client.pipeline(transaction=False)
        if seen:
            pipe.sadd(f"{KEY_PREFIX}:seen", *seen)
            pipe.incrby(f"{KEY_PREFIX}:runs", len(seen))
        if lat:
            pipe.rpush(f"{KEY_PREFIX}:lat", *lat)
        pipe.execute()


def _record(kind, value):
    if not _flusher:
        with _lock:
            if not _flusher:
                thread = threading.Thread(target=_flush_forever, daemon=True)
                thread.start()
                _flusher.append(thread)
    with _lock:
        _pending[kind].append(value)


def now_us():
    return time.time_ns() // 1000


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop(n):
    if IO_MS:
        time.sleep(IO_MS / 1000)
    _record("seen", n)


@dramatiq.actor(queue_name=LATENCY_QUEUE, max_retries=0)
def stamp(scheduled_us):
    # First statement: the latency is taken when the actor starts.
    late_us = now_us() - scheduled_us
    _record("lat", late_us)


# --- driver -------------------------------------------------------------------------------


def run_worker(args, env, log):
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    cli = [sys.executable, "-m", "dramatiq", "bench.dramatiq_peer", "-p", str(args.processes), "-t", str(args.threads)]
    return subprocess.Popen(cli, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=log)


def stop_worker(worker):
    worker.terminate()
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def check_alive(worker, log):
    if worker.poll() is not None:
        log.flush()
        log.seek(0)
        tail = log.read().decode(errors="replace").strip().splitlines()[-15:]
        raise SystemExit("the dramatiq worker exited early:\n" + "\n".join(tail))


def process_tree(root):
    """The pid `root` and all its descendants, from the ppid field of /proc/*/stat."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: split after the last ')'.
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def memory_kib(pids):
    """Sums of VmRSS and VmHWM (KiB) over `pids`."""
    rss = hwm = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        except OSError:
            pass
    return rss, hwm


def percentile(sorted_ms, p):
    """Nearest rank, as troupe-bench: index round((n-1)p)."""
    if not sorted_ms:
        return None
    return round(sorted_ms[round((len(sorted_ms) - 1) * p)], 2)


def steady_state(send, prepare, rate, secs, sender_threads):
    """Sends int(rate*secs) messages on the schedule t0 + i/rate.

    Returns (sent, send_secs, lags): lags are how late each send started against its schedule
    (ms), to tell a sender that fell behind from a slow worker.

    Each thread first runs `prepare` (opens its connection) and the schedule starts once all
    are ready, so connection set-up is not charged to the first messages.
    """
    total = int(rate * secs)
    ready = threading.Barrier(sender_threads + 1)
    start = {}
    errors = []
    lags = []

    def sender(k):
        try:
            prepare()
        except Exception as e:
            errors.append(e)
        ready.wait()
        if errors:
            return
        t0_us = start["t0_us"]
        try:
            for i in range(k, total, sender_threads):
                due_us = t0_us + i * 1_000_000 // rate
                wait = (due_us - now_us()) / 1e6
                if wait > 0:
                    time.sleep(wait)
                lags.append((now_us() - due_us) / 1000)  # list.append is atomic
                send(due_us)
        except Exception as e:  # reported below, after the other threads finish
            errors.append(e)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(sender_threads)]
    for t in threads:
        t.start()
    start["t0_us"] = now_us() + 20_000  # set before the threads pass the barrier
    ready.wait()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"a steady-state sender failed: {errors[0]!r}")
    return total, max(1e-9, (now_us() - start["t0_us"]) / 1e6), sorted(lags)


def run(args):
    run_id = uuid.uuid4().hex[:8]
    prefix = f"dramatiq-bench-{run_id}"
    if args.broker == "redis":
        namespace = prefix
        queue, latency_queue = "bench", "bench_latency"

        def make_broker():
            return RedisBroker(url=args.url, namespace=namespace)

        env = dict(os.environ, BENCH_BROKER="redis", BENCH_REDIS_URL=args.url, BENCH_NAMESPACE=namespace)
    else:
        import pika

        queue = f"dramatiq_bench_{run_id}"
        latency_queue = f"{queue}_latency"

        def make_broker():
            return rabbitmq_broker(args.url)

        env = dict(os.environ, BENCH_BROKER="rabbitmq", BENCH_AMQP_URL=args.url)
    env.update(
        BENCH_QUEUE=queue,
        BENCH_LATENCY_QUEUE=latency_queue,
        BENCH_COUNTER_URL=args.counter_url,
        BENCH_KEY_PREFIX=prefix,
        BENCH_IO_MS=str(args.io_ms),
    )
    counter = redis.Redis.from_url(args.counter_url)
    seen_key, runs_key, lat_key = f"{prefix}:seen", f"{prefix}:runs", f"{prefix}:lat"
    report = {"broker": args.broker}

    if args.broker == "redis":
        client = redis.Redis.from_url(args.url)

        def drained():
            return client.llen(f"{namespace}:{queue}") + client.hlen(f"{namespace}:{queue}.msgs") == 0

    else:
        connection = pika.BlockingConnection(pika.URLParameters(args.url))
        channel = connection.channel()

        def drained():
            if int(counter.get(runs_key) or 0) < args.messages:
                return False
            return channel.queue_declare(queue, passive=True).method.message_count == 0

    producer = make_broker()
    worker = None
    log = tempfile.TemporaryFile()
    try:
        # 1. Enqueue, one by one.
        noop_actor = dramatiq.actor(noop.fn, actor_name="noop", queue_name=queue, broker=producer, max_retries=0)
        started = time.perf_counter()
        for n in range(args.messages):
            noop_actor.send(n)
        enqueue_secs = time.perf_counter() - started
        if args.broker == "rabbitmq":
            # Its connection would sit idle (no heartbeats) through the drain.
            producer.close()

        # 2. Burn-down.
        started = time.perf_counter()
        worker = run_worker(args, env, log)
        while not drained():
            check_alive(worker, log)
            time.sleep(0.005)
        drain_secs = time.perf_counter() - started
        # Let the flushers catch up, then a little longer for any late duplicate.
        deadline = time.monotonic() + 5
        while counter.scard(seen_key) < args.messages and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        distinct = counter.scard(seen_key)
        runs = int(counter.get(runs_key) or 0)
        report.update(
            enqueue_per_sec=round(args.messages / enqueue_secs),
            enqueue_batched_per_sec=None,
            process_per_sec=round(args.messages / drain_secs),
            processed=runs,
            lost=args.messages - distinct,
            duplicates=runs - distinct,
        )

        # 3. Steady state, with a producer of its own (for RabbitMQ, fresh connections).
        if args.broker == "rabbitmq":
            producer = make_broker()
        stamp_actor = dramatiq.actor(
            stamp.fn, actor_name="stamp", queue_name=latency_queue, broker=producer, max_retries=0
        )
        report["latency_offered_per_sec"] = args.rate if args.steady_secs > 0 else None
        latency = {}
        if args.steady_secs > 0 and args.rate > 0:
            if args.broker == "rabbitmq":
                # Opens this thread's connection and confirm-mode channel, and declares the
                # queue from the main thread once, before any sender needs it.
                def prepare():
                    producer.channel

                producer.declare_queue(latency_queue, ensure=True)
            else:

                def prepare():
                    pass

            sent, send_secs, lags = steady_state(
                stamp_actor.send, prepare, args.rate, args.steady_secs, args.sender_threads
            )
            deadline = time.monotonic() + max(30.0, 4 * args.steady_secs)
            while counter.llen(lat_key) < sent and time.monotonic() < deadline:
                check_alive(worker, log)
                time.sleep(0.01)
            pipe = counter.pipeline(transaction=True)
            pipe.lrange(lat_key, 0, -1)
            pipe.delete(lat_key)
            got = sorted(int(v) / 1000 for v in pipe.execute()[0])
            latency = {
                "latency_sent_per_sec": round(sent / send_secs),
                "sender_lag_ms_p50": percentile(lags, 0.50),
                "sender_lag_ms_p99": percentile(lags, 0.99),
                "latency_samples": len(got),
                "latency_missing": sent - len(got),
                "latency_ms_p50": percentile(got, 0.50),
                "latency_ms_p90": percentile(got, 0.90),
                "latency_ms_p99": percentile(got, 0.99),
                "latency_ms_max": percentile(got, 1.0),
            }
        report.update(
            {
                k: latency.get(k)
                for k in (
                    "latency_sent_per_sec",
                    "sender_lag_ms_p50",
                    "sender_lag_ms_p99",
                    "latency_samples",
                    "latency_missing",
                    "latency_ms_p50",
                    "latency_ms_p90",
                    "latency_ms_p99",
                    "latency_ms_max",
                )
            }
        )

        # 4. Idle pick-up.
        pickups = []
        for _ in range(args.latency_samples):
            time.sleep(0.02)
            stamp_actor.send(now_us())
            item = counter.blpop([lat_key], timeout=10)
            if item is None:
                check_alive(worker, log)
                raise SystemExit("an idle pick-up probe was not picked up within 10 s")
            pickups.append(int(item[1]) / 1000)
        pickups.sort()
        report.update(
            idle_pickup_samples=len(pickups),
            idle_pickup_ms_p50=percentile(pickups, 0.50),
            idle_pickup_ms_p99=percentile(pickups, 0.99),
            idle_pickup_ms_max=percentile(pickups, 1.0),
        )

        # 5. Memory, the worker idle.
        if not pickups:
            time.sleep(0.2)
        check_alive(worker, log)
        pids = process_tree(worker.pid)
        rss, hwm = memory_kib(pids)
        report.update(worker_rss_idle_kib=rss, worker_rss_peak_kib=hwm, worker_process_count=len(pids))
    finally:
        if worker is not None:
            stop_worker(worker)
        log.close()
        if args.broker == "rabbitmq":
            try:
                producer.close()
            except Exception:
                pass
            try:
                connection.close()
            except Exception:
                pass  # idle since the drain: the server may have dropped it
            # A fresh connection for the clean-up.
            cleanup = pika.BlockingConnection(pika.URLParameters(args.url))
            cleanup_channel = cleanup.channel()
            for name in (queue, latency_queue):
                for suffix in ("", ".DQ", ".XQ"):
                    cleanup_channel.queue_delete(name + suffix)
            cleanup.close()
        else:
            for key in client.scan_iter(f"{namespace}:*"):
                client.delete(key)
        for key in counter.scan_iter(f"{prefix}:*"):
            counter.delete(key)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("--url", help="default redis://127.0.0.1:6379/0, or amqp://guest:guest@127.0.0.1:5672/%%2f")
    parser.add_argument(
        "--counter-url",
        default="redis://127.0.0.1:6379/0",
        help="the Redis that collects what the workers ran and the latencies",
    )
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rate", type=int, default=1000, help="steady-state offered load, messages/s")
    parser.add_argument("--steady-secs", type=float, default=5.0, help="steady-state length (0: skip)")
    parser.add_argument("--sender-threads", type=int, default=8, help="threads sharing the steady-state schedule")
    parser.add_argument("--latency-samples", type=int, default=200, help="idle pick-up samples (0: skip)")
    parser.add_argument(
        "--io-ms",
        type=float,
        default=0,
        help="the io scenario: each burn-down message blocks its thread this long (time.sleep), a stand-in for an HTTP call",
    )
    args = parser.parse_args()
    if args.broker == "rabbitmq":
        args.url = args.url or "amqp://guest:guest@127.0.0.1:5672/%2f"
    else:
        args.url = args.url or "redis://127.0.0.1:6379/0"
    report = run(args)
    if report["lost"] or report["duplicates"]:
        print(f"dramatiq_peer.py: the exactly-once check failed: {report}", file=sys.stderr)
    print(
        json.dumps(
            {
                "implementation": "dramatiq " + dramatiq.__version__,
                "messages": args.messages,
                "processes": args.processes,
                "threads": args.threads,
                "scenario": "io" if args.io_ms else "noop",
                "io_ms": args.io_ms,
                **report,
                "note": "process time includes the CLI's start-up; Dramatiq has no batch enqueue",
            }
        )
    )


if __name__ == "__main__":
    main()
