//! A mutex shared by Python Dramatiq and Troupe on one Redis: Python's
//! `ConcurrentRateLimiter(RedisBackend(...), key, limit=1)` and Troupe's
//! `ConcurrentRateLimiter::new(state, key, 1)` (the example's `mutex_sleep` on both sides) use
//! the same raw key and counter, so their holds never overlap: the test holds the mutex while
//! both workers start (neither side's hold may begin before it lets go; Python is refused and
//! retries), then both race for it with work queued, and no two holds overlap.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Map, json};
use troupe::limits::ConcurrentRateLimiter;
use troupe::redis::redis;
use troupe::{Message, now_ms};

use super::cancel::troupe_worker_with_state;
use super::{Env, base_url, uuid4, wait_until};

/// Holds per side, and how long each holds the mutex.
const HOLDS: usize = 6;
const HOLD_MS: u64 = 80;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_troupe_holders_of_one_mutex_key_never_overlap() {
    let env = Env::new().await;
    let key = format!("troupe-interop-mutex-{}", uuid4());
    let app = env.app();
    // Troupe's holds on `default` (the Troupe worker's queue), Python's on `py`.
    let mut messages = Vec::new();
    for queue in ["default", "py"] {
        for _ in 0..HOLDS {
            let message = Message::new(queue, "mutex_sleep", vec![json!(key), json!(HOLD_MS)], Map::new());
            messages.push((queue, app.enqueue(message, None).await.unwrap()));
        }
    }
    // The test holds the mutex first (as a Troupe holder) while both workers start and try to
    // take it, so both sides are kept out by a hold and then race for it with work queued.
    let state = troupe::connect_state(&env.url).await.unwrap();
    let gate = ConcurrentRateLimiter::new(state, key.clone(), 1);
    let held = gate.try_acquire().await.unwrap().expect("the mutex is free at first");
    let python = env
        .start_python_worker_with(&["--actor-queue", "py", "--until-empty", "py", "--threads", "3"])
        .await;
    let troupe = troupe_worker_with_state(&env).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let released = now_ms();
    held.release().await.unwrap();
    let python_records = python.finish().await;
    wait_until("Troupe's holds are done", || async { env.pending().await == 0 }).await;
    troupe.stop().await;

    let mut spans = Vec::new();
    for (queue, message) in &messages {
        let value = env
            .results
            .get(message, Some(Duration::from_secs(15)))
            .await
            .unwrap_or_else(|e| panic!("no result for the hold on {queue}: {e}"));
        let span: Vec<u64> = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{value}: {e}"));
        assert_eq!(span.len(), 2, "{value}");
        assert!(
            span[1] >= span[0] + HOLD_MS - 1,
            "a hold shorter than {HOLD_MS} ms: {value}"
        );
        spans.push((span[0], span[1], *queue));
    }
    spans.sort_unstable();
    assert!(
        spans.iter().all(|(start, _, _)| *start >= released),
        "a hold began while the test held the mutex (released at {released}): {spans:?}"
    );
    assert!(
        python_records
            .iter()
            .any(|r| r["actor"] == "mutex_sleep" && r["retries"].as_u64().unwrap_or(0) > 0),
        "Python was never refused the mutex (RateLimitExceeded, then a retry): {python_records:?}"
    );
    for pair in spans.windows(2) {
        let ((s1, e1, q1), (s2, e2, q2)) = (pair[0], pair[1]);
        assert!(
            e1 <= s2,
            "two holders at once: [{s1}, {e1}] on {q1} and [{s2}, {e2}] on {q2} (all: {spans:?})"
        );
    }
    let python_ids: HashSet<&str> = python_records
        .iter()
        .filter(|r| r["actor"] == "mutex_sleep")
        .filter_map(|r| r["message_id"].as_str())
        .collect();
    assert_eq!(
        python_ids.len(),
        HOLDS,
        "Python ran each of its holds: {python_records:?}"
    );
    let handovers = spans.windows(2).filter(|p| p[0].2 != p[1].2).count();
    eprintln!("{} holds, {handovers} handovers between Python and Troupe", spans.len());

    // The mutex is free at the end: its counter is back to 0 (or gone).
    let mut conn = redis::Client::open(base_url()).unwrap().get_connection().unwrap();
    let count: Option<i64> = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
    assert!(count.unwrap_or(0) == 0, "the mutex is still held: {count:?}");
    let _: redis::RedisResult<()> = redis::cmd("DEL")
        .arg(&key)
        .arg(format!("{key}@holders"))
        .query(&mut conn);
}
