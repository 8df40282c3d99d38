//! The conformance cases. Each takes a fresh [`TestBroker`] and panics on a violation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use troupe_core::middleware::Retries;
use troupe_core::{
    Actor, ActorError, ActorOptions, App, ConsumerOptions, Encoder, Error, JsonEncoder, Message, SendOptions,
    option_keys, pipeline,
};
use troupe_worker::{Worker, WorkerHandle};

use crate::TestBroker;
use crate::support::{TestActor, eventually, unique_queue};

const WAIT: Duration = Duration::from_secs(10);
const FETCH: Duration = Duration::from_millis(200);

fn message(queue: &str, actor: &str, args: Vec<Value>) -> Message {
    Message::new(queue, actor, args, Map::new())
}

/// Quick retries, for cases that retry (`AppBuilder::retries`; the rest of the default
/// middleware unchanged).
fn fast_retries() -> Retries {
    Retries::default()
        .min_backoff(Duration::from_millis(50))
        .max_backoff(Duration::from_millis(400))
}

async fn start(app: &App, concurrency: usize) -> WorkerHandle {
    Worker::builder(app.clone())
        .concurrency(concurrency)
        .fetch_timeout(FETCH)
        .shutdown_timeout(Duration::from_secs(5))
        .start()
        .await
        .expect("worker starts")
}

/// Fetches until something arrives (at most `max`) or `within` passes; empty on time-out.
async fn fetch_some(
    consumer: &mut Box<dyn troupe_core::Consumer>,
    max: usize,
    within: Duration,
) -> Vec<troupe_core::Delivery> {
    let deadline = Instant::now() + within;
    loop {
        let got = consumer.fetch(max, FETCH).await.expect("fetch");
        if !got.is_empty() || Instant::now() >= deadline {
            return got;
        }
    }
}

