"""Python Dramatiq side of Troupe's benchmark: the same no-op scenario on the same Redis.

    python bench/dramatiq_peer.py --url redis://127.0.0.1:6379/0 --messages 20000 --processes 2 --threads 8

Enqueues N no-op messages one by one (timed), then starts Dramatiq's own CLI worker
(`dramatiq bench.dramatiq_peer -p P -t T`) and times the drain until the queue and its in-flight
hash are empty. Prints one JSON object. Our own code; it only drives the dramatiq package.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import uuid

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("BENCH_NAMESPACE", "dramatiq-bench")
broker = RedisBroker(url=URL, namespace=NAMESPACE)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench", max_retries=0)
def noop(n):
    pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    namespace = "dramatiq-bench-" + uuid.uuid4().hex[:8]
    env = dict(os.environ, BENCH_REDIS_URL=args.url, BENCH_NAMESPACE=namespace)
    local = RedisBroker(url=args.url, namespace=namespace)
    actor = dramatiq.actor(noop.fn, actor_name="noop", queue_name="bench", broker=local, max_retries=0)
    started = time.perf_counter()
    for n in range(args.messages):
        actor.send(n)
    enqueue_secs = time.perf_counter() - started

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    cli = [sys.executable, "-m", "dramatiq", "bench.dramatiq_peer", "-p", str(args.processes), "-t", str(args.threads)]
    started = time.perf_counter()
    worker = subprocess.Popen(cli, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        for key in client.scan_iter(f"{namespace}:*"):
            client.delete(key)
    print(json.dumps({
        "implementation": "dramatiq " + dramatiq.__version__,
        "messages": args.messages,
        "processes": args.processes,
        "threads": args.threads,
        "enqueue_per_sec": round(args.messages / enqueue_secs),
        "process_per_sec": round(args.messages / drain_secs),
        "note": "process time includes the CLI's start-up",
    }))


if __name__ == "__main__":
    main()
