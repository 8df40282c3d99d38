//! Ports of `tests/test_actors.py`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use troupe::{
    Actor, ActorOptions, App, Broker, ConsumerOptions, Encoder, Error, JsonEncoder, MemoryBroker, Message, Middleware,
    Next, Outcome, ProcessContext, SendOptions, current_message, option_keys,
};

use crate::support::{Probe, WAIT, join, join_failed, lock, start};

fn app(broker: &MemoryBroker) -> troupe::AppBuilder {
    App::builder(broker.clone().into_dyn())
}

/// dramatiq tests/test_actors.py::test_actors_can_be_defined
#[test]
fn test_actors_can_be_defined() {
    #[troupe::actor]
    async fn add(x: i64, y: i64) -> i64 {
        x + y
    }

    // The handle is an actor named after the function (no module prefix), on "default".
    assert_eq!(Add.name(), "add");
    assert_eq!(Add.options().queue_name, "default");
    assert_eq!(Add.arg_names(), ["x", "y"]);
    let app = app(&MemoryBroker::new()).actor(Add).build().expect("app");
    assert!(app.actor("add").is_some());
}

/// dramatiq tests/test_actors.py::test_actors_can_be_assigned_predefined_options
#[test]
fn test_actors_can_be_assigned_predefined_options() {
    #[troupe::actor(max_retries = 32)]
    async fn add(x: i64, y: i64) -> i64 {
        x + y
    }

    assert_eq!(Add.options().max_retries, Some(32));
    let app = app(&MemoryBroker::new()).actor(Add).build().expect("app");
    assert_eq!(app.actor("add").map(|a| a.options().max_retries), Some(Some(32)));
}

/// dramatiq tests/test_actors.py::test_actors_cannot_be_assigned_arbitrary_options
#[test]
fn test_actors_cannot_be_assigned_arbitrary_options() {
    #[derive(Debug)]
    struct DeclaresIt;
    impl Middleware for DeclaresIt {
        fn actor_options(&self) -> &[&'static str] {
            &["invalid_option"]
        }
    }

    let actor = || Probe::new("add").options(ActorOptions::new().extra("invalid_option", 32));
    let err = app(&MemoryBroker::new()).actor(actor()).build().unwrap_err();
    assert!(
        matches!(&err, Error::Config(m) if m.contains("\"invalid_option\"")),
        "{err}"
    );
    // The same option is fine once a middleware of the app declares it.
    app(&MemoryBroker::new())
        .middleware(DeclaresIt)
        .actor(actor())
        .build()
        .expect("a declared option is accepted");
}

/// dramatiq tests/test_actors.py::test_actors_can_be_named
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_can_be_named() {
    #[troupe::actor(name = "foo")]
    async fn add(x: i64, y: i64) -> i64 {
        x + y
    }

    assert_eq!(Add.name(), "foo");
    let app = app(&MemoryBroker::new()).actor(Add).build().expect("app");
    assert!(app.actor("foo").is_some() && app.actor("add").is_none());
    let sent = Add.send(&app, 1, 2).await.expect("send");
    assert_eq!(sent.message().actor_name, "foo");
}

/// dramatiq tests/test_actors.py::test_actors_can_be_assigned_custom_queues
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_can_be_assigned_custom_queues() {
    #[troupe::actor(queue_name = "foo")]
    async fn foo() {}

    assert_eq!(Foo.options().queue_name, "foo");
    let app = app(&MemoryBroker::new()).actor(Foo).build().expect("app");
    assert_eq!(app.queues(), ["foo"]);
    assert_eq!(Foo.send(&app).await.expect("send").message().queue_name, "foo");
}

/// dramatiq tests/test_actors.py::test_actors_fail_given_invalid_queue_names
///
/// `#[actor(queue_name = "$2@!@#")]` is a compile error (see `tests/ui/fail`); an actor written
/// by hand is refused when the app is built.
#[test]
fn test_actors_fail_given_invalid_queue_names() {
    let actor = Probe::new("foo").options(ActorOptions::new().queue_name("$2@!@#"));
    let err = app(&MemoryBroker::new()).actor(actor).build().unwrap_err();
    assert!(matches!(&err, Error::Config(m) if m.contains("$2@!@#")), "{err}");
}