/// Waits until `queue` has nothing ready, delayed or in flight.
pub(crate) async fn wait_drained(tb: &TestBroker, queue: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = tb.broker.stats(queue).await.expect("stats");
        if stats.pending() == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "messages not acked: {stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Consumes and acks up to `n` messages of `queue` (waiting at most [`WAIT`]), fetching
/// `batch` at a time; returns them in delivery order.
async fn take_in_order(tb: &TestBroker, queue: &str, n: usize, batch: usize) -> Vec<Message> {
    let mut consumer = tb
        .broker
        .consume(queue, ConsumerOptions::new(n))
        .await
        .expect("consume");
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < n && Instant::now() < deadline {
        for d in consumer.fetch(batch, FETCH).await.expect("fetch") {
            seen.push(d.message().expect("decodes").clone());
            d.ack().await.expect("ack");
        }
    }
    consumer.close().await.expect("close");
    seen
}

async fn fetch_one(tb: &TestBroker, queue: &str) -> (Box<dyn troupe_core::Consumer>, troupe_core::Delivery) {
    let mut consumer = tb
        .broker
        .consume(queue, ConsumerOptions::new(10))
        .await
        .expect("consume");
    let delivery = fetch_some(&mut consumer, 1, WAIT).await.pop();
    (
        consumer,
        delivery.unwrap_or_else(|| panic!("no message arrived on {queue}")),
    )
}

async fn wait_dead(tb: &TestBroker, queue: &str, n: usize) -> Vec<troupe_core::DeadLetter> {
    let deadline = Instant::now() + WAIT;
    loop {
        let dead = tb.broker.dead_letters(queue, 100).await.expect("dead letters");
        if dead.len() >= n {
            return dead;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} dead letters on {queue}, found {}",
            dead.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A message enqueued is consumed intact and is gone once acked.
pub async fn enqueue_consume_ack(tb: &TestBroker) {
    let q = unique_queue("ack");
    tb.broker.declare_queue(&q).await.expect("declare");
    let mut sent = message(&q, "echo", vec![json!(1), json!("two"), json!({"three": [3]})]);
    sent.kwargs.insert("k".into(), json!(null));
    sent.options.insert("custom_key".into(), json!({"kept": true}));
    let enqueued = tb.broker.enqueue(sent.clone(), None).await.expect("enqueue");
    assert_eq!(enqueued.message_id, sent.message_id);
    let mut consumer = tb.broker.consume(&q, ConsumerOptions::new(10)).await.expect("consume");
    let got = fetch_some(&mut consumer, 10, WAIT).await;
    assert_eq!(got.len(), 1, "exactly one delivery");
    let m = got[0].message().expect("decodes").clone();
    assert_eq!(m.message_id, sent.message_id);
    assert_eq!(m.args, sent.args);
    assert_eq!(m.kwargs, sent.kwargs);
    assert_eq!(
        m.options.get("custom_key"),
        Some(&json!({"kept": true})),
        "unknown options round-trip"
    );
    assert_eq!(m.message_timestamp, sent.message_timestamp);
    assert_eq!(tb.broker.stats(&q).await.expect("stats").in_flight, 1);
    got[0].ack().await.expect("ack");
    assert!(
        consumer
            .fetch(10, Duration::from_millis(100))
            .await
            .expect("fetch")
            .is_empty()
    );
    let stats = tb.broker.stats(&q).await.expect("stats");
    assert_eq!(stats.pending(), 0, "{stats:?}");
    consumer.close().await.expect("close");
}

/// A consumer whose window is resized while it holds deliveries (`Consumer::set_prefetch`:
/// grown, then shrunk, as an adaptive worker window does) holds as many as the new window
/// allows and loses and repeats nothing: the deliveries taken before a resize still ack, and
/// every message comes out once.
pub async fn a_resized_consumer_loses_and_repeats_nothing(tb: &TestBroker) {
    let q = unique_queue("resize");
    tb.broker.declare_queue(&q).await.expect("declare");
    let sent: Vec<(Message, Option<Duration>)> = (0..120).map(|i| (message(&q, "a", vec![json!(i)]), None)).collect();
    tb.broker.enqueue_many(sent).await.expect("enqueue");
    let mut consumer = tb.broker.consume(&q, ConsumerOptions::new(4)).await.expect("consume");
    let mut seen = std::collections::HashMap::new();
    let mut held = fetch_some(&mut consumer, 4, WAIT).await;
    assert!(!held.is_empty(), "a first delivery");
    consumer.set_prefetch(64).await.expect("grow the prefetch");
    // Grown: more than the first 4 can be held unacked at once (a broker that pushes would
    // stop at 4 had the resize not reached the server).
    let deadline = Instant::now() + WAIT;
    while held.len() < 20 && Instant::now() < deadline {
        held.extend(consumer.fetch(64, FETCH).await.expect("fetch"));
    }
    assert!(
        held.len() >= 20,
        "only {} held after growing the prefetch to 64",
        held.len()
    );
    let mut shrunk = false;
    while seen.len() < 120 && Instant::now() < deadline {
        for d in held.drain(..) {
            let n = d.message().expect("decodes").args[0].as_u64().expect("a number");
            *seen.entry(n).or_insert(0) += 1;
            d.ack().await.expect("ack, also of a delivery taken before the resize");
        }
        if !shrunk && seen.len() >= 60 {
            consumer.set_prefetch(2).await.expect("shrink the prefetch");
            shrunk = true;
        }
        held = consumer.fetch(64, FETCH).await.expect("fetch");
    }
    assert_eq!(seen.len(), 120, "every message came out");
    assert!(
        seen.values().all(|&times| times == 1),
        "none twice: {:?}",
        seen.iter().filter(|(_, t)| **t > 1).collect::<Vec<_>>()
    );
    assert!(
        consumer
            .fetch(10, Duration::from_millis(200))
            .await
            .expect("fetch")
            .is_empty(),
        "nothing more"
    );
    consumer.close().await.expect("close");
    wait_drained(tb, &q).await;
}

/// Messages of one queue come out in the order they went in.
pub async fn fifo_within_a_queue(tb: &TestBroker) {
    let q = unique_queue("fifo");
    tb.broker.declare_queue(&q).await.expect("declare");
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..20 {
            let m = tb
                .broker
                .enqueue(message(&q, "a", vec![json!(i)]), None)
                .await
                .expect("enqueue");
            ids.push(m.message_id);
        }
        ids
    };
    let seen: Vec<String> = take_in_order(tb, &q, 20, 5)
        .await
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(seen, ids);
}

/// A nacked message lands in the dead letters with its reason.
pub async fn nack_dead_letters_with_reason(tb: &TestBroker) {
    let q = unique_queue("nack");
    tb.broker.declare_queue(&q).await.expect("declare");
    let sent = tb
        .broker
        .enqueue(message(&q, "a", vec![json!(1)]), None)
        .await
        .expect("enqueue");
    let (consumer, d) = fetch_one(tb, &q).await;
    let mut m = d.message().expect("decodes").clone();
    m.set_retries(3);
    d.nack(Some(&m), "ValueError: boom").await.expect("nack");
    consumer.close().await.expect("close");
    let dead = wait_dead(tb, &q, 1).await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("ValueError: boom"),
        "reason kept: {:?}",
        dead[0].reason
    );
    let dm = dead[0].message.as_ref().expect("dead message decodes");
    assert_eq!(dm.message_id, sent.message_id);
    let stats = tb.broker.stats(&q).await.expect("stats");
    assert_eq!((stats.pending(), stats.dead), (0, 1), "{stats:?}");
}

/// Dead letters can be requeued (retries reset) and purged.
pub async fn dead_letters_requeue_and_purge(tb: &TestBroker) {
    let q = unique_queue("dlq");
    tb.broker.declare_queue(&q).await.expect("declare");
    for i in 0..3 {
        tb.broker
            .enqueue(message(&q, "a", vec![json!(i)]), None)
            .await
            .expect("enqueue");
    }
    let mut consumer = tb.broker.consume(&q, ConsumerOptions::new(10)).await.expect("consume");
    let mut n = 0;
    let deadline = Instant::now() + WAIT;
    while n < 3 && Instant::now() < deadline {
        for d in consumer.fetch(3, FETCH).await.expect("fetch") {
            let mut m = d.message().expect("decodes").clone();
            m.set_retries(5);
            d.nack(Some(&m), "failed").await.expect("nack");
            n += 1;
        }
    }
    let dead = wait_dead(tb, &q, 3).await;
    let first = dead[0].id.clone();
    assert_eq!(tb.broker.requeue_dead_letters(&q, &[first]).await.expect("requeue"), 1);
    let d = {
        let mut got = fetch_some(&mut consumer, 1, WAIT).await;
        got.pop().expect("requeued message delivered")
    };
    assert_eq!(d.message().expect("decodes").retries(), 0, "requeue resets retries");
    d.ack().await.expect("ack");
    assert_eq!(tb.broker.dead_letters(&q, 100).await.expect("dead").len(), 2);
    assert_eq!(tb.broker.purge_dead_letters(&q).await.expect("purge"), 2);
    assert!(tb.broker.dead_letters(&q, 100).await.expect("dead").is_empty());
    consumer.close().await.expect("close");
}

/// `requeue` returns a delivery to its queue without counting a retry.
pub async fn requeue_returns_without_retry(tb: &TestBroker) {
    let q = unique_queue("requeue");
    tb.broker.declare_queue(&q).await.expect("declare");
    let sent = tb
        .broker
        .enqueue(message(&q, "a", vec![]), None)
        .await
        .expect("enqueue");
    let mut consumer = tb.broker.consume(&q, ConsumerOptions::new(10)).await.expect("consume");
    let got = fetch_some(&mut consumer, 1, WAIT).await;
    got[0].requeue().await.expect("requeue");
    let again = fetch_some(&mut consumer, 1, WAIT).await;
    let m = again[0].message().expect("decodes");
    assert_eq!(m.message_id, sent.message_id);
    assert_eq!(m.retries(), 0);
    again[0].ack().await.expect("ack");
    consumer.close().await.expect("close");
}

/// Settles out of order, all at once: acks, a nack and a requeue among deliveries still held.
/// Each touches its own message only: a broker that coalesces acks (RabbitMQ's `multiple`)
/// must not reach the held ones, the nacked one or the requeued one. Once the consumer
/// closes, the held and the requeued come back, the nacked is a dead letter, and nothing else
/// is left.
pub async fn out_of_order_settles_touch_only_their_own_messages(tb: &TestBroker) {
    let q = unique_queue("settles");
    tb.broker.declare_queue(&q).await.expect("declare");
    let batch = (0..40).map(|i| (message(&q, "a", vec![json!(i)]), None)).collect();
    let sent = tb.broker.enqueue_many(batch).await.expect("enqueue");
    let mut consumer = tb.broker.consume(&q, ConsumerOptions::new(64)).await.expect("consume");
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let more = fetch_some(&mut consumer, sent.len() - got.len(), WAIT).await;
        assert!(!more.is_empty(), "fetched {} of {}", got.len(), sent.len());
        got.extend(more);
    }
    let id = |d: &troupe_core::Delivery| d.message().expect("decodes").message_id.clone();
    let by_position = |i: usize| got.iter().find(|d| id(d) == sent[i].message_id).expect("delivered");
    let (held, nacked, requeued) = ([5, 23], 12, 30);
    let settles = sent
        .iter()
        .enumerate()
        .rev()
        .filter(|(i, _)| !held.contains(i))
        .map(|(i, _)| {
            let delivery = by_position(i);
            async move {
                if i == nacked {
                    let m = delivery.message().expect("decodes").clone();
                    delivery.nack(Some(&m), "out of order").await
                } else if i == requeued {
                    delivery.requeue().await
                } else {
                    delivery.ack().await
                }
            }
        });
    for settled in futures::future::join_all(settles).await {
        settled.expect("settle");
    }
    let dead = wait_dead(tb, &q, 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, sent[nacked].message_id);
    drop(got);
    consumer.close().await.expect("close");
    let mut again = tb.broker.consume(&q, ConsumerOptions::new(64)).await.expect("consume");
    let mut back = Vec::new();
    let deadline = Instant::now() + tb.redelivery_timeout + WAIT;
    while back.len() < 3 && Instant::now() < deadline {
        back.extend(fetch_some(&mut again, 3, Duration::from_millis(200)).await);
    }
    // A moment more: anything else coming back would be a message the settles lost.
    back.extend(fetch_some(&mut again, 40, Duration::from_millis(500)).await);
    let mut ids: Vec<String> = back.iter().map(id).collect();
    ids.sort();
    let mut expected: Vec<String> = [held[0], held[1], requeued]
        .iter()
        .map(|&i| sent[i].message_id.clone())
        .collect();
    expected.sort();
    assert_eq!(ids, expected, "exactly the held and the requeued came back");
    for delivery in &back {
        delivery.ack().await.expect("ack");
    }
    again.close().await.expect("close");
}

