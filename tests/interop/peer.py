"""The Python Dramatiq peer of Troupe's interoperability tests (tests/interop/main.rs).

Runs under the venv that scripts/services.sh makes (dramatiq 2.2.1 with redis and pika,
dramatiq-abort 1.2.1):

    peer.py send ACTOR --args JSON [--kwargs JSON] [--options JSON] [--delay-ms N] [--queue Q]
    peer.py send-batch              < JSON lines {"actor", "args", "kwargs", "options", "delay_ms", "queue"}
    peer.py worker [--seconds N | --until-empty QUEUE [--expect N]] [--threads N] [--prefetch N]
                   [--print-starts]
    peer.py get-result MESSAGE_JSON... [--timeout-ms N]
    peer.py dlq QUEUE
    peer.py declare QUEUE
    peer.py abort MESSAGE_ID [--mode abort|cancel]        (Redis only)
    peer.py group --children JSON --callback JSON          (Redis only)

Every command takes:

    --broker redis|rabbitmq   (default redis)
    --url URL                 the broker (default redis://127.0.0.1:6379/0, or
                              amqp://guest:guest@127.0.0.1:5672/%2f for rabbitmq)
    --namespace NAME          Redis broker key prefix (default "dramatiq")
    --results-url URL         the Redis of the results (default: --url on Redis,
                              redis://127.0.0.1:6379/0 with RabbitMQ)
    --max-priority N          RabbitMQ: RabbitmqBroker(max_priority=N)
    --actor-queue Q           the queue of the actors (default "default")

On RabbitMQ the broker is `RabbitmqBroker(url=..., confirm_delivery=True, max_priority=...)`.
Output is JSON on stdout, one document per line.

The actors are those of examples/interop.rs: add(a, b), echo(value), fail_always(),
sleep_ms(ms) and mutex_sleep(key, ms); the last holds Dramatiq's ConcurrentRateLimiter `key`
(limit 1, its Redis rate-limit backend on --results-url, where a Troupe worker's --state-url
points) for ms milliseconds and returns [start_ms, end_ms]; while the mutex is taken it raises
RateLimitExceeded and is retried after 20-200 ms. Each records what it received; `worker` prints those records when it stops
(with --print-starts it also prints {"call_started": {"actor", "message_id"}} as each call
starts).

On Redis the broker has dramatiq-abort's `Abortable` middleware with its `RedisBackend` (key
prefix "dramatiq:aborts:") on the broker's Redis, so the worker skips a message cancelled before
it starts and aborts a running one. `sleep_ms` sleeps in 20 ms slices: dramatiq-abort raises
`Abort` in the actor's thread between Python instructions, never inside one `time.sleep`. It has
`throws=(Abort,)`, so an aborted message is not retried (Dramatiq fails it: a dead letter, and
an `Abort` failure as its result). `abort` is dramatiq-abort's `abort(message_id, mode=...)`,
which prints {"abort": MESSAGE_ID, "mode": MODE}.

The broker has Dramatiq's `GroupCallbacks` with the rate-limit `RedisBackend` on --results-url
(where a Troupe worker's --state-url points), so a group's completion callbacks fire through the
barrier both sides share. `group` runs `group([...]).add_completion_callback(...)`: --children
is a JSON list of {"actor", "args"}, --callback one such object; it prints {"children": [message
dicts], "callback": message dict}.

`worker --until-empty QUEUE` stops once nothing is left to do. On Redis that is Dramatiq's own
`broker.join` (it counts the messages in flight). RabbitMQ's `join` does not count unacked
messages, so there the peer waits until QUEUE and QUEUE.DQ hold no ready message (passive
declares), every delivery its consumers took was acked or nacked, and (with --expect N) its
actors ran at least N times, all of it 10 times in a row, 50 ms apart.
"""

import argparse
import json
import sys
import threading
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.errors import QueueJoinTimeout
from dramatiq.middleware import CurrentMessage, GroupCallbacks
from dramatiq.rate_limits import ConcurrentRateLimiter
from dramatiq.rate_limits.backends import RedisBackend as RateLimitBackend
from dramatiq.results import Results, ResultFailure, ResultMissing, ResultTimeout
from dramatiq.results.backends import RedisBackend
from dramatiq_abort import Abort, Abortable, abort
from dramatiq_abort.backends import RedisBackend as AbortBackend
from dramatiq_abort.middleware import AbortMode