/// dramatiq tests/test_actors.py::test_actors_can_be_called
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_can_be_called() {
    #[troupe::actor]
    fn add(x: i64, y: i64) -> i64 {
        x + y
    }

    #[troupe::actor]
    async fn add_async(x: i64, y: i64) -> i64 {
        x + y
    }

    // The functions stay plain functions, run in the caller's thread.
    assert_eq!(add(1, 2), 3);
    assert_eq!(add_async(1, 2).await, 3);
    assert_eq!((Add.name(), AddAsync.name()), ("add", "add_async"));
}

/// dramatiq tests/test_actors.py::test_actors_can_be_sent_messages
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_can_be_sent_messages() {
    #[troupe::actor]
    async fn add(x: i64, y: i64) -> i64 {
        x + y
    }

    let broker = MemoryBroker::new();
    let app = app(&broker).actor(Add).build().expect("app");
    let sent = Add.send(&app, 1, 2).await.expect("send");
    assert_eq!(sent.message().args, [json!(1), json!(2)]);
    let mut consumer = broker
        .consume("default", ConsumerOptions::new(1))
        .await
        .expect("consume");
    let deliveries = consumer.fetch(1, WAIT).await.expect("fetch");
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].message(), Ok(sent.message()));
}

/// dramatiq tests/test_actors.py::test_actors_can_perform_work
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_can_perform_work() {
    static DATABASE: Mutex<BTreeMap<String, i64>> = Mutex::new(BTreeMap::new());

    #[troupe::actor]
    async fn put(key: String, value: i64) {
        lock(&DATABASE).insert(key, value);
    }

    let broker = MemoryBroker::new();
    let app = app(&broker).actor(Put).build().expect("app");
    for i in 0..100 {
        Put.send(&app, format!("key-{i}"), i).await.expect("send");
    }
    let worker = start(&app, 8).await;
    join(&broker, "default").await;
    worker.stop().await;
    let database = lock(&DATABASE);
    assert_eq!(database.len(), 100);
    assert_eq!(database.get("key-42"), Some(&42));
}

/// dramatiq tests/test_actors.py::test_actors_can_perform_work_with_kwargs
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_can_perform_work_with_kwargs() {
    static RESULTS: Mutex<Vec<i64>> = Mutex::new(Vec::new());

    #[troupe::actor]
    async fn add(x: i64, y: i64) {
        lock(&RESULTS).push(x + y);
    }

    let broker = MemoryBroker::new();
    let app = app(&broker).actor(Add).build().expect("app");
    // What Python's `add.send(x=1, y=2)` and `add.send(10, y=20)` put on the wire.
    let kwargs = |v: Value| v.as_object().cloned().unwrap_or_default();
    app.enqueue(
        Message::new("default", "add", vec![], kwargs(json!({"x": 1, "y": 2}))),
        None,
    )
    .await
    .expect("enqueue");
    app.enqueue(
        Message::new("default", "add", vec![json!(10)], kwargs(json!({"y": 20}))),
        None,
    )
    .await
    .expect("enqueue");
    let worker = start(&app, 1).await;
    join(&broker, "default").await;
    worker.stop().await;
    assert_eq!(*lock(&RESULTS), [3, 30]);
}

/// dramatiq tests/test_actors.py::test_actors_can_be_assigned_time_limits
///
/// Async, because an async actor is really interrupted; a blocking actor over its limit is
/// abandoned instead (see `time_limit.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_can_be_assigned_time_limits() {
    static ATTEMPTS: AtomicUsize = AtomicUsize::new(0);
    static SUCCESSES: AtomicUsize = AtomicUsize::new(0);

    #[troupe::actor(max_retries = 0, time_limit = "50ms")]
    async fn do_work() {
        ATTEMPTS.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        SUCCESSES.fetch_add(1, Ordering::SeqCst);
    }

    let broker = MemoryBroker::new();
    let app = app(&broker).actor(DoWork).build().expect("app");
    DoWork.send(&app).await.expect("send");
    let worker = start(&app, 2).await;
    let reason = join_failed(&broker, "default").await;
    worker.stop().await;
    assert!(reason.contains("TimeLimitExceeded"), "{reason}");
    assert_eq!(ATTEMPTS.load(Ordering::SeqCst), 1);
    assert_eq!(SUCCESSES.load(Ordering::SeqCst), 0);
}