/// A consumer that dies without acking: its messages come back within the redelivery bound,
/// with their retry count untouched.
pub async fn unacked_messages_are_redelivered(tb: &TestBroker) {
    let q = unique_queue("redeliver");
    tb.broker.declare_queue(&q).await.expect("declare");
    let sent = tb
        .broker
        .enqueue(message(&q, "a", vec![json!(7)]), None)
        .await
        .expect("enqueue");
    {
        let mut dying = tb.broker.consume(&q, ConsumerOptions::new(10)).await.expect("consume");
        let got = fetch_some(&mut dying, 1, WAIT).await;
        assert_eq!(got.len(), 1);
        // The consumer and its delivery are dropped without ack, nack or close: a crash.
        drop(got);
        drop(dying);
    }
    let mut survivor = tb.broker.consume(&q, ConsumerOptions::new(10)).await.expect("consume");
    let got = fetch_some(&mut survivor, 1, tb.redelivery_timeout + WAIT).await;
    assert_eq!(got.len(), 1, "the message came back");
    let m = got[0].message().expect("decodes");
    assert_eq!(m.message_id, sent.message_id);
    assert_eq!(m.retries(), 0, "redelivery is not a retry");
    got[0].ack().await.expect("ack");
    survivor.close().await.expect("close");
}

/// A consumer that lost its claim (it died, or its lease ran out) and acks late does not remove
/// the message from the consumer that holds it now (fenced by attempt / delivery).
pub async fn a_late_ack_does_not_touch_the_redelivered_message(tb: &TestBroker) {
    let q = unique_queue("fence");
    tb.broker.declare_queue(&q).await.expect("declare");
    let sent = tb
        .broker
        .enqueue(message(&q, "a", vec![json!(1)]), None)
        .await
        .expect("enqueue");
    let stale = {
        let mut first = tb.broker.consume(&q, ConsumerOptions::new(10)).await.expect("consume");
        let mut got = fetch_some(&mut first, 1, WAIT).await;
        assert_eq!(got.len(), 1);
        // The consumer dies; its delivery handle lives on, as in a worker that was cut off.
        drop(first);
        got.pop().expect("a delivery")
    };
    let mut second = tb.broker.consume(&q, ConsumerOptions::new(10)).await.expect("consume");
    let mut got = fetch_some(&mut second, 1, tb.redelivery_timeout + WAIT).await;
    assert_eq!(got.len(), 1, "the message came back");
    assert_eq!(got[0].message().expect("decodes").message_id, sent.message_id);
    // The late ack may fail or do nothing; it must not remove the new delivery.
    let _ = stale.ack().await;
    let current = got.pop().expect("a delivery");
    let m = current.message().expect("decodes").clone();
    current.nack(Some(&m), "still mine").await.expect("nack");
    let dead = wait_dead(tb, &q, 1).await;
    assert!(
        dead[0].reason.contains("still mine"),
        "the current holder still owned it: {dead:?}"
    );
    second.close().await.expect("close");
}

/// Stats count ready, delayed and dead messages; purge empties the queue.
pub async fn stats_and_purge(tb: &TestBroker) {
    let q = unique_queue("stats");
    tb.broker.declare_queue(&q).await.expect("declare");
    for i in 0..3 {
        tb.broker
            .enqueue(message(&q, "a", vec![json!(i)]), None)
            .await
            .expect("enqueue");
    }
    tb.broker
        .enqueue(message(&q, "a", vec![]), Some(Duration::from_secs(3600)))
        .await
        .expect("enqueue delayed");
    let stats = tb.broker.stats(&q).await.expect("stats");
    assert_eq!(
        (stats.ready, stats.delayed, stats.in_flight, stats.dead),
        (3, 1, 0, 0),
        "{stats:?}"
    );
    tb.broker.purge(&q).await.expect("purge");
    let stats = tb.broker.stats(&q).await.expect("stats");
    assert_eq!(stats.pending(), 0, "{stats:?}");
}

/// A message over the size limit is refused at enqueue with a clear error.
pub async fn oversized_message_rejected_on_enqueue(tb: &TestBroker) {
    let q = unique_queue("big");
    tb.broker.declare_queue(&q).await.expect("declare");
    let big = "x".repeat(tb.max_message_size + 1);
    let err = tb
        .broker
        .enqueue(message(&q, "a", vec![json!(big)]), None)
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::MessageTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("limit"), "{err}");
}

