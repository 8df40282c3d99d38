//! Ports of `tests/test_results.py`, on `MemoryResults`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;
use troupe::{
    ActorError, App, Error, MemoryBroker, MemoryResults, Message, Middleware, Next, Outcome, ProcessContext,
    ResultBackend, SendOptions, option_keys,
};

use crate::support::{WAIT, fast_retries, join, join_all, start};

fn app_with_results(broker: &MemoryBroker) -> troupe::AppBuilder {
    App::builder(broker.clone().into_dyn()).results(MemoryResults::new().into_dyn())
}

/// dramatiq tests/test_results.py::test_actors_can_store_results
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_can_store_results() {
    #[troupe::actor(store_results = true)]
    async fn do_work() -> String {
        "hello".into()
    }

    let broker = MemoryBroker::new();
    let app = app_with_results(&broker).actor(DoWork).build().expect("app");
    let sent = DoWork.send(&app).await.expect("send");
    let worker = start(&app, 2).await;
    join(&broker, "default").await;
    worker.stop().await;
    assert_eq!(sent.get_result(&app).await.expect("result"), "hello");
}

/// dramatiq tests/test_results.py::test_actors_results_are_backwards_compatible
///
/// A plain value written straight to the backend (by an older or another producer) reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_results_are_backwards_compatible() {
    #[troupe::actor(store_results = true)]
    async fn do_work() -> i64 {
        42
    }

    let backend = MemoryResults::new();
    let app = App::builder(MemoryBroker::new().into_dyn())
        .results(backend.clone().into_dyn())
        .actor(DoWork)
        .build()
        .expect("app");
    let message = DoWork.message().expect("message");
    backend
        .store(&message, json!(42), Duration::from_secs(3600))
        .await
        .expect("store");
    assert_eq!(app.get_result(&message, Some(WAIT)).await.expect("result"), json!(42));
}

/// dramatiq tests/test_results.py::test_actors_can_store_exceptions
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_can_store_exceptions() {
    #[troupe::actor(store_results = true, max_retries = 0)]
    async fn do_work() -> Result<i64, ActorError> {
        Err(ActorError::new("RuntimeError", "failed"))
    }

    let broker = MemoryBroker::new();
    let app = app_with_results(&broker).actor(DoWork).build().expect("app");
    let sent = DoWork.send(&app).await.expect("send");
    let worker = start(&app, 2).await;
    let err = sent.wait_result(&app, WAIT).await.unwrap_err();
    worker.stop().await;
    assert_eq!(err.to_string(), "actor raised RuntimeError: failed");
    match err {
        Error::ResultFailure { error_type, message } => {
            assert_eq!((error_type.as_str(), message.as_str()), ("RuntimeError", "failed"));
        }
        other => panic!("expected ResultFailure, got {other:?}"),
    }
}

/// dramatiq tests/test_results.py::test_retrieving_a_result_can_raise_result_missing
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_retrieving_a_result_can_raise_result_missing() {
    static GATE: Semaphore = Semaphore::const_new(0);

    #[troupe::actor(store_results = true)]
    async fn do_work() -> i64 {
        let _permit = GATE.acquire().await;
        42
    }

    let broker = MemoryBroker::new();
    let app = app_with_results(&broker).actor(DoWork).build().expect("app");
    let worker = start(&app, 2).await;
    let sent = DoWork.send(&app).await.expect("send");
    let result = sent.get_result(&app).await;
    assert!(
        matches!(&result, Err(Error::ResultMissing(id)) if id == sent.message_id()),
        "{result:?}"
    );
    GATE.add_permits(1);
    assert_eq!(sent.wait_result(&app, WAIT).await.expect("result"), 42);
    worker.stop().await;
}

