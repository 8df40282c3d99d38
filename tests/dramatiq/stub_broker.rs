//! Ports of `tests/test_stub_broker.py`, on `MemoryBroker`.

use std::time::{Duration, Instant};

use serde_json::Map;
use tokio::sync::Semaphore;
use troupe::{ActorError, App, Broker, ConsumerOptions, Error, MemoryBroker, Message, Worker};

use crate::support::{WAIT, join, join_failed, start};

/// dramatiq tests/test_stub_broker.py::test_stub_broker_raises_queue_error_when_consuming_undeclared_queues
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stub_broker_raises_queue_error_when_consuming_undeclared_queues() {
    let broker = MemoryBroker::new();
    let result = broker.consume("idontexist", ConsumerOptions::new(1)).await;
    assert!(
        matches!(&result, Err(Error::QueueNotFound(q)) if q == "idontexist"),
        "{:?}",
        result.err()
    );
}

/// dramatiq tests/test_stub_broker.py::test_stub_broker_raises_queue_error_when_enqueueing_messages_on_undeclared_queues
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stub_broker_raises_queue_error_when_enqueueing_messages_on_undeclared_queues() {
    let broker = MemoryBroker::new();
    let message = Message::new("idontexist", "do_work", vec![], Map::new());
    let result = broker.enqueue(message, None).await;
    assert!(
        matches!(&result, Err(Error::QueueNotFound(q)) if q == "idontexist"),
        "{result:?}"
    );
}

/// dramatiq tests/test_stub_broker.py::test_stub_broker_raises_queue_error_when_joining_on_undeclared_queues
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stub_broker_raises_queue_error_when_joining_on_undeclared_queues() {
    let broker = MemoryBroker::new();
    let result = broker.join("idontexist", WAIT).await;
    assert!(
        matches!(&result, Err(Error::QueueNotFound(q)) if q == "idontexist"),
        "{result:?}"
    );
}

/// dramatiq tests/test_stub_broker.py::test_stub_broker_can_be_flushed
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stub_broker_can_be_flushed() {
    #[troupe::actor]
    async fn do_work() {}

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .actor(DoWork)
        .build()
        .expect("app");
    for _ in 0..3 {
        DoWork.send(&app).await.expect("send");
    }
    // One message dead-lettered, one in flight (delivered, not acked), one ready.
    let mut consumer = broker
        .consume("default", ConsumerOptions::new(2))
        .await
        .expect("consume");
    let deliveries = consumer.fetch(2, WAIT).await.expect("fetch");
    assert_eq!(deliveries.len(), 2);
    deliveries[0].nack(None, "dead letter").await.expect("nack");
    let stats = broker.stats("default").await.expect("stats");
    assert_eq!((stats.ready, stats.in_flight, stats.dead), (1, 1, 1), "{stats:?}");

    broker.flush_all();

    let stats = broker.stats("default").await.expect("stats");
    assert_eq!((stats.pending(), stats.dead), (0, 0), "{stats:?}");
    // Nothing is unfinished any more: a join returns at once.
    broker
        .join("default", Duration::from_millis(100))
        .await
        .expect("nothing left to join");
    drop(consumer);
}

/// dramatiq tests/test_stub_broker.py::test_stub_broker_can_join_with_timeout
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stub_broker_can_join_with_timeout() {
    static GATE: Semaphore = Semaphore::const_new(0);

    #[troupe::actor]
    async fn do_work() {
        let _permit = GATE.acquire().await;
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .actor(DoWork)
        .build()
        .expect("app");
    DoWork.send(&app).await.expect("send");
    let worker = start(&app, 1).await;
    let started = Instant::now();
    let result = broker.join("default", Duration::from_millis(200)).await;
    assert!(
        matches!(&result, Err(Error::QueueJoinTimeout(q)) if q == "default"),
        "{result:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    GATE.add_permits(1);
    join(&broker, "default").await;
    worker.stop().await;
}

/// dramatiq tests/test_stub_broker.py::test_stub_broker_join_reraises_actor_exceptions_in_the_joining_current_thread
///
/// Also `join(fail_fast=False)`, which does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stub_broker_join_reraises_actor_exceptions_in_the_joining_current_thread() {
    #[troupe::actor(max_retries = 0)]
    async fn do_work() -> Result<(), ActorError> {
        Err(ActorError::new("CustomError", "well, shit"))
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .actor(DoWork)
        .build()
        .expect("app");
    let sent = DoWork.send(&app).await.expect("send");
    let worker = start(&app, 2).await;
    match broker.join("default", WAIT).await {
        Err(Error::MessageFailed {
            message_id,
            actor_name,
            reason,
        }) => {
            assert_eq!(message_id, sent.message_id());
            assert_eq!(actor_name, "do_work");
            assert!(reason.contains("CustomError: well, shit"), "{reason}");
        }
        other => panic!("expected MessageFailed, got {other:?}"),
    }
    broker
        .join_with("default", WAIT, false)
        .await
        .expect("fail_fast=false does not re-raise");
    worker.stop().await;
}

/// dramatiq tests/test_stub_broker.py::test_stub_broker_flush_all_does_not_break_dead_letters
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stub_broker_flush_all_does_not_break_dead_letters() {
    #[troupe::actor(max_retries = 0)]
    async fn do_work() -> Result<(), ActorError> {
        Err(ActorError::new("SomeError", ":("))
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .actor(DoWork)
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    DoWork.send(&app).await.expect("send");
    assert!(join_failed(&broker, "default").await.contains("SomeError: :("));

    broker.flush_all();
    assert!(broker.dead_letters_of("default").is_empty());
    join(&broker, "default").await;

    DoWork.send(&app).await.expect("send");
    assert!(join_failed(&broker, "default").await.contains("SomeError: :("));
    assert_eq!(broker.dead_letters_of("default").len(), 1);
    worker.stop().await;
}

/// dramatiq tests/test_stub_broker.py::test_stub_broker_respects_prefetch
///
/// Troupe's prefetch counts the running message too, so with prefetch 5 and one blocked slot,
/// 5 messages are in flight and 10 stay on the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stub_broker_respects_prefetch() {
    static GATE: Semaphore = Semaphore::const_new(0);

    #[troupe::actor]
    async fn do_work() {
        if let Ok(permit) = GATE.acquire().await {
            permit.forget();
        }
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .actor(DoWork)
        .build()
        .expect("app");
    for _ in 0..15 {
        DoWork.send(&app).await.expect("send");
    }
    let worker = Worker::builder(app.clone())
        .concurrency(1)
        .prefetch(5)
        .fetch_timeout(Duration::from_millis(100))
        .start()
        .await
        .expect("worker");
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = broker.stats("default").await.expect("stats");
        if (stats.in_flight, stats.ready) == (5, 10) {
            break;
        }
        assert!(Instant::now() < deadline, "prefetch not respected: {stats:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    GATE.add_permits(15);
    join(&broker, "default").await;
    worker.stop().await;
}
