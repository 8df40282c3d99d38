"""The RabbitMQ server's raw rate on this machine, for reference next to Troupe and Dramatiq.

    python bench/raw_amqp.py --url 'amqp://guest:guest@127.0.0.1:5672/%2f' --messages 20000

Our own code, on pika (the venv of bench/dramatiq_peer.py). On one durable queue of its own
(deleted at the end), with small persistent messages (delivery_mode=2, a Dramatiq-sized JSON
body) on the default exchange:

1. publishes N on one channel in confirm mode, waiting for each confirm before the next publish
   (what Dramatiq with confirm_delivery=True and Troupe's one-by-one enqueue do), then consumes
   them with manual acks (one basic_ack per message) and prefetch 1000;
2. publishes N on one channel in confirm mode with up to --window publishes unconfirmed (batched
   confirms), then consumes them the same way.

Prints one JSON object: publish_per_sec (batched confirms), publish_per_sec_confirm_each,
consume_per_sec (the better of the two consumes) and both consume rates. The client is Python:
for consuming especially, pika's own cost is part of the figure.

--ack-every K acks every Kth message with `multiple` instead of each one; --server-pid PID (the
local RabbitMQ's beam.smp) adds the server's CPU time per consumed message, read from /proc:

    python bench/raw_amqp.py --messages 50000 --server-pid "$(pgrep -f beam.smp | head -1)" --ack-every 50
"""
import argparse
import collections
import json
import os
import time
import uuid

import pika

PROPERTIES = pika.BasicProperties(delivery_mode=2)


def body(n):
    return json.dumps(
        {
            "queue_name": "bench",
            "actor_name": "noop",
            "args": [n],
            "kwargs": {},
            "options": {},
            "message_id": str(uuid.uuid4()),
            "message_timestamp": int(time.time() * 1000),
        }
    ).encode()


def publish_confirm_each(params, queue, n):
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.confirm_delivery()
    bodies = [body(i) for i in range(n)]
    started = time.perf_counter()
    for b in bodies:
        # Blocks until RabbitMQ confirms it (raises on nack or unroutable).
        channel.basic_publish("", queue, b, PROPERTIES, mandatory=True)
    secs = time.perf_counter() - started
    connection.close()
    return secs


def publish_batched(params, queue, n, window):
    """Keeps up to `window` publishes unconfirmed (SelectConnection, confirms handled as they come)."""
    bodies = [body(i) for i in range(n)]
    state = {"sent": 0, "confirmed": 0, "nacked": 0, "started": None, "finished": None, "error": None}
    outstanding = collections.deque()

    def pump(channel):
        while state["sent"] < n and len(outstanding) < window:
            channel.basic_publish("", queue, bodies[state["sent"]], PROPERTIES)
            state["sent"] += 1
            outstanding.append(state["sent"])  # delivery tags count from 1

    def on_confirm(frame):
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            state["nacked"] += 1
        if method.multiple:
            while outstanding and outstanding[0] <= method.delivery_tag:
                outstanding.popleft()
        elif outstanding and outstanding[0] == method.delivery_tag:
            outstanding.popleft()
        else:
            outstanding.remove(method.delivery_tag)
        if state["sent"] == n and not outstanding:
            state["finished"] = time.perf_counter()
            connection.close()
        else:
            pump(channels[0])

    channels = []

    def on_confirm_mode(_frame):
        state["started"] = time.perf_counter()
        pump(channels[0])

    def on_channel(channel):
        channels.append(channel)
        channel.confirm_delivery(ack_nack_callback=on_confirm, callback=on_confirm_mode)

    def on_open(conn):
        conn.channel(on_open_callback=on_channel)

    def on_open_error(_conn, error):
        state["error"] = error
        connection.ioloop.stop()

    def on_close(_conn, _reason):
        connection.ioloop.stop()

    connection = pika.SelectConnection(
        params, on_open_callback=on_open, on_open_error_callback=on_open_error, on_close_callback=on_close
    )
    connection.ioloop.start()
    if state["error"] is not None or state["finished"] is None:
        raise SystemExit(f"raw_amqp.py: the batched publish failed: {state['error']}")
    if state["nacked"]:
        raise SystemExit(f"raw_amqp.py: RabbitMQ nacked {state['nacked']} publishes")
    return state["finished"] - state["started"]


def consume(params, queue, n, prefetch, ack_every=1):
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    got = [0]

    def on_message(ch, method, _properties, _body):
        got[0] += 1
        if ack_every == 1:
            ch.basic_ack(method.delivery_tag)
        elif got[0] % ack_every == 0 or got[0] == n:
            ch.basic_ack(method.delivery_tag, multiple=True)
        if got[0] == n:
            ch.stop_consuming()

    channel.basic_consume(queue, on_message, auto_ack=False)
    started = time.perf_counter()
    channel.start_consuming()
    secs = time.perf_counter() - started
    connection.close()
    return secs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--window", type=int, default=1000, help="unconfirmed publishes in flight (batched)")
    parser.add_argument("--prefetch", type=int, default=1000)
    parser.add_argument("--ack-every", type=int, default=1, help="ack every Kth message with multiple (1: each)")
    parser.add_argument("--server-pid", type=int, help="the local RabbitMQ's pid: report its CPU per consumed message")
    args = parser.parse_args()

    def server_ticks():
        if args.server_pid is None:
            return 0
        with open(f"/proc/{args.server_pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    params = pika.URLParameters(args.url)
    queue = f"raw_amqp_bench_{uuid.uuid4().hex[:8]}"
    admin = pika.BlockingConnection(params)
    admin_channel = admin.channel()
    admin_channel.queue_declare(queue, durable=True)
    try:
        n = args.messages
        each_secs = publish_confirm_each(params, queue, n)
        ticks = server_ticks()
        consume1_secs = consume(params, queue, n, args.prefetch, args.ack_every)
        consume_ticks = server_ticks() - ticks
        batched_secs = publish_batched(params, queue, n, args.window)
        ticks = server_ticks()
        consume2_secs = consume(params, queue, n, args.prefetch, args.ack_every)
        consume_ticks += server_ticks() - ticks
        left = admin_channel.queue_declare(queue, passive=True).method.message_count
    finally:
        admin_channel.queue_delete(queue)
        admin.close()
    consume_rates = [round(n / consume1_secs), round(n / consume2_secs)]
    print(
        json.dumps(
            {
                "implementation": f"pika {pika.__version__} (raw AMQP)",
                "messages": n,
                "publish_per_sec": round(n / batched_secs),
                "publish_confirm_window": args.window,
                "publish_per_sec_confirm_each": round(n / each_secs),
                "consume_per_sec": max(consume_rates),
                "consume_per_sec_runs": consume_rates,
                "prefetch": args.prefetch,
                "ack_every": args.ack_every,
                "left_in_queue": left,
                **(
                    {}
                    if args.server_pid is None
                    else {
                        "server_cpu_us_per_consumed": round(
                            consume_ticks * 1e6 / os.sysconf("SC_CLK_TCK") / (2 * n), 1
                        )
                    }
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