/// dramatiq tests/test_results.py::test_retrieving_a_result_can_time_out
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_retrieving_a_result_can_time_out() {
    static GATE: Semaphore = Semaphore::const_new(0);

    #[troupe::actor(store_results = true)]
    async fn do_work() -> i64 {
        let _permit = GATE.acquire().await;
        42
    }

    let broker = MemoryBroker::new();
    let app = app_with_results(&broker).actor(DoWork).build().expect("app");
    let worker = start(&app, 2).await;
    let sent = DoWork.send(&app).await.expect("send");
    let result = sent.wait_result(&app, Duration::from_millis(100)).await;
    assert!(
        matches!(&result, Err(Error::ResultTimeout(id)) if id == sent.message_id()),
        "{result:?}"
    );
    GATE.add_permits(1);
    assert_eq!(sent.wait_result(&app, WAIT).await.expect("result"), 42);
    worker.stop().await;
}

/// dramatiq tests/test_results.py::test_messages_can_get_results_from_backend
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_messages_can_get_results_from_backend() {
    #[troupe::actor(store_results = true)]
    async fn do_work() -> i64 {
        42
    }

    let broker = MemoryBroker::new();
    let backend = MemoryResults::new();
    let app = App::builder(broker.clone().into_dyn())
        .results(backend.clone().into_dyn())
        .actor(DoWork)
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    let sent = DoWork.send(&app).await.expect("send");
    let value = backend.get(sent.message(), Some(WAIT)).await.expect("result");
    worker.stop().await;
    assert_eq!(value, json!(42));
}

/// dramatiq tests/test_results.py::test_messages_can_get_results_from_inferred_backend
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_messages_can_get_results_from_inferred_backend() {
    #[troupe::actor(store_results = true)]
    async fn do_work() -> i64 {
        42
    }

    let broker = MemoryBroker::new();
    let app = app_with_results(&broker).actor(DoWork).build().expect("app");
    let worker = start(&app, 2).await;
    let sent = DoWork.send(&app).await.expect("send");
    let value = sent.wait_result(&app, WAIT).await.expect("result");
    worker.stop().await;
    assert_eq!(value, 42);
}

/// dramatiq tests/test_results.py::test_messages_without_actor_not_crashing_lookup_options
///
/// A message for an unknown actor asking for its result: processing goes on. Unlike Dramatiq
/// (which stores nothing, #448), Troupe stores the `ActorNotFound` failure, as the message asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_messages_without_actor_not_crashing_lookup_options() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);

    #[troupe::actor]
    async fn do_work() {
        RUNS.fetch_add(1, Ordering::SeqCst);
    }

    let broker = MemoryBroker::new();
    let app = app_with_results(&broker).actor(DoWork).build().expect("app");
    let worker = start(&app, 2).await;
    let orphan =
        Message::new("default", "idontexist", vec![], Map::new()).with_option(option_keys::STORE_RESULTS, true);
    let orphan = app.enqueue(orphan, None).await.expect("enqueue");
    DoWork.send(&app).await.expect("send");
    join_all(&broker, "default").await;
    let result = app.get_result(&orphan, Some(WAIT)).await;
    worker.stop().await;
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
    assert!(
        matches!(&result, Err(Error::ResultFailure { error_type, .. }) if error_type == "ActorNotFound"),
        "{result:?}"
    );
}