RECEIVED = []
_LOCK = threading.Lock()
# RabbitMQ: deliveries the worker's consumers took and did not ack or nack yet.
IN_FLIGHT = [0]
# Whether each call prints a {"call_started": ...} line at once (worker --print-starts).
PRINT_STARTS = [False]

DEFAULT_URLS = {"redis": "redis://127.0.0.1:6379/0", "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/%2f"}


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
        if PRINT_STARTS[0]:
            emit(call_started(RECEIVED[-1]))


def call_started(received):
    return {"call_started": {"actor": received["actor"], "message_id": received["message_id"]}}


def in_flight(delta):
    with _LOCK:
        IN_FLIGHT[0] += delta


def rabbitmq_broker(url, max_priority):
    """Dramatiq's RabbitmqBroker, its consumers counting the deliveries they hold."""
    from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer

    class CountingConsumer(_RabbitmqConsumer):
        def __next__(self):
            message = super().__next__()
            if message is not None:
                in_flight(+1)
            return message

        def ack(self, message):
            try:
                super().ack(message)
            finally:
                in_flight(-1)

        def nack(self, message):
            try:
                super().nack(message)
            finally:
                in_flight(-1)

    class CountingBroker(RabbitmqBroker):
        @property
        def consumer_class(self):
            return CountingConsumer

    return CountingBroker(url=url, confirm_delivery=True, max_priority=max_priority)


def setup(opts):
    if opts.broker == "rabbitmq":
        broker = rabbitmq_broker(opts.url, opts.max_priority)
    else:
        broker = RedisBroker(url=opts.url, namespace=opts.namespace)
    backend = RedisBackend(url=opts.results_url)
    broker.add_middleware(Results(backend=backend))
    broker.add_middleware(CurrentMessage())
    limits = RateLimitBackend(client=redis.Redis.from_url(opts.results_url))
    broker.add_middleware(GroupCallbacks(limits))
    if opts.broker == "redis":
        broker.add_middleware(Abortable(backend=AbortBackend(client=redis.Redis.from_url(opts.url))))
    dramatiq.set_broker(broker)
    queue = opts.actor_queue

    @dramatiq.actor(store_results=True, queue_name=queue)
    def add(a, b):
        record("add", a=a, b=b)
        return a + b

    @dramatiq.actor(store_results=True, queue_name=queue)
    def echo(value):
        record("echo", value=value)
        return value

    @dramatiq.actor(store_results=True, max_retries=2, min_backoff=100, max_backoff=1000, queue_name=queue)
    def fail_always():
        record("fail_always")
        raise ValueError("fail_always always fails")

    # Sleeps in slices so that dramatiq-abort's Abort (raised between Python instructions)
    # stops it mid-sleep; not retried when aborted (on RabbitMQ there is no Abortable).
    @dramatiq.actor(store_results=True, queue_name=queue, throws=(Abort,))
    def sleep_ms(ms):
        record("sleep_ms", ms=ms)
        deadline = time.monotonic() + ms / 1000
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.02))
        return ms

    @dramatiq.actor(store_results=True, queue_name=queue, max_retries=1000, min_backoff=20, max_backoff=200)
    def mutex_sleep(key, ms):
        with ConcurrentRateLimiter(limits, key, limit=1).acquire():
            start = int(time.time() * 1000)
            record("mutex_sleep", key=key, ms=ms)
            time.sleep(ms / 1000)
            end = int(time.time() * 1000)
        return [start, end]

    actors = {"add": add, "echo": echo, "fail_always": fail_always, "sleep_ms": sleep_ms, "mutex_sleep": mutex_sleep}
    return broker, backend, actors


def emit(document):
    print(json.dumps(document), flush=True)


def send_one(broker, actors, actor, args, kwargs=None, delay_ms=None, queue=None, options=None):
    if actor not in actors:
        raise SystemExit(f"peer.py: unknown actor {actor!r}; known: {sorted(actors)}")
    message = actors[actor].message_with_options(args=tuple(args), kwargs=kwargs or {}, **(options or {}))
    if queue:
        broker.declare_queue(queue)
        message = message.copy(queue_name=queue)
    enqueued = broker.enqueue(message, delay=delay_ms)
    emit(enqueued.asdict())


