//! Operator views every broker gives (the `troupe` command and the dashboard are built on
//! them): deleting single dead letters, listing queues, and live workers' heartbeats.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, json};
use troupe_core::{App, ConsumerOptions, Message, Waiting, WorkerInfo, now_ms};
use troupe_worker::Worker;

use crate::TestBroker;
use crate::support::{TestActor, unique_queue};

const WAIT: Duration = Duration::from_secs(10);

/// Nacks `n` fresh messages of `queue` into its dead letters; their ids, in send order.
async fn dead_letters(tb: &TestBroker, queue: &str, n: usize) -> Vec<String> {
    tb.broker.declare_queue(queue).await.expect("declare");
    let mut ids = Vec::new();
    for i in 0..n {
        let sent = tb
            .broker
            .enqueue(Message::new(queue, "a", vec![json!(i)], Map::new()), None)
            .await
            .expect("enqueue");
        ids.push(sent.message_id);
    }
    let mut consumer = tb
        .broker
        .consume(queue, ConsumerOptions::new(n))
        .await
        .expect("consume");
    let mut nacked = 0;
    let deadline = Instant::now() + WAIT;
    while nacked < n && Instant::now() < deadline {
        for d in consumer.fetch(n, Duration::from_millis(200)).await.expect("fetch") {
            d.nack(None, "failed").await.expect("nack");
            nacked += 1;
        }
    }
    consumer.close().await.expect("close");
    let deadline = Instant::now() + WAIT;
    while tb.broker.dead_letters(queue, 100).await.map(|d| d.len()).unwrap_or(0) < n {
        assert!(Instant::now() < deadline, "{n} dead letters");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ids
}

/// `delete_dead_letters` deletes exactly the named dead letters; unknown ids and an empty
/// list delete nothing.
pub async fn dead_letters_are_deleted_by_id(tb: &TestBroker) {
    let q = unique_queue("dldel");
    let ids = dead_letters(tb, &q, 3).await;
    let broker = &tb.broker;
    assert_eq!(broker.delete_dead_letters(&q, &[]).await.expect("delete none"), 0);
    assert_eq!(
        broker
            .delete_dead_letters(&q, &["no-such-id".to_owned()])
            .await
            .expect("delete unknown"),
        0
    );
    assert_eq!(
        broker.delete_dead_letters(&q, &[ids[1].clone()]).await.expect("delete"),
        1
    );
    let mut left: Vec<String> = broker
        .dead_letters(&q, 100)
        .await
        .expect("dead")
        .into_iter()
        .map(|d| d.id)
        .collect();
    left.sort();
    let mut want = vec![ids[0].clone(), ids[2].clone()];
    want.sort();
    assert_eq!(left, want, "the other dead letters stay");
    assert_eq!(broker.stats(&q).await.expect("stats").dead, 2);
    assert_eq!(broker.delete_dead_letters(&q, &ids).await.expect("delete the rest"), 2);
    assert!(broker.dead_letters(&q, 100).await.expect("dead").is_empty());
}

/// A declared queue is among `queue_names`, by its canonical name, and delay and dead-letter
/// queues are not.
pub async fn declared_queues_are_listed(tb: &TestBroker) {
    let q = unique_queue("listed");
    tb.broker.declare_queue(&q).await.expect("declare");
    tb.broker
        .enqueue(Message::new(&q, "a", vec![], Map::new()), Some(Duration::from_secs(60)))
        .await
        .expect("enqueue delayed");
    let names = tb.broker.queue_names().await.expect("queue names");
    assert!(names.contains(&q), "{q} not in {names:?}");
    assert!(
        names.iter().all(|n| !n.ends_with(".DQ") && !n.ends_with(".XQ")),
        "only canonical names: {names:?}"
    );
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "sorted");
    tb.broker.purge(&q).await.expect("purge");
}

fn beat(id: &str, ttl: Duration) -> WorkerInfo {
    WorkerInfo::new(id, vec!["alpha".into(), "beta".into()], 8, ttl)
}

/// A heartbeat is listed with its fields until it expires or the worker is forgotten; a new
/// beat replaces the last.
pub async fn worker_heartbeats_are_listed_until_they_expire(tb: &TestBroker) {
    let broker = &tb.broker;
    let id = uuid::Uuid::new_v4().to_string();
    let mut info = beat(&id, Duration::from_secs(30));
    info.in_flight.insert("alpha".into(), 3);
    broker.beat(&info).await.expect("beat");
    let find = |id: String| async move {
        broker
            .workers()
            .await
            .expect("workers")
            .into_iter()
            .find(|w| w.id == id)
    };
    let listed = find(id.clone()).await.expect("the worker is listed");
    assert_eq!(listed, info, "every field comes back");
    info.in_flight.insert("alpha".into(), 1);
    info.processed = 42;
    info.beat_at = now_ms();
    broker.beat(&info).await.expect("beat again");
    let listed = find(id.clone()).await.expect("still listed");
    assert_eq!(
        (listed.in_flight["alpha"], listed.processed),
        (1, 42),
        "the latest beat wins"
    );
    broker.forget_worker(&id).await.expect("forget");
    assert!(find(id.clone()).await.is_none(), "a forgotten worker is not listed");

    let short = uuid::Uuid::new_v4().to_string();
    broker
        .beat(&beat(&short, Duration::from_millis(1500)))
        .await
        .expect("beat");
    assert!(find(short.clone()).await.is_some(), "listed while live");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(find(short).await.is_none(), "an expired heartbeat is not listed");
}