/// dramatiq tests/test_results.py::test_messages_can_fail_to_get_results_if_there_is_no_backend
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_messages_can_fail_to_get_results_if_there_is_no_backend() {
    #[troupe::actor]
    async fn do_work() -> i64 {
        42
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .actor(DoWork)
        .build()
        .expect("app");
    let sent = DoWork.send(&app).await.expect("send");
    let result = sent.get_result(&app).await;
    assert!(matches!(result, Err(Error::NoResultBackend)), "{result:?}");
    let result = sent.wait_result(&app, Duration::from_millis(10)).await;
    assert!(matches!(result, Err(Error::NoResultBackend)), "{result:?}");
}

/// An actor whose messages are all too old by the time they run.
#[troupe::actor(store_results = true, max_age = "1ms")]
async fn too_old() -> i64 {
    42
}

/// Sends `too_old` a message delayed past its age limit and returns its stored failure.
async fn age_limit_failure() -> (String, String) {
    let broker = MemoryBroker::new();
    let app = app_with_results(&broker).actor(TooOld).build().expect("app");
    let worker = start(&app, 2).await;
    let sent = TooOld
        .send_with_options(&app, SendOptions::new().delay(Duration::from_millis(5)))
        .await
        .expect("send");
    let first = sent.wait_result(&app, WAIT).await;
    // Asked again later, the stored failure is the same.
    join_all(&broker, "default").await;
    let second = sent.get_result(&app).await;
    worker.stop().await;
    assert_eq!(format!("{first:?}"), format!("{second:?}"));
    match first {
        Err(Error::ResultFailure { error_type, message }) => (error_type, message),
        other => panic!("expected a stored SkipMessage failure, got {other:?}"),
    }
}

/// dramatiq tests/test_results.py::test_age_limit_skipped_messages_store_consistent_exceptions
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_age_limit_skipped_messages_store_consistent_exceptions() {
    let (error_type, message) = age_limit_failure().await;
    assert_eq!(error_type, "SkipMessage");
    assert!(
        message.to_lowercase().starts_with("message age limit exceeded"),
        "{message}"
    );
}

/// dramatiq tests/test_results.py::test_age_limit_skipped_messages_store_consistent_exceptions:
/// the stored message text, which a Python client reads as `orig_exc_msg`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_age_limit_skipped_messages_store_consistent_exceptions_text() {
    let (error_type, message) = age_limit_failure().await;
    assert_eq!(
        (error_type.as_str(), message.as_str()),
        ("SkipMessage", "Message age limit exceeded")
    );
}

/// dramatiq tests/test_results.py::test_custom_skipped_messages_with_no_fail_stores_none
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_custom_skipped_messages_with_no_fail_stores_none() {
    #[derive(Debug)]
    struct SkipMiddleware;

    #[troupe::async_trait]
    impl Middleware for SkipMiddleware {
        async fn process(&self, _cx: &mut ProcessContext, _next: Next<'_>) -> Outcome {
            Outcome::Skipped
        }
    }

    #[troupe::actor(store_results = true)]
    async fn do_work() -> i64 {
        42
    }

    let broker = MemoryBroker::new();
    let app = app_with_results(&broker)
        .middleware(SkipMiddleware)
        .actor(DoWork)
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    let sent = DoWork.send(&app).await.expect("send");
    let value = app.get_result(sent.message(), Some(WAIT)).await.expect("result");
    assert_eq!(value, Value::Null);
    join(&broker, "default").await;
    worker.stop().await;
    assert_eq!(app.get_result(sent.message(), None).await.expect("result"), Value::Null);
}

/// dramatiq tests/test_results.py::test_custom_skipped_messages_with_no_fail_stores_none, with
/// the skip asked by the actor (`ActorError::skip()`, a Troupe addition): acked, not retried,
/// not dead-lettered, and `null` stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_custom_skipped_messages_with_no_fail_stores_none_from_actor() {
    static ATTEMPTS: AtomicUsize = AtomicUsize::new(0);

    #[troupe::actor(store_results = true)]
    async fn do_work() -> Result<i64, ActorError> {
        ATTEMPTS.fetch_add(1, Ordering::SeqCst);
        Err(ActorError::skip())
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .retries(fast_retries())
        .results(MemoryResults::new().into_dyn())
        .actor(DoWork)
        .build()
        .expect("app");
    let worker = start(&app, 2).await;
    let sent = DoWork.send(&app).await.expect("send");
    // A retry would be on the delay queue, which the join waits for.
    join(&broker, "default").await;
    worker.stop().await;
    assert_eq!(ATTEMPTS.load(Ordering::SeqCst), 1);
    assert!(broker.dead_letters_of("default").is_empty());
    assert_eq!(app.get_result(sent.message(), None).await.expect("result"), Value::Null);
}
