//! Ports of `tests/test_callbacks.py`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};
use troupe::{ActorError, App, MemoryBroker, SendOptions};

use crate::support::{join, join_all, lock, start};

/// dramatiq tests/test_callbacks.py::test_actors_can_define_success_callbacks
///
/// Both ways: `on_success` as a message option and as an actor option.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_can_define_success_callbacks() {
    static DB: Mutex<Vec<(Value, i64)>> = Mutex::new(Vec::new());

    #[troupe::actor]
    async fn add(x: i64, y: i64) -> i64 {
        x + y
    }

    #[troupe::actor(on_success = "save")]
    async fn add_and_save(x: i64, y: i64) -> i64 {
        x + y
    }

    #[troupe::actor]
    async fn save(message_data: Value, result: i64) {
        lock(&DB).push((message_data, result));
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .actor(Add)
        .actor(AddAndSave)
        .actor(Save)
        .build()
        .expect("app");
    let sent = Add
        .send_with_options(&app, 1, 2, SendOptions::new().on_success("save"))
        .await
        .expect("send");
    let worker = start(&app, 1).await;
    join(&broker, "default").await;
    AddAndSave.send(&app, 10, 20).await.expect("send");
    join(&broker, "default").await;
    worker.stop().await;
    let db = lock(&DB);
    assert_eq!(db.iter().map(|(_, r)| *r).collect::<Vec<_>>(), [3, 30]);
    let (message_data, _) = &db[0];
    assert_eq!(message_data["message_id"], json!(sent.message_id()));
    assert_eq!(message_data["actor_name"], json!("add"));
    assert_eq!(message_data["args"], json!([1, 2]));
    assert_eq!(db[1].0["actor_name"], json!("add_and_save"));
}

/// dramatiq tests/test_callbacks.py::test_actors_can_define_failure_callbacks
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actors_can_define_failure_callbacks() {
    static EXCEPTIONS: Mutex<Vec<(Value, Value)>> = Mutex::new(Vec::new());

    #[troupe::actor(max_retries = 0)]
    async fn do_work() -> Result<(), ActorError> {
        Err(ActorError::new("Exception", "boom"))
    }

    #[troupe::actor]
    async fn report_exceptions(message_data: Value, exception_data: Value) {
        lock(&EXCEPTIONS).push((message_data, exception_data));
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .actor(DoWork)
        .actor(ReportExceptions)
        .build()
        .expect("app");
    DoWork
        .send_with_options(&app, SendOptions::new().on_failure("report_exceptions"))
        .await
        .expect("send");
    let worker = start(&app, 2).await;
    join_all(&broker, "default").await;
    worker.stop().await;
    let exceptions = lock(&EXCEPTIONS);
    assert_eq!(exceptions.len(), 1);
    let (message_data, exception_data) = &exceptions[0];
    assert_eq!(message_data["actor_name"], json!("do_work"));
    assert_eq!(*exception_data, json!({"type": "Exception", "message": "boom"}));
}

/// dramatiq tests/test_callbacks.py::test_actor_callbacks_raise_type_error_when_given_a_normal_callable
///
/// Troupe callbacks are actor names, so a callable cannot be given; the closest mistake is a
/// name no actor has. Processing is unaffected: the callback message is dead-lettered as
/// `ActorNotFound` and the worker goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actor_callbacks_raise_type_error_when_given_a_normal_callable() {
    static ADDS: AtomicUsize = AtomicUsize::new(0);

    #[troupe::actor]
    async fn add(x: i64, y: i64) -> i64 {
        ADDS.fetch_add(1, Ordering::SeqCst);
        x + y
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn()).actor(Add).build().expect("app");
    Add.send_with_options(&app, 1, 2, SendOptions::new().on_success("idontexist"))
        .await
        .expect("send");
    Add.send(&app, 3, 4).await.expect("send");
    let worker = start(&app, 1).await;
    join_all(&broker, "default").await;
    worker.stop().await;
    assert_eq!(ADDS.load(Ordering::SeqCst), 2);
    let dead = broker.dead_letters_of("default");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].message.as_ref().map(|m| m.actor_name.as_str()),
        Ok("idontexist")
    );
    assert!(dead[0].reason.contains("ActorNotFound"), "{}", dead[0].reason);
}

/// dramatiq tests/test_callbacks.py::test_actor_callback_knows_correct_number_of_retries
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_actor_callback_knows_correct_number_of_retries() {
    static ATTEMPTS: AtomicUsize = AtomicUsize::new(0);
    static RETRIES: Mutex<Vec<(u64, Value)>> = Mutex::new(Vec::new());

    #[troupe::actor(max_retries = 3, max_backoff = "100ms", on_failure = "my_callback")]
    async fn do_work() -> Result<(), ActorError> {
        ATTEMPTS.fetch_add(1, Ordering::SeqCst);
        Err(ActorError::new("RuntimeError", "failure"))
    }

    #[troupe::actor]
    async fn my_callback(message_data: Value, exception_data: Value) {
        let retry = message_data["options"]["retries"].as_u64().unwrap_or(0);
        lock(&RETRIES).push((retry, exception_data["type"].clone()));
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .actor(DoWork)
        .actor(MyCallback)
        .build()
        .expect("app");
    DoWork.send(&app).await.expect("send");
    let worker = start(&app, 2).await;
    join_all(&broker, "default").await;
    worker.stop().await;
    assert_eq!(ATTEMPTS.load(Ordering::SeqCst), 4);
    let mut retries = lock(&RETRIES).clone();
    retries.sort_by_key(|(r, _)| *r);
    let expected: Vec<(u64, Value)> = (1..=4).map(|r| (r, json!("RuntimeError"))).collect();
    assert_eq!(retries, expected);
}