/// dramatiq tests/test_actors.py::test_actor_messages_can_be_assigned_time_limits
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actor_messages_can_be_assigned_time_limits() {
    static ATTEMPTS: AtomicUsize = AtomicUsize::new(0);
    static SUCCESSES: AtomicUsize = AtomicUsize::new(0);

    #[troupe::actor(max_retries = 0)]
    async fn do_work() {
        ATTEMPTS.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        SUCCESSES.fetch_add(1, Ordering::SeqCst);
    }

    let broker = MemoryBroker::new();
    let app = app(&broker).actor(DoWork).build().expect("app");
    DoWork
        .send_with_options(&app, SendOptions::new().time_limit(Duration::from_millis(50)))
        .await
        .expect("send");
    let worker = start(&app, 2).await;
    let reason = join_failed(&broker, "default").await;
    worker.stop().await;
    assert!(reason.contains("TimeLimitExceeded"), "{reason}");
    assert_eq!(ATTEMPTS.load(Ordering::SeqCst), 1);
    assert_eq!(SUCCESSES.load(Ordering::SeqCst), 0);
}

/// dramatiq tests/test_actors.py::test_actors_can_be_assigned_message_age_limits
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_can_be_assigned_message_age_limits() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);

    #[troupe::actor(max_age = "100ms")]
    async fn do_work() {
        RUNS.fetch_add(1, Ordering::SeqCst);
    }

    let broker = MemoryBroker::new();
    let app = app(&broker).actor(DoWork).build().expect("app");
    // A message built a second ago, as if it had waited on the queue.
    let mut message = DoWork.message().expect("message");
    message.message_timestamp -= 1_000;
    app.enqueue(message, None).await.expect("enqueue");
    let worker = start(&app, 2).await;
    let reason = join_failed(&broker, "default").await;
    worker.stop().await;
    assert!(reason.starts_with("SkipMessage"), "{reason}");
    assert_eq!(RUNS.load(Ordering::SeqCst), 0);
}

/// dramatiq tests/test_actors.py::test_actor_messages_can_be_assigned_message_age_limits
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actor_messages_can_be_assigned_message_age_limits() {
    static RUNS: Mutex<Vec<String>> = Mutex::new(Vec::new());

    #[troupe::actor]
    async fn do_work(label: String) {
        lock(&RUNS).push(label);
    }

    let broker = MemoryBroker::new();
    let app = app(&broker).actor(DoWork).build().expect("app");
    let mut old = DoWork
        .message("old".into())
        .expect("message")
        .with_option(option_keys::MAX_AGE, 100);
    old.message_timestamp -= 1_000;
    app.enqueue(old, None).await.expect("enqueue");
    // A young message with a generous limit runs.
    let young = DoWork
        .message("young".into())
        .expect("message")
        .with_option(option_keys::MAX_AGE, 60_000);
    app.enqueue(young, None).await.expect("enqueue");
    let worker = start(&app, 2).await;
    let reason = join_failed(&broker, "default").await;
    worker.stop().await;
    assert!(reason.starts_with("SkipMessage"), "{reason}");
    assert_eq!(*lock(&RUNS), ["young"]);
}

/// dramatiq tests/test_actors.py::test_actors_can_delay_messages_independent_of_each_other
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_can_delay_messages_independent_of_each_other() {
    static RESULTS: Mutex<Vec<i64>> = Mutex::new(Vec::new());

    #[troupe::actor]
    async fn append(x: i64) {
        lock(&RESULTS).push(x);
    }

    let broker = MemoryBroker::new();
    let app = app(&broker).actor(Append).build().expect("app");
    let worker = start(&app, 2).await;
    Append
        .send_with_options(&app, 1, SendOptions::new().delay(Duration::from_millis(400)))
        .await
        .expect("send");
    Append
        .send_with_options(&app, 2, SendOptions::new().delay(Duration::from_millis(200)))
        .await
        .expect("send");
    join(&broker, "default").await;
    worker.stop().await;
    assert_eq!(*lock(&RESULTS), [2, 1]);
}

