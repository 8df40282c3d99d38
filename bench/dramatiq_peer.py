"""Python Dramatiq side of Troupe's benchmark: the same no-op scenario on the same Redis or RabbitMQ.

    python bench/dramatiq_peer.py --url redis://127.0.0.1:6379/0 --messages 20000 --processes 2 --threads 8
    python bench/dramatiq_peer.py --broker rabbitmq --url 'amqp://guest:guest@127.0.0.1:5672/%2f' \
        --messages 20000 --processes 2 --threads 8

Enqueues N no-op messages one by one (timed), then starts Dramatiq's own CLI worker
(`dramatiq bench.dramatiq_peer -p P -t T`) and times the drain. Prints one JSON object. Our own
code; it only drives the dramatiq package.

Drain detection:
- Redis: until the queue and its in-flight hash are empty.
- RabbitMQ (`RabbitmqBroker(url=..., confirm_delivery=True)`, as Troupe's bench publishes with
  confirms): AMQP shows no unacked count, so each worker process counts the messages its actor
  ran and a thread of its own adds that count to a Redis key (`INCRBY` every 10 ms, off the
  actor's path), and the drain ends once that count reaches N and a passive declare shows the
  queue empty. The count also tells whether a message ran twice. The queue is unique per run and
  deleted (with its .DQ and .XQ) at the end.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

BROKER = os.environ.get("BENCH_BROKER", "redis")
URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("BENCH_NAMESPACE", "dramatiq-bench")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
COUNTER_URL = os.environ.get("BENCH_COUNTER_URL", "redis://127.0.0.1:6379/0")
COUNTER_KEY = os.environ.get("BENCH_COUNTER_KEY", "dramatiq-bench:done")


def rabbitmq_broker(url):
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    return RabbitmqBroker(url=url, confirm_delivery=True)


if BROKER == "rabbitmq":
    broker = rabbitmq_broker(AMQP_URL)
else:
    broker = RedisBroker(url=URL, namespace=NAMESPACE)
dramatiq.set_broker(broker)

# RabbitMQ: the messages this process ran, added to COUNTER_KEY by a flusher thread.
_done = [0]
_lock = threading.Lock()
_flusher = []


def _flush_forever():
    client = redis.Redis.from_url(COUNTER_URL)
    flushed = 0
    while True:
        time.sleep(0.01)
        with _lock:
            done = _done[0]
        if done > flushed:
            client.incrby(COUNTER_KEY, done - flushed)
            flushed = done


def _count():
    with _lock:
        _done[0] += 1
        if not _flusher:
            thread = threading.Thread(target=_flush_forever, daemon=True)
            thread.start()
            _flusher.append(thread)


if BROKER == "rabbitmq":

    @dramatiq.actor(queue_name=QUEUE, max_retries=0)
    def noop(n):
        _count()

else:

    @dramatiq.actor(queue_name="bench", max_retries=0)
    def noop(n):
        pass


def run_worker(args, env):
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    cli = [sys.executable, "-m", "dramatiq", "bench.dramatiq_peer", "-p", str(args.processes), "-t", str(args.threads)]
    return subprocess.Popen(cli, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_worker(worker):
    worker.terminate()
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()


def main_redis(args):
    namespace = "dramatiq-bench-" + uuid.uuid4().hex[:8]
    env = dict(os.environ, BENCH_BROKER="redis", BENCH_REDIS_URL=args.url, BENCH_NAMESPACE=namespace)
    local = RedisBroker(url=args.url, namespace=namespace)
    actor = dramatiq.actor(noop.fn, actor_name="noop", queue_name="bench", broker=local, max_retries=0)
    started = time.perf_counter()
    for n in range(args.messages):
        actor.send(n)
    enqueue_secs = time.perf_counter() - started

    started = time.perf_counter()
    worker = run_worker(args, env)
    client = redis.Redis.from_url(args.url)
    try:
        while True:
            pending = client.llen(f"{namespace}:bench") + client.hlen(f"{namespace}:bench.msgs")
            if pending == 0:
                break
            if worker.poll() is not None:
                raise SystemExit("the dramatiq worker exited early")
            time.sleep(0.005)
        drain_secs = time.perf_counter() - started
    finally:
        stop_worker(worker)
        for key in client.scan_iter(f"{namespace}:*"):
            client.delete(key)
    return {"enqueue_secs": enqueue_secs, "drain_secs": drain_secs}


def main_rabbitmq(args):
    import pika

    run = uuid.uuid4().hex[:8]
    queue = f"dramatiq_bench_{run}"
    counter_key = f"dramatiq-bench-{run}:done"
    env = dict(
        os.environ,
        BENCH_BROKER="rabbitmq",
        BENCH_AMQP_URL=args.url,
        BENCH_QUEUE=queue,
        BENCH_COUNTER_URL=args.counter_url,
        BENCH_COUNTER_KEY=counter_key,
    )
    local = rabbitmq_broker(args.url)
    actor = dramatiq.actor(noop.fn, actor_name="noop", queue_name=queue, broker=local, max_retries=0)
    counter = redis.Redis.from_url(args.counter_url)
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    try:
        started = time.perf_counter()
        for n in range(args.messages):
            actor.send(n)
        enqueue_secs = time.perf_counter() - started
        local.close()

        started = time.perf_counter()
        worker = run_worker(args, env)
        try:
            while True:
                done = int(counter.get(counter_key) or 0)
                if done >= args.messages:
                    ready = channel.queue_declare(queue, passive=True).method.message_count
                    if ready == 0:
                        break
                if worker.poll() is not None:
                    raise SystemExit("the dramatiq worker exited early")
                time.sleep(0.005)
            drain_secs = time.perf_counter() - started
            # Anything run twice shows up as a count above N (no message fails here).
            time.sleep(0.05)
            processed = int(counter.get(counter_key) or 0)
        finally:
            stop_worker(worker)
    finally:
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            channel.queue_delete(name)
        connection.close()
        counter.delete(counter_key)
    return {
        "broker": "rabbitmq",
        "enqueue_secs": enqueue_secs,
        "drain_secs": drain_secs,
        "processed": processed,
        "duplicates": max(0, processed - args.messages),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("--url", help="default redis://127.0.0.1:6379/0, or amqp://guest:guest@127.0.0.1:5672/%%2f")
    parser.add_argument(
        "--counter-url",
        default="redis://127.0.0.1:6379/0",
        help="RabbitMQ: the Redis that counts the messages run (drain detection)",
    )
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    if args.broker == "rabbitmq":
        args.url = args.url or "amqp://guest:guest@127.0.0.1:5672/%2f"
        report = main_rabbitmq(args)
    else:
        args.url = args.url or "redis://127.0.0.1:6379/0"
        report = main_redis(args)
    enqueue_secs = report.pop("enqueue_secs")
    drain_secs = report.pop("drain_secs")
    print(
        json.dumps(
            {
                "implementation": "dramatiq " + dramatiq.__version__,
                **report,
                "messages": args.messages,
                "processes": args.processes,
                "threads": args.threads,
                "enqueue_per_sec": round(args.messages / enqueue_secs),
                "process_per_sec": round(args.messages / drain_secs),
                "note": "process time includes the CLI's start-up",
            }
        )
    )


if __name__ == "__main__":
    main()
