"""The Python Dramatiq peer of Troupe's interoperability tests (tests/interop/main.rs).

Runs under the venv that scripts/services.sh makes (dramatiq 2.2.1 with redis):

    peer.py send ACTOR --args JSON [--kwargs JSON] [--delay-ms N] [--queue Q]
    peer.py send-batch              < JSON lines {"actor", "args", "kwargs", "delay_ms", "queue"}
    peer.py worker [--seconds N | --until-empty QUEUE]
    peer.py get-result MESSAGE_JSON... [--timeout-ms N]
    peer.py dlq QUEUE

Every command takes --url (default redis://127.0.0.1:6379/0) and --namespace (default
"dramatiq"). Output is JSON on stdout, one document per line.

The actors are those of examples/interop.rs: add(a, b), echo(value), fail_always() and
sleep_ms(ms). Each records what it received; `worker` prints those records when it stops.
"""

import argparse
import json
import sys
import threading
import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.errors import QueueJoinTimeout
from dramatiq.middleware import CurrentMessage
from dramatiq.results import Results, ResultFailure, ResultMissing, ResultTimeout
from dramatiq.results.backends import RedisBackend

RECEIVED = []
_LOCK = threading.Lock()


def record(actor, **received):
    message = CurrentMessage.get_current_message()
    with _LOCK:
        RECEIVED.append(
            {
                "actor": actor,
                "message_id": message.message_id if message else None,
                "queue_name": message.queue_name if message else None,
                "retries": message.options.get("retries", 0) if message else None,
                "received": received,
                "types": {k: type(v).__name__ for k, v in received.items()},
                "at_ms": int(time.time() * 1000),
            }
        )


def setup(url, namespace):
    broker = RedisBroker(url=url, namespace=namespace)
    backend = RedisBackend(url=url)
    broker.add_middleware(Results(backend=backend))
    broker.add_middleware(CurrentMessage())
    dramatiq.set_broker(broker)

    @dramatiq.actor(store_results=True)
    def add(a, b):
        record("add", a=a, b=b)
        return a + b

    @dramatiq.actor(store_results=True)
    def echo(value):
        record("echo", value=value)
        return value

    @dramatiq.actor(store_results=True, max_retries=2, min_backoff=100, max_backoff=1000)
    def fail_always():
        record("fail_always")
        raise ValueError("fail_always always fails")

    @dramatiq.actor(store_results=True)
    def sleep_ms(ms):
        record("sleep_ms", ms=ms)
        time.sleep(ms / 1000)
        return ms

    actors = {"add": add, "echo": echo, "fail_always": fail_always, "sleep_ms": sleep_ms}
    return broker, backend, actors


def emit(document):
    print(json.dumps(document), flush=True)


def send_one(broker, actors, actor, args, kwargs=None, delay_ms=None, queue=None):
    if actor not in actors:
        raise SystemExit(f"peer.py: unknown actor {actor!r}; known: {sorted(actors)}")
    message = actors[actor].message_with_options(args=tuple(args), kwargs=kwargs or {})
    if queue:
        broker.declare_queue(queue)
        message = message.copy(queue_name=queue)
    enqueued = broker.enqueue(message, delay=delay_ms)
    emit(enqueued.asdict())


def cmd_send(broker, backend, actors, opts):
    send_one(broker, actors, opts.actor, json.loads(opts.args), json.loads(opts.kwargs), opts.delay_ms, opts.queue)


def cmd_send_batch(broker, backend, actors, opts):
    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        send_one(
            broker,
            actors,
            spec["actor"],
            spec.get("args", []),
            spec.get("kwargs"),
            spec.get("delay_ms"),
            spec.get("queue"),
        )


def cmd_worker(broker, backend, actors, opts):
    if opts.until_empty:
        broker.declare_queue(opts.until_empty)
    worker = dramatiq.Worker(broker, worker_threads=4, worker_timeout=100)
    worker.start()
    emit({"started": True})
    try:
        if opts.until_empty:
            timeout = int(opts.seconds * 1000) if opts.seconds else None
            try:
                broker.join(opts.until_empty, interval=50, timeout=timeout)
            except QueueJoinTimeout:
                print(f"peer.py: {opts.until_empty} did not drain in {opts.seconds} s", file=sys.stderr)
        else:
            time.sleep(opts.seconds or 0)
    finally:
        worker.stop(timeout=10000)
    with _LOCK:
        for received in RECEIVED:
            emit(received)


def cmd_get_result(broker, backend, actors, opts):
    for text in opts.messages:
        message = dramatiq.Message(**json.loads(text))
        try:
            value = message.get_result(backend=backend, block=True, timeout=opts.timeout_ms)
            emit({"ok": value})
        except ResultFailure as e:
            emit(
                {
                    "error": {
                        "type": type(e).__name__,
                        "message": str(e),
                        "orig_exc_type": e.orig_exc_type,
                        "orig_exc_msg": e.orig_exc_msg,
                    }
                }
            )
        except (ResultMissing, ResultTimeout) as e:
            emit({"error": {"type": type(e).__name__, "message": str(e)}})


def cmd_dlq(broker, backend, actors, opts):
    xq = f"{broker.namespace}:{opts.queue}.XQ"
    entries = broker.client.zrange(xq, 0, -1, withscores=True)
    rids = [rid for rid, _ in entries]
    bodies = broker.client.hmget(f"{xq}.msgs", rids) if rids else []
    letters = []
    for (rid, score), body in zip(entries, bodies):
        # Decoded as a Dramatiq worker decodes (its encoder; any unknown key is an error).
        message = dramatiq.Message.decode(body) if body is not None else None
        letters.append(
            {
                "rid": rid.decode(),
                "failed_at": int(score),
                "message": message.asdict() if message else None,
            }
        )
    emit(letters)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="redis://127.0.0.1:6379/0")
    common.add_argument("--namespace", default="dramatiq")
    sub = parser.add_subparsers(dest="command", required=True)

    send = sub.add_parser("send", parents=[common], help="enqueue one message")
    send.add_argument("actor")
    send.add_argument("--args", default="[]", help="positional arguments, a JSON array")
    send.add_argument("--kwargs", default="{}", help="keyword arguments, a JSON object")
    send.add_argument("--delay-ms", type=int)
    send.add_argument("--queue")
    send.set_defaults(run=cmd_send)

    batch = sub.add_parser("send-batch", parents=[common], help="enqueue one message per JSON line of stdin")
    batch.set_defaults(run=cmd_send_batch)

    worker = sub.add_parser("worker", parents=[common], help="run a worker in this process")
    worker.add_argument("--seconds", type=float, help="run this long (with --until-empty: at most this long)")
    worker.add_argument("--until-empty", metavar="QUEUE", help="stop once QUEUE has nothing queued or in flight")
    worker.set_defaults(run=cmd_worker)

    get = sub.add_parser("get-result", parents=[common], help="read stored results")
    get.add_argument("messages", nargs="+", metavar="MESSAGE_JSON")
    get.add_argument("--timeout-ms", type=int, default=10000)
    get.set_defaults(run=cmd_get_result)

    dlq = sub.add_parser("dlq", parents=[common], help="list the dead letters of QUEUE")
    dlq.add_argument("queue")
    dlq.set_defaults(run=cmd_dlq)

    opts = parser.parse_args()
    if opts.command == "worker" and not (opts.seconds or opts.until_empty):
        parser.error("worker needs --seconds N or --until-empty QUEUE")
    broker, backend, actors = setup(opts.url, opts.namespace)
    try:
        opts.run(broker, backend, actors, opts)
    finally:
        broker.close()


if __name__ == "__main__":
    main()