/// A batch enqueue keeps the batch's order within a queue, honours each message's delay and
/// spans queues; a message that cannot be encoded refuses the whole batch before any is stored.
pub async fn enqueue_many_keeps_order_and_delays(tb: &TestBroker) {
    let q = unique_queue("many");
    let other = unique_queue("many_other");
    for name in [&q, &other] {
        tb.broker.declare_queue(name).await.expect("declare");
    }
    let mut batch: Vec<(Message, Option<Duration>)> =
        (0..40).map(|i| (message(&q, "a", vec![json!(i)]), None)).collect();
    batch.insert(
        10,
        (message(&q, "a", vec![json!("later")]), Some(Duration::from_secs(3600))),
    );
    batch.insert(20, (message(&other, "b", vec![json!("elsewhere")]), None));
    let enqueued = tb.broker.enqueue_many(batch).await.expect("enqueue_many");
    assert_eq!(enqueued.len(), 42);
    let expected: Vec<String> = enqueued
        .iter()
        .filter(|m| m.queue_name == q && m.args != vec![json!("later")])
        .map(|m| m.message_id.clone())
        .collect();
    assert_eq!(
        expected.len(),
        40,
        "the delayed message is bound for its delay queue or held back"
    );
    let stats = tb.broker.stats(&q).await.expect("stats");
    assert_eq!((stats.ready, stats.delayed), (40, 1), "{stats:?}");
    assert_eq!(tb.broker.stats(&other).await.expect("stats").ready, 1);

    let taken = take_in_order(tb, &q, 40, 16).await;
    assert!(
        taken.iter().all(|m| m.args != vec![json!("later")]),
        "a delayed message was delivered early"
    );
    let seen: Vec<String> = taken.into_iter().map(|m| m.message_id).collect();
    assert_eq!(seen, expected, "the batch's order");
    // A RabbitMQ quorum queue counts acks a moment late (they go through its Raft log).
    let counts = |q: String| async move {
        let stats = tb.broker.stats(&q).await.expect("stats");
        (stats.ready, stats.delayed)
    };
    let deadline = Instant::now() + WAIT;
    while counts(q.clone()).await != (0, 1) {
        assert!(
            Instant::now() < deadline,
            "the taken messages were acked: {:?}",
            counts(q.clone()).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let big = "x".repeat(tb.max_message_size + 1);
    let refused = vec![
        (message(&q, "a", vec![json!("first")]), None),
        (message(&q, "a", vec![json!(big)]), None),
    ];
    let err = tb.broker.enqueue_many(refused).await.expect_err("refused");
    assert!(matches!(err, Error::MessageTooLarge { .. }), "{err}");
    // Counted late or not, a stored message would show within half a second.
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        assert_eq!(counts(q.clone()).await, (0, 1), "nothing of a refused batch is stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for name in [&q, &other] {
        tb.broker.purge(name).await.expect("purge");
    }
}

/// `App::send_many` runs every message of the batch once through a worker.
pub async fn send_many_runs_each_once(tb: &TestBroker) {
    let q = unique_queue("send_many");
    let actor = TestActor::new("batch", &q);
    let app = App::builder(Arc::clone(&tb.broker))
        .actor(actor.clone())
        .build()
        .expect("app");
    let worker = start(&app, 8).await;
    let sent = app
        .send_many(&actor, (0..100).map(|i| vec![json!(i)]))
        .await
        .expect("send_many");
    assert_eq!(sent.len(), 100);
    assert!(
        eventually(WAIT, || actor.count() >= 100).await,
        "100 calls, got {}",
        actor.count()
    );
    wait_drained(tb, &q).await;
    worker.stop().await;
    let mut args: Vec<i64> = actor.calls().iter().filter_map(|c| c.args[0].as_i64()).collect();
    args.sort_unstable();
    assert_eq!(args, (0..100).collect::<Vec<_>>(), "each message ran exactly once");
}

/// A worker runs the actor with the message's arguments and acks it.
pub async fn worker_runs_actor_and_acks(tb: &TestBroker) {
    let q = unique_queue("run");
    let actor = TestActor::new("echo", &q);
    let app = App::builder(Arc::clone(&tb.broker))
        .actor(actor.clone())
        .build()
        .expect("app");
    let worker = start(&app, 4).await;
    for i in 0..10 {
        app.send(&actor, vec![json!(i), json!("x")]).await.expect("send");
    }
    assert!(
        eventually(WAIT, || actor.count() == 10).await,
        "10 calls, got {}",
        actor.count()
    );
    let mut args: Vec<i64> = actor.calls().iter().filter_map(|c| c.args[0].as_i64()).collect();
    args.sort_unstable();
    assert_eq!(args, (0..10).collect::<Vec<_>>());
    wait_drained(tb, &q).await;
    worker.stop().await;
    assert_eq!(actor.count(), 10, "each message ran once");
}

/// `App::join` returns once a worker has processed a handful of messages, and fails fast with
/// `MessageFailed` (the dead-lettered message's id and reason) when a message is dead-lettered
/// while it waits, without waiting for the rest of the queue (here a delayed message).
pub async fn app_join_waits_for_the_drain_and_fails_fast(tb: &TestBroker) {
    let q = unique_queue("join");
    let actor = TestActor::new("joined", &q).behaviour(|_, args| async move {
        let n = args.first().and_then(Value::as_i64).unwrap_or_default();
        if n < 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Err(ActorError::fail_permanently(ActorError::new("Invalid", "refused")))
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(json!(n))
        }
    });
    let app = App::builder(Arc::clone(&tb.broker))
        .retries(fast_retries())
        .actor(actor.clone())
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    for i in 0..6 {
        app.send(&actor, vec![json!(i)]).await.expect("send");
    }
    app.join(&q, WAIT)
        .await
        .expect("join returns once the queue is drained");
    assert_eq!(actor.count(), 6, "every message ran before join returned");
    let stats = tb.broker.stats(&q).await.expect("stats");
    assert_eq!(stats.pending(), 0, "{stats:?}");

    let failing = app.send(&actor, vec![json!(-1)]).await.expect("send");
    app.send_with_options(
        &actor,
        vec![json!(99)],
        SendOptions::new().delay(Duration::from_secs(5)),
    )
    .await
    .expect("send delayed");
    let started = Instant::now();
    let err = app.join(&q, WAIT).await.expect_err("a dead letter ends the join");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "join failed fast, before the delayed message was due: {:?}",
        started.elapsed()
    );
    match err {
        Error::MessageFailed {
            message_id,
            actor_name,
            reason,
        } => {
            assert_eq!(message_id, failing.message_id());
            assert_eq!(actor_name, "joined");
            assert!(reason.contains("Invalid: refused"), "{reason}");
        }
        other => panic!("expected MessageFailed, got {other}"),
    }
    worker.stop().await;
    assert_eq!(actor.count(), 7, "the delayed message did not run");
}

/// Keyword arguments bind to parameters by name, as a Python caller sends them.
pub async fn kwargs_bind_by_name(tb: &TestBroker) {
    #[derive(Clone)]
    struct Sub(Arc<std::sync::Mutex<Vec<i64>>>, String);
    impl Actor for Sub {
        type Args = (i64, i64);
        type Output = i64;
        fn name(&self) -> &str {
            "sub"
        }
        fn arg_names(&self) -> &[&str] {
            &["x", "y"]
        }
        fn options(&self) -> ActorOptions {
            ActorOptions::new().queue_name(self.1.clone())
        }
        async fn call(&self, (x, y): (i64, i64)) -> Result<i64, ActorError> {
            if let Ok(mut seen) = self.0.lock() {
                seen.push(x - y);
            }
            Ok(x - y)
        }
    }
    let q = unique_queue("kwargs");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = App::builder(Arc::clone(&tb.broker))
        .actor(Sub(Arc::clone(&seen), q.clone()))
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    let mut kw = Map::new();
    kw.insert("y".into(), json!(2));
    kw.insert("x".into(), json!(10));
    app.enqueue(Message::new(&q, "sub", vec![], kw), None)
        .await
        .expect("enqueue");
    let mut kw = Map::new();
    kw.insert("y".into(), json!(5));
    app.enqueue(Message::new(&q, "sub", vec![json!(7)], kw), None)
        .await
        .expect("enqueue");
    assert!(eventually(WAIT, || seen.lock().map(|s| s.len()).unwrap_or(0) == 2).await);
    worker.stop().await;
    let mut got = seen.lock().map(|s| s.clone()).unwrap_or_default();
    got.sort_unstable();
    assert_eq!(got, vec![2, 8]);
}

/// A delayed message never starts before its eta.
pub async fn delayed_message_not_started_before_eta(tb: &TestBroker) {
    let q = unique_queue("delay");
    let actor = TestActor::new("later", &q);
    let app = App::builder(Arc::clone(&tb.broker))
        .actor(actor.clone())
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    let delay = Duration::from_millis(800);
    let sent_at = Instant::now();
    app.send_with_options(&actor, vec![], SendOptions::new().delay(delay))
        .await
        .expect("send");
    assert!(eventually(WAIT, || actor.count() == 1).await, "delayed message ran");
    let started = actor.calls()[0].at;
    assert!(
        started.duration_since(sent_at) >= delay,
        "started after {:?}",
        started.duration_since(sent_at)
    );
    worker.stop().await;
}