/// dramatiq tests/test_actors.py::test_middleware_can_decide_to_skip_messages
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_middleware_can_decide_to_skip_messages() {
    static SKIPPED: AtomicUsize = AtomicUsize::new(0);
    static CALLS: AtomicUsize = AtomicUsize::new(0);

    #[derive(Debug)]
    struct SkipMiddleware;

    #[troupe::async_trait]
    impl Middleware for SkipMiddleware {
        async fn process(&self, _cx: &mut ProcessContext, _next: Next<'_>) -> Outcome {
            Outcome::Skipped
        }

        async fn after_skip(&self, _cx: &ProcessContext) {
            SKIPPED.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[troupe::actor]
    async fn track_call() {
        CALLS.fetch_add(1, Ordering::SeqCst);
    }

    let broker = MemoryBroker::new();
    let app = app(&broker)
        .middleware(SkipMiddleware)
        .actor(TrackCall)
        .build()
        .expect("app");
    TrackCall.send(&app).await.expect("send");
    let worker = start(&app, 2).await;
    // A skip is not a failure: the join does not re-raise anything.
    join(&broker, "default").await;
    worker.stop().await;
    assert_eq!(CALLS.load(Ordering::SeqCst), 0);
    assert_eq!(SKIPPED.load(Ordering::SeqCst), 1);
    assert!(broker.dead_letters_of("default").is_empty());
}

/// dramatiq tests/test_actors.py::test_currrent_message_middleware_exposes_the_current_message
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_currrent_message_middleware_exposes_the_current_message() {
    static RECEIVED: Mutex<Vec<(i64, Option<Message>)>> = Mutex::new(Vec::new());

    #[troupe::actor]
    async fn accessor(x: i64) {
        lock(&RECEIVED).push((x, current_message()));
    }

    #[troupe::actor]
    fn sync_accessor(x: i64) {
        lock(&RECEIVED).push((x, current_message()));
    }

    let broker = MemoryBroker::new();
    let app = app(&broker).actor(Accessor).actor(SyncAccessor).build().expect("app");
    let sent = vec![
        (1, Some(Accessor.send(&app, 1).await.expect("send").into_message())),
        (2, Some(Accessor.send(&app, 2).await.expect("send").into_message())),
        (3, Some(SyncAccessor.send(&app, 3).await.expect("send").into_message())),
    ];
    let worker = start(&app, 4).await;
    join(&broker, "default").await;
    worker.stop().await;
    let mut received = lock(&RECEIVED).clone();
    received.sort_by_key(|(x, _)| *x);
    assert_eq!(received, sent);
    // Outside of an actor there is no current message.
    assert!(current_message().is_none());
}

/// dramatiq tests/test_actors.py::test_decorator_raises_error_on_duplicate_name
#[test]
fn test_decorator_raises_error_on_duplicate_name() {
    #[troupe::actor(name = "foo")]
    async fn f1() {}

    #[troupe::actor(name = "foo")]
    async fn f2() {}

    let err = app(&MemoryBroker::new()).actor(F1).actor(F2).build().unwrap_err();
    assert!(
        matches!(&err, Error::Config(m) if m.contains("two actors are named \"foo\"")),
        "{err}"
    );
}

/// Puts `message` on its queue as raw bytes, as a producer that is not Dramatiq might.
async fn put_raw(app: &App, broker: &MemoryBroker, message: &Message) {
    app.declare_queue(&message.queue_name).await.expect("declare");
    let bytes = JsonEncoder.encode(message).expect("encode");
    broker.enqueue_raw(&message.queue_name, bytes).expect("enqueue");
}

/// dramatiq tests/test_actors.py::test_worker_handles_non_numeric_eta_and_logs_warning
///
/// The warning itself is not checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_worker_handles_non_numeric_eta_and_logs_warning() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);

    #[troupe::actor]
    async fn record() {
        RUNS.fetch_add(1, Ordering::SeqCst);
    }

    let broker = MemoryBroker::new();
    let app = app(&broker).actor(Record).build().expect("app");
    let message = Record
        .message()
        .expect("message")
        .with_option(option_keys::ETA, "not-a-number");
    put_raw(&app, &broker, &message).await;
    let worker = start(&app, 2).await;
    join(&broker, "default").await;
    worker.stop().await;
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
}

/// dramatiq tests/test_actors.py::test_worker_handles_none_eta
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_worker_handles_none_eta() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);

    #[troupe::actor]
    async fn record() {
        RUNS.fetch_add(1, Ordering::SeqCst);
    }

    let broker = MemoryBroker::new();
    let app = app(&broker).actor(Record).build().expect("app");
    let message = Record
        .message()
        .expect("message")
        .with_option(option_keys::ETA, Value::Null);
    put_raw(&app, &broker, &message).await;
    let worker = start(&app, 2).await;
    join(&broker, "default").await;
    worker.stop().await;
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
}