def cmd_send(broker, backend, actors, opts):
    send_one(
        broker,
        actors,
        opts.actor,
        json.loads(opts.args),
        json.loads(opts.kwargs),
        opts.delay_ms,
        opts.queue,
        json.loads(opts.options),
    )


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
            spec.get("options"),
        )


def rabbitmq_join(broker, queue, expect, timeout_secs):
    """Waits until `queue` is drained (see the module's doc); raises QueueJoinTimeout."""
    deadline = time.monotonic() + timeout_secs if timeout_secs else None
    successes = 0
    while successes < 10:
        if deadline and time.monotonic() >= deadline:
            raise QueueJoinTimeout(queue)
        ready, delayed, _dead = broker.get_queue_message_counts(queue)
        with _LOCK:
            idle = IN_FLIGHT[0] == 0 and len(RECEIVED) >= expect
        successes = successes + 1 if idle and ready + delayed == 0 else 0
        time.sleep(0.05)


def cmd_worker(broker, backend, actors, opts):
    rabbitmq = opts.broker == "rabbitmq"
    if opts.until_empty:
        if rabbitmq:
            # On the server now: a declaration RabbitMQ refuses (406) fails the command.
            broker.declare_queue(opts.until_empty, ensure=True)
        else:
            broker.declare_queue(opts.until_empty)
    worker = dramatiq.Worker(broker, worker_threads=opts.threads, worker_timeout=100)
    if opts.prefetch:
        worker.queue_prefetch = opts.prefetch
    worker.start()
    with _LOCK:
        # First line, before any call_started (a call may have started already).
        emit({"started": True})
        if opts.print_starts:
            PRINT_STARTS[0] = True
            for received in RECEIVED:
                emit(call_started(received))
    try:
        if opts.until_empty:
            timeout = int(opts.seconds * 1000) if opts.seconds else None
            try:
                if rabbitmq:
                    rabbitmq_join(broker, opts.until_empty, opts.expect, opts.seconds)
                else:
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


def text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def rabbitmq_dlq(broker, queue):
    """Peeks at QUEUE.XQ (basic_get without ack; closing the channel puts them back)."""
    import pika

    broker.declare_queue(queue, ensure=True)
    connection = pika.BlockingConnection(parameters=broker.parameters)
    try:
        channel = connection.channel()
        letters = []
        while True:
            method, properties, body = channel.basic_get(f"{queue}.XQ", auto_ack=False)
            if method is None:
                break
            message = dramatiq.Message.decode(body)
            deaths = (properties.headers or {}).get("x-death") or []
            letters.append(
                {
                    "message": message.asdict(),
                    "x_death_reason": text(deaths[0].get("reason")) if deaths else None,
                    "x_death_queue": text(deaths[0].get("queue")) if deaths else None,
                    "timestamp": properties.timestamp,
                }
            )
        channel.close()
    finally:
        connection.close()
    return letters


def cmd_dlq(broker, backend, actors, opts):
    if opts.broker == "rabbitmq":
        emit(rabbitmq_dlq(broker, opts.queue))
        return
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


def cmd_declare(broker, backend, actors, opts):
    """Declares QUEUE (on RabbitMQ: on the server, Q, Q.DQ and Q.XQ) and prints {"declared": QUEUE}."""
    if opts.broker == "rabbitmq":
        broker.declare_queue(opts.queue, ensure=True)
    else:
        broker.declare_queue(opts.queue)
    emit({"declared": opts.queue})


def cmd_abort(broker, backend, actors, opts):
    """dramatiq-abort's abort(MESSAGE_ID, mode=...), through the Abortable of the global broker."""
    if opts.broker != "redis":
        raise SystemExit("peer.py abort: dramatiq-abort is set up on the Redis broker only")
    mode = AbortMode(opts.mode)
    abort(opts.message_id, mode=mode)
    emit({"abort": opts.message_id, "mode": mode.value})