/// Delayed messages do not hold up ready ones, and stay delayed.
pub async fn delayed_messages_do_not_block_ready_ones(tb: &TestBroker) {
    let q = unique_queue("noblock");
    let actor = TestActor::new("mixed", &q);
    let app = App::builder(Arc::clone(&tb.broker))
        .actor(actor.clone())
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    for _ in 0..5 {
        app.send_with_options(
            &actor,
            vec![json!("late")],
            SendOptions::new().delay(Duration::from_secs(3600)),
        )
        .await
        .expect("send delayed");
    }
    for _ in 0..5 {
        app.send(&actor, vec![json!("now")]).await.expect("send");
    }
    // Due soon and sent after the long-delayed ones: once it has run, the worker has been past
    // those (fetched and held, or passed over on the broker) without running them.
    app.send_with_options(
        &actor,
        vec![json!("soon")],
        SendOptions::new().delay(Duration::from_millis(100)),
    )
    .await
    .expect("send soon");
    let ran = |arg: &str| actor.calls().iter().filter(|c| c.args[0] == json!(arg)).count();
    assert!(
        eventually(WAIT, || ran("now") == 5 && ran("soon") == 1).await,
        "ready ones ran: {}",
        actor.count()
    );
    assert_eq!(ran("late"), 0, "a delayed message ran early");
    worker.stop().await;
    let stats = tb.broker.stats(&q).await.expect("stats");
    assert_eq!(
        stats.delayed, 5,
        "delayed ones are back on the broker after shutdown: {stats:?}"
    );
    assert_eq!(stats.ready + stats.in_flight, 0, "{stats:?}");
}

/// A failure is retried: same message id, `retries` + 1, after a backoff within bounds.
pub async fn retries_reenqueue_with_backoff(tb: &TestBroker) {
    let q = unique_queue("retry");
    let actor = TestActor::new("flaky", &q).behaviour(|i, _| async move {
        if i < 2 {
            Err(ActorError::msg("not yet"))
        } else {
            Ok(Value::Null)
        }
    });
    let app = App::builder(Arc::clone(&tb.broker))
        .retries(fast_retries())
        .actor(actor.clone())
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    let sent = app.send(&actor, vec![]).await.expect("send");
    assert!(
        eventually(WAIT, || actor.count() == 3).await,
        "three attempts, got {}",
        actor.count()
    );
    let calls = actor.calls();
    worker.stop().await;
    let ids: Vec<&str> = calls
        .iter()
        .filter_map(|c| c.message.as_ref().map(|m| m.message_id.as_str()))
        .collect();
    assert_eq!(ids, vec![sent.message_id(); 3], "retries keep the message id");
    let retries: Vec<u64> = calls
        .iter()
        .filter_map(|c| c.message.as_ref().map(Message::retries))
        .collect();
    assert_eq!(retries, vec![0, 1, 2]);
    let first_gap = calls[1].at.duration_since(calls[0].at);
    let second_gap = calls[2].at.duration_since(calls[1].at);
    // min_backoff 50 ms: the first retry waits 50..100 ms, the second 100..200 ms (plus latency).
    assert!(first_gap >= Duration::from_millis(50), "first gap {first_gap:?}");
    assert!(second_gap >= Duration::from_millis(100), "second gap {second_gap:?}");
    assert!(
        first_gap < Duration::from_secs(3) && second_gap < Duration::from_secs(3),
        "{first_gap:?} {second_gap:?}"
    );
    let tb_message = calls[2].message.as_ref().expect("message");
    assert!(tb_message.traceback().is_some_and(|t| t.contains("not yet")));
}

/// After `max_retries` retries the message goes to the dead letters with its traceback.
pub async fn retries_exhausted_go_to_dead_letters(tb: &TestBroker) {
    let q = unique_queue("exhaust");
    let actor = TestActor::new("always_fails", &q)
        .options(|o| o.max_retries(2))
        .behaviour(|_, _| async { Err(ActorError::new("ValueError", "always")) });
    let app = App::builder(Arc::clone(&tb.broker))
        .retries(fast_retries())
        .actor(actor.clone())
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    let sent = app.send(&actor, vec![]).await.expect("send");
    let dead = wait_dead(tb, &q, 1).await;
    worker.stop().await;
    assert_eq!(actor.count(), 3, "max_retries=2 means three attempts");
    assert!(dead[0].reason.contains("ValueError: always"), "{:?}", dead[0].reason);
    let m = dead[0].message.as_ref().expect("decodes");
    assert_eq!(m.message_id, sent.message_id());
}

/// `fail_permanently` dead-letters at once.
pub async fn fail_permanently_skips_retries(tb: &TestBroker) {
    let q = unique_queue("perm");
    let actor = TestActor::new("refuses", &q)
        .behaviour(|_, _| async { Err(ActorError::fail_permanently(ActorError::new("Invalid", "bad input"))) });
    let app = App::builder(Arc::clone(&tb.broker))
        .retries(fast_retries())
        .actor(actor.clone())
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    app.send(&actor, vec![]).await.expect("send");
    let dead = wait_dead(tb, &q, 1).await;
    // Once the worker has stopped, the message's handling is over: a retry would either have
    // run or be back on the broker (delayed by its backoff).
    worker.stop().await;
    assert_eq!(actor.count(), 1);
    let stats = tb.broker.stats(&q).await.expect("stats");
    assert_eq!(stats.pending(), 0, "no retry was enqueued: {stats:?}");
    assert!(dead[0].reason.contains("Invalid: bad input"), "{:?}", dead[0].reason);
}

/// The bad-input cases' actor: `typed(n: i64, s: String)` on a queue of the case's, counting
/// its runs (a bad message must never reach it).
#[derive(Clone)]
struct Typed(String, Arc<std::sync::atomic::AtomicUsize>);