/// A running worker beats on its own: listed with its queue and the messages it holds, and
/// gone once it stopped.
pub async fn a_running_worker_is_listed_with_what_it_holds(tb: &TestBroker) {
    let q = unique_queue("beat");
    let actor = TestActor::new("held", &q).behaviour(|_, _| async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(json!(null))
    });
    let app = App::builder(Arc::clone(&tb.broker))
        .actor(actor.clone())
        .build()
        .expect("app");
    let worker = Worker::builder(app.clone())
        .concurrency(2)
        .fetch_timeout(Duration::from_millis(200))
        .heartbeat(Duration::from_millis(200))
        .shutdown_timeout(Duration::from_secs(5))
        .start()
        .await
        .expect("worker starts");
    let id = worker.id().to_owned();
    app.send(&actor, vec![]).await.expect("send");
    let deadline = Instant::now() + WAIT;
    loop {
        let listed = tb.broker.workers().await.expect("workers");
        let holding = listed.iter().any(|w| {
            w.id == id
                && w.queues.contains(&q)
                && w.concurrency == 2
                && w.in_flight.get(&q).copied() == Some(1)
                && w.pid == std::process::id()
        });
        if holding {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker is not listed holding its message: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await;
    assert_eq!(actor.count(), 1);
    let listed = tb.broker.workers().await.expect("workers");
    assert!(
        listed.iter().all(|w| w.id != id),
        "a stopped worker is not listed: {listed:?}"
    );
}

/// `peek` pages through ready messages in delivery order and lists delayed ones, leaving them
/// in the queue.
pub async fn peek_pages_through_waiting_messages(tb: &TestBroker) {
    let q = unique_queue("peek");
    tb.broker.declare_queue(&q).await.expect("declare");
    let mut ready = Vec::new();
    for i in 0..5 {
        let sent = tb
            .broker
            .enqueue(Message::new(&q, "a", vec![json!(i)], Map::new()), None)
            .await
            .expect("enqueue");
        ready.push(sent.message_id);
    }
    let mut delayed = Vec::new();
    for i in 0..2 {
        let sent = tb
            .broker
            .enqueue(
                Message::new(&q, "a", vec![json!(i)], Map::new()),
                Some(Duration::from_secs(600)),
            )
            .await
            .expect("enqueue delayed");
        delayed.push(sent.message_id);
    }
    let ids = |ms: Vec<Message>| ms.into_iter().map(|m| m.message_id).collect::<Vec<_>>();
    let first = ids(tb.broker.peek(&q, Waiting::Ready, 0, 3).await.expect("peek"));
    assert_eq!(first, ready[..3], "the first page, in delivery order");
    let rest = ids(tb.broker.peek(&q, Waiting::Ready, 3, 10).await.expect("peek"));
    assert_eq!(rest, ready[3..], "the second page");
    assert!(
        tb.broker
            .peek(&q, Waiting::Ready, 5, 10)
            .await
            .expect("peek")
            .is_empty()
    );
    let mut waiting = ids(tb.broker.peek(&q, Waiting::Delayed, 0, 10).await.expect("peek delayed"));
    waiting.sort();
    let mut want = delayed.clone();
    want.sort();
    assert_eq!(waiting, want, "the delayed messages");
    let peeked = tb.broker.peek(&q, Waiting::Delayed, 0, 1).await.expect("peek delayed");
    assert_eq!(peeked[0].queue_name, q, "by their canonical queue");
    let eta = peeked[0].eta().expect("a delayed message shows its eta");
    assert!(
        eta > now_ms() + 500_000 && eta <= now_ms() + 600_000,
        "its eta is ten minutes ahead: {eta}"
    );
    // Nothing moved.
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = tb.broker.stats(&q).await.expect("stats");
        if (stats.ready, stats.delayed) == (5, 2) {
            let quick = tb.broker.quick_stats(&q).await.expect("quick stats");
            assert_eq!(quick, stats, "a short queue's quick counts are exact");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the messages stay where they were: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tb.broker.purge(&q).await.expect("purge");
}