def cmd_group(broker, backend, actors, opts):
    """group([...]).add_completion_callback(...).run(); prints the messages it built."""
    def build(spec):
        if spec["actor"] not in actors:
            raise SystemExit(f"peer.py group: unknown actor {spec['actor']!r}")
        return actors[spec["actor"]].message(*spec.get("args", []))

    children = [build(spec) for spec in json.loads(opts.children)]
    callback = build(json.loads(opts.callback))
    g = dramatiq.group(children)
    g.add_completion_callback(callback)
    g.run()
    emit({"children": [m.asdict() for m in children], "callback": callback.asdict()})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--broker", choices=sorted(DEFAULT_URLS), default="redis")
    common.add_argument("--url", help="the broker's URL (default: the local server of --broker)")
    common.add_argument("--namespace", default="dramatiq", help="Redis broker only")
    common.add_argument("--results-url", help="Redis for the results (default: --url on Redis, else the local Redis)")
    common.add_argument("--max-priority", type=int, help="RabbitMQ: queues with x-max-priority")
    common.add_argument("--actor-queue", default="default", help="the queue of the actors")
    sub = parser.add_subparsers(dest="command", required=True)

    send = sub.add_parser("send", parents=[common], help="enqueue one message")
    send.add_argument("actor")
    send.add_argument("--args", default="[]", help="positional arguments, a JSON array")
    send.add_argument("--kwargs", default="{}", help="keyword arguments, a JSON object")
    send.add_argument("--options", default="{}", help="message options, a JSON object")
    send.add_argument("--delay-ms", type=int)
    send.add_argument("--queue")
    send.set_defaults(run=cmd_send)

    batch = sub.add_parser("send-batch", parents=[common], help="enqueue one message per JSON line of stdin")
    batch.set_defaults(run=cmd_send_batch)

    worker = sub.add_parser("worker", parents=[common], help="run a worker in this process")
    worker.add_argument("--seconds", type=float, help="run this long (with --until-empty: at most this long)")
    worker.add_argument("--until-empty", metavar="QUEUE", help="stop once QUEUE has nothing queued or in flight")
    worker.add_argument("--expect", type=int, default=0, help="RabbitMQ: with --until-empty, also wait for N calls")
    worker.add_argument("--threads", type=int, default=4, help="worker threads")
    worker.add_argument("--prefetch", type=int, default=0, help="queue prefetch (default: 2 x threads)")
    worker.add_argument("--print-starts", action="store_true", help="print a line as each call starts")
    worker.set_defaults(run=cmd_worker)

    get = sub.add_parser("get-result", parents=[common], help="read stored results")
    get.add_argument("messages", nargs="+", metavar="MESSAGE_JSON")
    get.add_argument("--timeout-ms", type=int, default=10000)
    get.set_defaults(run=cmd_get_result)

    dlq = sub.add_parser("dlq", parents=[common], help="list the dead letters of QUEUE")
    dlq.add_argument("queue")
    dlq.set_defaults(run=cmd_dlq)

    declare = sub.add_parser("declare", parents=[common], help="declare QUEUE")
    declare.add_argument("queue")
    declare.set_defaults(run=cmd_declare)

    abort_ = sub.add_parser("abort", parents=[common], help="dramatiq-abort's abort(MESSAGE_ID, mode=MODE)")
    abort_.add_argument("message_id")
    abort_.add_argument("--mode", choices=[m.value for m in AbortMode], default=AbortMode.ABORT.value)
    abort_.set_defaults(run=cmd_abort)

    group_ = sub.add_parser("group", parents=[common], help="run a group with a completion callback")
    group_.add_argument("--children", required=True, help='a JSON list of {"actor", "args"}')
    group_.add_argument("--callback", required=True, help='one {"actor", "args"}')
    group_.set_defaults(run=cmd_group)

    opts = parser.parse_args()
    if opts.command == "worker" and not (opts.seconds or opts.until_empty):
        parser.error("worker needs --seconds N or --until-empty QUEUE")
    if opts.url is None:
        opts.url = DEFAULT_URLS[opts.broker]
    if opts.results_url is None:
        opts.results_url = opts.url if opts.broker == "redis" else DEFAULT_URLS["redis"]
    broker, backend, actors = setup(opts)
    try:
        opts.run(broker, backend, actors, opts)
    finally:
        broker.close()


if __name__ == "__main__":
    main()