impl Actor for Typed {
    type Args = (i64, String);
    type Output = ();
    fn name(&self) -> &str {
        "typed"
    }
    fn arg_names(&self) -> &[&str] {
        &["n", "s"]
    }
    fn options(&self) -> ActorOptions {
        ActorOptions::new().queue_name(self.0.clone())
    }
    async fn call(&self, _: (i64, String)) -> Result<(), ActorError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The bad-input corpus (docs/reliability.md): bytes no producer should send and values no
/// actor expects. Each raw input ends in the dead letters with a reason; each bad enqueue is
/// refused with an error that names the problem; messages with extreme option values run or are
/// dead-lettered without harming the worker; the worker keeps running throughout.
pub async fn bad_input_corpus_is_dead_lettered_or_refused(tb: &TestBroker) {
    let q = unique_queue("corpus");
    let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = App::builder(Arc::clone(&tb.broker))
        .retries(fast_retries().max_retries(Some(1)))
        .actor(Typed(q.clone(), Arc::clone(&ran)))
        .build()
        .expect("app");
    app.declare_queue(&q).await.expect("declare");
    let worker = start(&app, 2).await;

    // Raw bytes on the queue: every one is dead-lettered with a reason.
    let good = serde_json::to_value(message(&q, "typed", vec![json!(1), json!("s")])).expect("a message value");
    let encoded = serde_json::to_vec(&good).expect("encode");
    let mut raw: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("garbage bytes".into(), (0..=255_u8).rev().cycle().take(4096).collect()),
        ("truncated JSON".into(), encoded[..encoded.len() / 2].to_vec()),
        ("JSON null".into(), b"null".to_vec()),
        ("a JSON array".into(), b"[1, 2, 3]".to_vec()),
        ("a JSON string".into(), br#""typed""#.to_vec()),
        ("NaN".into(), format!(r#"{{"queue_name":"{q}","actor_name":"typed","args":[NaN, "s"],"kwargs":{{}},"options":{{}},"message_id":"a","message_timestamp":1}}"#).into_bytes()),
        ("Infinity".into(), format!(r#"{{"queue_name":"{q}","actor_name":"typed","args":[Infinity, "s"],"kwargs":{{}},"options":{{}},"message_id":"b","message_timestamp":1}}"#).into_bytes()),
        ("a number out of range".into(), format!(r#"{{"queue_name":"{q}","actor_name":"typed","args":[1e400, "s"],"kwargs":{{}},"options":{{}},"message_id":"c","message_timestamp":1}}"#).into_bytes()),
        ("nested 100,000 deep".into(), {
            let mut v = format!(r#"{{"queue_name":"{q}","actor_name":"typed","args":"#).into_bytes();
            v.extend(std::iter::repeat_n(b'[', 100_000));
            v.extend(std::iter::repeat_n(b']', 100_000));
            v.extend_from_slice(br#","kwargs":{},"options":{},"message_id":"d","message_timestamp":1}"#);
            v
        }),
    ];
    // Every field with a value of the wrong type.
    let wrong: [(&str, Value); 7] = [
        ("queue_name", json!(7)),
        ("actor_name", json!(null)),
        ("args", json!({"n": 1})),
        ("kwargs", json!([1, 2])),
        ("options", json!("none")),
        ("message_id", json!(12)),
        ("message_timestamp", json!("yesterday")),
    ];
    for (field, value) in wrong {
        let mut bad = good.clone();
        bad[field] = value;
        raw.push((
            format!("{field} of the wrong type"),
            serde_json::to_vec(&bad).expect("encode"),
        ));
    }
    for (_, bytes) in &raw {
        (tb.raw)(q.clone(), bytes.clone()).await.expect("raw");
    }
    let dead = wait_dead(tb, &q, raw.len()).await;
    assert_eq!(dead.len(), raw.len(), "each raw input is dead-lettered once: {dead:#?}");
    assert!(
        dead.iter().all(|d| !d.reason.trim().is_empty()),
        "each with a reason: {dead:#?}"
    );

    // Enqueues that are refused, each with an error that says why.
    let huge = "x".repeat(10 * 1024 * 1024);
    let refused: Vec<(&str, Message, &str)> = vec![
        (
            "a 10 MiB argument",
            message(&q, "typed", vec![json!(1), json!(huge)]),
            "limit",
        ),
        ("an empty queue name", message("", "typed", vec![]), "queue name"),
        (
            "a queue name with a space",
            message("two words", "typed", vec![]),
            "queue name",
        ),
        (
            "a queue name with a slash",
            message("a/b", "typed", vec![]),
            "queue name",
        ),
        (
            "a 300-byte queue name",
            message(&"q".repeat(300), "typed", vec![]),
            "queue name",
        ),
    ];
    for (what, bad, needle) in refused {
        let error = app.enqueue(bad, None).await.expect_err(what).to_string();
        assert!(error.contains(needle) && !error.contains('\n'), "{what}: {error}");
    }

    // Extreme option values: the message runs (or is dead-lettered with a reason); nothing panics.
    let extremes: [(&str, Value); 6] = [
        ("retries", json!(u64::MAX)),
        ("max_retries", json!(-1)),
        ("time_limit", json!(1e300)),
        ("min_backoff", json!(-5)),
        ("max_backoff", json!(1e300)),
        ("priority", json!(1e300)),
    ];
    for (key, value) in &extremes {
        let mut m = message(&q, "typed", vec![json!(1), json!("s")]);
        m.options.insert((*key).into(), value.clone());
        app.enqueue(m, None).await.expect("an extreme option value is accepted");
    }
    let settled = eventually(WAIT, || ran.load(std::sync::atomic::Ordering::SeqCst) >= 1).await;
    assert!(settled, "messages with extreme option values ran");
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = tb.broker.stats(&q).await.expect("stats");
        let done = u64::try_from(ran.load(std::sync::atomic::Ordering::SeqCst)).expect("a count") + stats.dead
            - u64::try_from(raw.len()).expect("a count");
        if done >= u64::try_from(extremes.len()).expect("a count") && stats.pending() == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "messages with extreme options did not settle: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Still alive: a good message runs.
    let before = ran.load(std::sync::atomic::Ordering::SeqCst);
    app.enqueue(message(&q, "typed", vec![json!(2), json!("ok")]), None)
        .await
        .expect("good");
    assert!(
        eventually(WAIT, || ran.load(std::sync::atomic::Ordering::SeqCst) == before + 1).await,
        "the worker still runs"
    );
    worker.stop().await;
    eprintln!(
        "bad-input corpus: {} raw inputs dead-lettered, 5 enqueues refused, {} extreme option values settled",
        raw.len(),
        extremes.len()
    );
}

/// Undecodable bytes, an unknown actor, wrong argument types, missing and surplus arguments,
/// and an oversized payload all go to the dead letters with a reason; the worker keeps running.
pub async fn bad_input_goes_to_dead_letters(tb: &TestBroker) {
    let q = unique_queue("bad");
    let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = App::builder(Arc::clone(&tb.broker))
        .retries(fast_retries())
        .actor(Typed(q.clone(), Arc::clone(&ran)))
        .build()
        .expect("app");
    app.declare_queue(&q).await.expect("declare");
    let worker = start(&app, 2).await;
    (tb.raw)(q.clone(), b"\xff\xfe not a message".to_vec())
        .await
        .expect("raw");
    (tb.raw)(
        q.clone(),
        br#"{"queue_name":"x","actor_name":"typed","args":[],"kwargs":{},"options":{},"extra":1}"#.to_vec(),
    )
    .await
    .expect("raw");
    let mut oversized = JsonEncoder
        .encode(&message(&q, "typed", vec![json!(1), json!("s")]))
        .expect("encode");
    oversized.truncate(oversized.len() - 1);
    oversized.extend_from_slice(&vec![b' '; tb.max_message_size]);
    oversized.push(b'}');
    (tb.raw)(q.clone(), oversized).await.expect("raw");
    app.enqueue(message(&q, "nobody", vec![]), None)
        .await
        .expect("unknown actor");
    app.enqueue(message(&q, "typed", vec![json!("not a number"), json!("s")]), None)
        .await
        .expect("wrong type");
    app.enqueue(message(&q, "typed", vec![json!(1)]), None)
        .await
        .expect("missing");
    app.enqueue(message(&q, "typed", vec![json!(1), json!("s"), json!(3)]), None)
        .await
        .expect("surplus");
    let mut kw = Map::new();
    kw.insert("zzz".into(), json!(1));
    app.enqueue(Message::new(&q, "typed", vec![json!(1), json!("s")], kw), None)
        .await
        .expect("unknown kwarg");
    let dead = wait_dead(tb, &q, 8).await;
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    let has = |needle: &str| reasons.iter().any(|r| r.contains(needle));
    assert!(has("undecodable"), "{reasons:#?}");
    assert!(has("unknown field `extra`"), "{reasons:#?}");
    assert!(has("limit"), "{reasons:#?}");
    assert!(has("ActorNotFound"), "{reasons:#?}");
    assert!(has("invalid type: string \"not a number\""), "{reasons:#?}");
    assert!(has("missing"), "{reasons:#?}");
    assert!(has("positional argument"), "{reasons:#?}");
    assert!(has("\"zzz\""), "{reasons:#?}");
    // Still alive: a good message runs.
    app.enqueue(message(&q, "typed", vec![json!(1), json!("ok")]), None)
        .await
        .expect("good");
    assert!(
        eventually(WAIT, || ran.load(std::sync::atomic::Ordering::SeqCst) == 1).await,
        "worker still runs"
    );
    worker.stop().await;
    assert_eq!(
        ran.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "no bad message reached the actor"
    );
}

/// Among prefetched messages, lower actor priority runs first.
pub async fn actor_priority_orders_prefetched_work(tb: &TestBroker) {
    let q = unique_queue("prio");
    let pause = Duration::from_millis(30);
    let low = TestActor::new("low", &q)
        .options(|o| o.priority(10))
        .behaviour(move |_, _| async move {
            tokio::time::sleep(pause).await;
            Ok(Value::Null)
        });
    let high = TestActor::new("high", &q).behaviour(move |_, _| async move {
        tokio::time::sleep(pause).await;
        Ok(Value::Null)
    });
    let app = App::builder(Arc::clone(&tb.broker))
        .actor(low.clone())
        .actor(high.clone())
        .build()
        .expect("app");
    for _ in 0..5 {
        app.send(&low, vec![]).await.expect("send");
    }
    for _ in 0..5 {
        app.send(&high, vec![]).await.expect("send");
    }
    let worker = Worker::builder(app.clone())
        .concurrency(1)
        .prefetch(20)
        .fetch_timeout(FETCH)
        .start()
        .await
        .expect("worker");
    assert!(eventually(WAIT, || low.count() + high.count() == 10).await);
    worker.stop().await;
    let mut all: Vec<(Instant, &str)> = low.calls().iter().map(|c| (c.at, "low")).collect();
    all.extend(high.calls().iter().map(|c| (c.at, "high")));
    all.sort();
    let last_high = all.iter().rposition(|(_, n)| *n == "high").unwrap_or(0);
    let lows_before = all[..last_high].iter().filter(|(_, n)| *n == "low").count();
    assert!(
        lows_before <= 1,
        "high-priority work should run first: {:?}",
        all.iter().map(|(_, n)| *n).collect::<Vec<_>>()
    );
}

/// The broker itself delivers lower priorities first (FIFO within a priority): messages
/// queued at -10, -5, -1 and 0 come out most urgent first. A message at priority 0 carries no
/// `troupe_priority` option (Dramatiq's exact bytes).
pub async fn broker_delivers_lower_priorities_first(tb: &TestBroker) {
    let q = unique_queue("prio_order");
    let actor = TestActor::new("ordered", &q);
    let app = App::builder(Arc::clone(&tb.broker))
        .actor(actor.clone())
        .build()
        .expect("app");
    let sent = [(0, "a"), (-1, "b"), (0, "c"), (-5, "d"), (-1, "e"), (-10, "f")];
    for (priority, tag) in sent {
        let message = app
            .send_with_options(&actor, vec![json!(tag)], SendOptions::new().priority(priority))
            .await
            .expect("send")
            .into_message();
        assert_eq!(message.priority(), priority);
        assert_eq!(
            message.options.contains_key("troupe_priority"),
            priority != 0,
            "{:?}",
            message.options
        );
    }
    let order: Vec<String> = take_in_order(tb, &q, sent.len(), 1)
        .await
        .iter()
        .map(|m| m.args[0].as_str().unwrap_or_default().to_owned())
        .collect();
    if tb.broker.capabilities().broker_priorities {
        assert_eq!(
            order,
            ["f", "d", "b", "e", "a", "c"],
            "most urgent first, FIFO within a priority"
        );
    } else {
        // What the broker says it does: arrival order, whatever the priority.
        assert_eq!(
            order,
            ["a", "b", "c", "d", "e", "f"],
            "a broker without priorities delivers in arrival order"
        );
    }
}

/// One priority model, honoured by the broker: with a backlog of 1,000 messages at priority 5
/// (their actor's) being worked through, a message sent after them at priority -5 runs before
/// half of the backlog has. A broker without priorities (per its capabilities) runs it in
/// arrival order: after at least half of the backlog.
pub async fn urgent_message_overtakes_a_backlog(tb: &TestBroker) {
    let q = unique_queue("prio_backlog");
    let actor = TestActor::new("busy", &q)
        .options(|o| o.priority(5))
        .behaviour(|_, args| async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(args.into_iter().next().unwrap_or(Value::Null))
        });
    let app = App::builder(Arc::clone(&tb.broker))
        .actor(actor.clone())
        .build()
        .expect("app");
    let backlog = app
        .send_many(&actor, (0..1000).map(|i| vec![json!(i)]))
        .await
        .expect("send the backlog");
    assert_eq!(
        backlog[0].message().priority(),
        5,
        "the actor's priority travels with its messages"
    );
    let worker = start(&app, 2).await;
    assert!(
        eventually(WAIT, || actor.count() > 0).await,
        "the backlog starts running"
    );
    let urgent = app
        .send_with_options(&actor, vec![json!("urgent")], SendOptions::new().priority(-5))
        .await
        .expect("send the urgent message");
    assert_eq!(urgent.message().priority(), -5);
    let position = || actor.calls().iter().position(|c| c.args[0] == json!("urgent"));
    assert!(
        eventually(Duration::from_secs(30), || position().is_some()).await,
        "the urgent message ran ({} backlog messages ran)",
        actor.count()
    );
    worker.stop().await;
    let before = position().unwrap_or(usize::MAX);
    if tb.broker.capabilities().broker_priorities {
        assert!(
            before < 500,
            "the urgent message ran after {before} of the 1,000 backlog messages"
        );
    } else {
        assert!(
            before >= 500,
            "a broker without priorities delivers in arrival order, yet the urgent message ran after only {before} of the 1,000 backlog messages"
        );
    }
    tb.broker.purge(&q).await.expect("purge");
}

/// A worker's prefetched messages run fairly between its queues: with 200 messages of one
/// queue prefetched ahead (concurrency 1, a fixed window of 200, 2 ms each), a message sent to
/// a quiet queue runs within a few of them, not after the whole window.
pub async fn a_quiet_queue_overtakes_another_queues_prefetched_messages(tb: &TestBroker) {
    let (busy_q, quiet_q) = (unique_queue("fair_busy"), unique_queue("fair_quiet"));
    let busy = TestActor::new("busy", &busy_q).behaviour(|_, _| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok(Value::Null)
    });
    let quiet = TestActor::new("quiet", &quiet_q);
    let app = App::builder(Arc::clone(&tb.broker))
        .actor(busy.clone())
        .actor(quiet.clone())
        .build()
        .expect("app");
    app.declare_queue(&quiet_q).await.expect("declare");
    app.send_many(&busy, (0..400).map(|i| vec![json!(i)]))
        .await
        .expect("send the backlog");
    let worker = Worker::builder(app.clone())
        .concurrency(1)
        .prefetch(200)
        .fetch_timeout(FETCH)
        .shutdown_timeout(Duration::from_secs(5))
        .start()
        .await
        .expect("worker starts");
    // Once the window is full: the busy queue's messages wait ahead in the worker.
    assert!(
        eventually(WAIT, || busy.count() >= 5 && worker.held().0 >= 150).await,
        "the worker prefetched the busy queue ({} ran, {:?} held)",
        busy.count(),
        worker.held()
    );
    let ran_before_send = busy.count();
    app.send(&quiet, vec![]).await.expect("send to the quiet queue");
    assert!(
        eventually(WAIT, || quiet.count() == 1).await,
        "the quiet queue's message ran"
    );
    worker.stop().await;
    let quiet_at = quiet.calls()[0].at;
    let ran_before_quiet = busy.calls().iter().filter(|c| c.at < quiet_at).count();
    let waited_behind = ran_before_quiet.saturating_sub(ran_before_send);
    assert!(
        waited_behind < 60,
        "the quiet queue's message waited behind {waited_behind} of the busy queue's prefetched messages"
    );
    tb.broker.purge(&busy_q).await.expect("purge");
}

/// A graceful shutdown lets running actors finish and returns prefetched and delayed messages;
/// a new worker then processes everything: nothing lost.
pub async fn graceful_shutdown_returns_prefetched_and_delayed(tb: &TestBroker) {
    let q = unique_queue("shutdown");
    let actor = TestActor::new("slow", &q).behaviour(|_, _| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Value::Null)
    });
    let app = App::builder(Arc::clone(&tb.broker))
        .actor(actor.clone())
        .build()
        .expect("app");
    for i in 0..6 {
        app.send(&actor, vec![json!(i)]).await.expect("send");
    }
    app.send_with_options(
        &actor,
        vec![json!("delayed")],
        SendOptions::new().delay(Duration::from_millis(1500)),
    )
    .await
    .expect("send delayed");
    let worker = Worker::builder(app.clone())
        .concurrency(1)
        .prefetch(10)
        .fetch_timeout(FETCH)
        .start()
        .await
        .expect("worker");
    assert!(eventually(WAIT, || actor.count() >= 1).await);
    worker.stop_with_timeout(Duration::from_secs(5)).await;
    let ran = actor.count();
    assert!(ran < 6, "the shutdown came before the queue drained ({ran} ran)");
    let deadline = Instant::now() + tb.redelivery_timeout + WAIT;
    loop {
        let stats = tb.broker.stats(&q).await.expect("stats");
        if stats.in_flight == 0 && stats.ready + stats.delayed == (7 - ran) as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "messages not returned after shutdown ({ran} ran): {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let worker = start(&app, 4).await;
    let distinct = || {
        let mut args: Vec<String> = actor.calls().iter().map(|c| c.args[0].to_string()).collect();
        args.sort();
        args.dedup();
        args
    };
    assert!(
        eventually(WAIT, || actor.count() >= 7 && distinct().len() == 7).await,
        "every message ran: {}",
        actor.count()
    );
    worker.stop().await;
    let args = distinct();
    assert_eq!(args.len(), 7, "all seven distinct messages ran: {args:?}");
}

/// An actor over its time limit fails with `TimeLimitExceeded` and is retried.
pub async fn time_limit_fails_and_retries(tb: &TestBroker) {
    let q = unique_queue("limit");
    let actor = TestActor::new("sleepy", &q)
        .options(|o| o.time_limit(Duration::from_millis(100)).max_retries(1))
        .behaviour(|_, _| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(Value::Null)
        });
    let app = App::builder(Arc::clone(&tb.broker))
        .retries(fast_retries())
        .actor(actor.clone())
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    let started = Instant::now();
    app.send(&actor, vec![]).await.expect("send");
    let dead = wait_dead(tb, &q, 1).await;
    worker.stop().await;
    assert_eq!(actor.count(), 2, "one attempt and one retry");
    assert!(dead[0].reason.contains("TimeLimitExceeded"), "{:?}", dead[0].reason);
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A panicking actor is a failure like an error; the worker survives.
pub async fn panics_are_failures(tb: &TestBroker) {
    let q = unique_queue("panic");
    let actor = TestActor::new("panicky", &q)
        .options(|o| o.max_retries(0))
        .behaviour(|i, _| async move {
            if i == 0 {
                panic!("kaboom");
            }
            Ok(Value::Null)
        });
    let app = App::builder(Arc::clone(&tb.broker))
        .retries(fast_retries())
        .actor(actor.clone())
        .build()
        .expect("app");
    let worker = start(&app, 1).await;
    app.send(&actor, vec![]).await.expect("send");
    let dead = wait_dead(tb, &q, 1).await;
    assert!(dead[0].reason.contains("kaboom"), "{:?}", dead[0].reason);
    app.send(&actor, vec![]).await.expect("send");
    assert!(
        eventually(WAIT, || actor.count() == 2).await,
        "worker survived the panic"
    );
    worker.stop().await;
}

/// Results are stored for actors with `store_results`, failures too.
pub async fn results_are_stored(tb: &TestBroker) {
    let q = unique_queue("results");
    let ok = TestActor::new("ok", &q).options(|o| o.store_results(true));
    let bad = TestActor::new("bad", &q)
        .options(|o| o.store_results(true).max_retries(0))
        .behaviour(|_, _| async { Err(ActorError::new("ValueError", "nope")) });
    let app = App::builder(Arc::clone(&tb.broker))
        .retries(fast_retries())
        .results(Arc::clone(&tb.results))
        .actor(ok.clone())
        .actor(bad.clone())
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    let sent = app.send(&ok, vec![json!({"a": [1, 2]})]).await.expect("send");
    let failed = app.send(&bad, vec![]).await.expect("send");
    let value = app.get_result(sent.message(), Some(WAIT)).await.expect("result");
    assert_eq!(value, json!({"a": [1, 2]}));
    match app.get_result(failed.message(), Some(WAIT)).await {
        Err(Error::ResultFailure { error_type, message }) => {
            assert_eq!((error_type.as_str(), message.as_str()), ("ValueError", "nope"));
        }
        other => panic!("expected a stored failure, got {other:?}"),
    }
    worker.stop().await;
}

/// A pipeline runs its stages in order, each getting the previous result.
pub async fn pipelines_pass_results_on(tb: &TestBroker) {
    let q = unique_queue("pipe");
    let add = TestActor::new("p_add", &q)
        .behaviour(|_, args| async move { Ok(json!(args.iter().filter_map(Value::as_i64).sum::<i64>())) });
    let app = App::builder(Arc::clone(&tb.broker))
        .results(Arc::clone(&tb.results))
        .actor(add.clone())
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    let stages = vec![
        App::message(&add, &vec![json!(1), json!(2)]).expect("message"),
        App::message(&add, &vec![json!(10)]).expect("message"),
        App::message(&add, &vec![json!(100)])
            .expect("message")
            .with_option(option_keys::STORE_RESULTS, true),
    ];
    let pipe = pipeline(stages).expect("pipeline");
    pipe.run(&app, None).await.expect("run");
    let result = pipe.get_result(&app, Some(WAIT)).await.expect("result");
    worker.stop().await;
    assert_eq!(result, json!(113));
    assert_eq!(add.count(), 3);
}
