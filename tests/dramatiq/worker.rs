//! Ports of `tests/test_worker.py`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use troupe::{App, Broker, Error, MemoryBroker, Worker};

use crate::support::{eventually, fast_retries, join, join_all, lock, start};

/// dramatiq tests/test_worker.py::test_workers_dont_register_queues_that_arent_whitelisted
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_workers_dont_register_queues_that_arent_whitelisted() {
    static IN_A: AtomicUsize = AtomicUsize::new(0);
    static IN_B: AtomicUsize = AtomicUsize::new(0);

    #[troupe::actor(queue_name = "a")]
    async fn in_a() {
        IN_A.fetch_add(1, Ordering::SeqCst);
    }

    #[troupe::actor(queue_name = "b")]
    async fn in_b() {
        IN_B.fetch_add(1, Ordering::SeqCst);
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .actor(InA)
        .actor(InB)
        .build()
        .expect("app");
    InB.send(&app).await.expect("send");
    InA.send(&app).await.expect("send");
    let worker = Worker::builder(app.clone())
        .queues(["a"])
        .concurrency(2)
        .fetch_timeout(Duration::from_millis(100))
        .start()
        .await
        .expect("worker");
    join(&broker, "a").await;
    // A second round trip on "a" gives a consumer of "b", were there one, time to act.
    InA.send(&app).await.expect("send");
    join(&broker, "a").await;
    worker.stop().await;
    assert_eq!(IN_A.load(Ordering::SeqCst), 2);
    assert_eq!(IN_B.load(Ordering::SeqCst), 0);
    let b = broker.stats("b").await.expect("stats");
    assert_eq!((b.ready, b.in_flight), (1, 0), "{b:?}");

    // A whitelist that names no actor's queue is refused.
    let result = Worker::builder(app).queues(["c"]).start().await;
    assert!(matches!(&result, Err(Error::Config(_))), "{result:?}");
}

/// dramatiq tests/test_worker.py::test_workers_process_messages_in_order
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_workers_process_messages_in_order() {
    static RESULTS: Mutex<Vec<i64>> = Mutex::new(Vec::new());

    #[troupe::actor]
    async fn do_work(value: i64) {
        lock(&RESULTS).push(value);
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .actor(DoWork)
        .build()
        .expect("app");
    // All five are on the queue before the worker starts, so they are prefetched together.
    for i in 0..5 {
        DoWork.send(&app, i).await.expect("send");
    }
    let worker = Worker::builder(app.clone())
        .concurrency(1)
        .prefetch(10)
        .fetch_timeout(Duration::from_millis(100))
        .start()
        .await
        .expect("worker");
    join(&broker, "default").await;
    worker.stop().await;
    assert_eq!(*lock(&RESULTS), [0, 1, 2, 3, 4]);
}

/// dramatiq tests/test_worker.py::test_exception_from_actor_doesnt_leak
///
/// Every error an actor returns is dropped once its message is settled, and the worker keeps
/// processing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_exception_from_actor_doesnt_leak() {
    static CREATED: AtomicUsize = AtomicUsize::new(0);
    static DROPPED: AtomicUsize = AtomicUsize::new(0);
    static OK_RUNS: AtomicUsize = AtomicUsize::new(0);

    #[derive(Debug)]
    struct CustomError;

    impl CustomError {
        fn new() -> Self {
            CREATED.fetch_add(1, Ordering::SeqCst);
            Self
        }
    }

    impl std::fmt::Display for CustomError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("custom")
        }
    }

    impl std::error::Error for CustomError {}

    impl Drop for CustomError {
        fn drop(&mut self) {
            DROPPED.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[troupe::actor(max_retries = 1)]
    async fn failing_actor() -> Result<(), CustomError> {
        Err(CustomError::new())
    }

    #[troupe::actor]
    async fn ok_actor() {
        OK_RUNS.fetch_add(1, Ordering::SeqCst);
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .retries(fast_retries())
        .actor(FailingActor)
        .actor(OkActor)
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    FailingActor.send(&app).await.expect("send");
    join_all(&broker, "default").await;
    assert_eq!(CREATED.load(Ordering::SeqCst), 2, "one attempt and one retry");
    assert!(
        eventually(|| DROPPED.load(Ordering::SeqCst) == 2).await,
        "errors still alive: {} of 2 dropped",
        DROPPED.load(Ordering::SeqCst)
    );
    let dead = broker.dead_letters_of("default");
    assert_eq!(dead.len(), 1);
    assert!(dead[0].reason.contains("CustomError: custom"), "{}", dead[0].reason);
    OkActor.send(&app).await.expect("send");
    join_all(&broker, "default").await;
    worker.stop().await;
    assert_eq!(OK_RUNS.load(Ordering::SeqCst), 1);
}
