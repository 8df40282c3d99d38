//! Conformance cases for results and state backends: the same semantics as the memory ones.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, json};
use troupe_core::{Error, Message, ResultBackend, StateBackend, unwrap_result, wrap_failure};

fn message() -> Message {
    Message::new(crate::unique_queue("results"), "actor", vec![], Map::new())
}

/// A stored value is read back; a missing one is `ResultMissing`.
pub async fn results_store_and_get(backend: Arc<dyn ResultBackend>) {
    let m = message();
    match backend.get(&m, None).await {
        Err(Error::ResultMissing(id)) => assert_eq!(id, m.message_id),
        other => panic!("expected ResultMissing, got {other:?}"),
    }
    let value = json!({"nested": [1, 2.5, "three", null, true], "unicode": "日本 😀"});
    backend
        .store(&m, value.clone(), Duration::from_secs(60))
        .await
        .expect("store");
    assert_eq!(backend.get(&m, None).await.expect("get"), value);
    backend
        .store(&m, json!(2), Duration::from_secs(60))
        .await
        .expect("overwrite");
    assert_eq!(backend.get(&m, None).await.expect("get"), json!(2));
}

/// A stored failure reads back as `ResultFailure`.
pub async fn results_failures_round_trip(backend: Arc<dyn ResultBackend>) {
    let m = message();
    backend
        .store(&m, wrap_failure("ValueError", "bad"), Duration::from_secs(60))
        .await
        .expect("store");
    match unwrap_result(backend.get(&m, None).await.expect("get")) {
        Err(Error::ResultFailure { error_type, message }) => {
            assert_eq!((error_type.as_str(), message.as_str()), ("ValueError", "bad"));
        }
        other => panic!("expected ResultFailure, got {other:?}"),
    }
}

/// A blocking get waits for a value stored later, and times out when none comes.
pub async fn results_block_until_stored_or_timeout(backend: Arc<dyn ResultBackend>) {
    let m = message();
    let started = std::time::Instant::now();
    match backend.get(&m, Some(Duration::from_millis(200))).await {
        Err(Error::ResultTimeout(_)) => {}
        other => panic!("expected ResultTimeout, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(200));
    let writer = Arc::clone(&backend);
    let m2 = m.clone();
    let store = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.store(&m2, json!("late"), Duration::from_secs(60)).await
    });
    assert_eq!(
        backend.get(&m, Some(Duration::from_secs(10))).await.expect("get"),
        json!("late")
    );
    store.await.expect("join").expect("store");
}

/// Results expire after their TTL.
pub async fn results_expire(backend: Arc<dyn ResultBackend>) {
    let m = message();
    backend
        .store(&m, json!(1), Duration::from_secs(1))
        .await
        .expect("store");
    // A TTL long enough that a loaded machine still reads the result before it expires.
    assert_eq!(backend.get(&m, None).await.expect("get"), json!(1));
    // Fixed wait: expiry follows each backend's own clock (Redis TTLs, PostgreSQL now(), system time).
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(matches!(backend.get(&m, None).await, Err(Error::ResultMissing(_))));
}

fn key(prefix: &str) -> String {
    crate::unique_queue(prefix)
}

/// `add` sets only absent keys; `incr`/`decr` respect their bounds and change nothing when
/// refused.
pub async fn state_counters_respect_bounds(backend: Arc<dyn StateBackend>) {
    let ttl = Duration::from_secs(60);
    let k = key("ctr");
    assert!(backend.add(&k, 1, ttl).await.expect("add"));
    assert!(!backend.add(&k, 5, ttl).await.expect("add again"));
    assert_eq!(backend.get(&k).await.expect("get"), Some(1));
    assert!(backend.incr(&k, 1, 2, ttl).await.expect("incr"));
    assert!(!backend.incr(&k, 1, 2, ttl).await.expect("incr over max"));
    assert_eq!(backend.get(&k).await.expect("get"), Some(2));
    assert!(backend.decr(&k, 2, 0, ttl).await.expect("decr"));
    assert!(!backend.decr(&k, 1, 0, ttl).await.expect("decr under min"));
    assert_eq!(backend.get(&k).await.expect("get"), Some(0));
    let missing = key("missing");
    assert!(backend.incr(&missing, 3, 5, ttl).await.expect("incr a missing key"));
    assert_eq!(backend.get(&missing).await.expect("get"), Some(3));
}

/// Keys expire after their TTL, after which `add` succeeds again.
pub async fn state_keys_expire(backend: Arc<dyn StateBackend>) {
    let k = key("ttl");
    assert!(backend.add(&k, 1, Duration::from_millis(100)).await.expect("add"));
    // Fixed wait: expiry follows each backend's own clock (Redis TTLs, PostgreSQL now(), system time).
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(backend.get(&k).await.expect("get"), None);
    assert!(
        backend
            .add(&k, 7, Duration::from_secs(60))
            .await
            .expect("add after expiry")
    );
    assert_eq!(backend.get(&k).await.expect("get"), Some(7));
}

/// `incr_and_sum` checks the whole window.
pub async fn state_window_sums(backend: Arc<dyn StateBackend>) {
    let ttl = Duration::from_secs(60);
    let (a, b) = (key("w"), key("w"));
    let keys = vec![a.clone(), b.clone()];
    assert!(backend.incr(&b, 2, 10, ttl).await.expect("incr"));
    assert!(backend.incr_and_sum(&a, &keys, 1, 3, ttl).await.expect("fits"));
    assert!(!backend.incr_and_sum(&a, &keys, 1, 3, ttl).await.expect("over"));
    assert_eq!(backend.get(&a).await.expect("get"), Some(1));
}

/// Concurrent increments never pass the maximum.
pub async fn state_concurrent_increments_are_atomic(backend: Arc<dyn StateBackend>) {
    let k = key("race");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let b = Arc::clone(&backend);
        let k = k.clone();
        tasks.push(tokio::spawn(
            async move { b.incr(&k, 1, 10, Duration::from_secs(60)).await },
        ));
    }
    let mut won = 0;
    for t in tasks {
        if t.await.expect("join").expect("incr") {
            won += 1;
        }
    }
    assert_eq!(won, 10);
    assert_eq!(backend.get(&k).await.expect("get"), Some(10));
}

/// `wait` returns when notified, and false on time-out.
pub async fn state_wait_and_notify(backend: Arc<dyn StateBackend>) {
    let k = key("event");
    assert!(!backend.wait(&k, Duration::from_millis(100)).await.expect("wait"));
    let b = Arc::clone(&backend);
    let k2 = k.clone();
    let waiter = tokio::spawn(async move { b.wait(&k2, Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    backend.notify(&k, Duration::from_secs(60)).await.expect("notify");
    assert!(waiter.await.expect("join").expect("wait"));
    assert!(
        backend
            .wait(&k, Duration::from_millis(10))
            .await
            .expect("still notified")
    );
}
