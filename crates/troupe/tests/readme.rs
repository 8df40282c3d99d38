//! The README's code runs: its custom middleware (`TaskMonitoringMiddleware`) is this file's,
//! line for line, and a test checks that every line of the README's block is here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use troupe::prelude::*;

#[derive(Debug, Default)]
struct TaskMonitoringMiddleware {
    stats: Mutex<BTreeMap<String, (u64, u64, Duration)>>, // actor -> (succeeded, failed, time)
}

#[async_trait]
impl Middleware for TaskMonitoringMiddleware {
    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let started = Instant::now();
        let outcome = next.run(cx).await;
        let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = stats.entry(cx.message().actor_name.clone()).or_default();
        if outcome.is_success() {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
        entry.2 += started.elapsed();
        outcome
    }
}

#[troupe::actor(queue_name = "readme", max_retries = 1, min_backoff = "10ms")]
async fn send_welcome(user_id: u64) -> Result<(), ActorError> {
    if user_id == 0 {
        return Err(ActorError::msg("no such user"));
    }
    Ok(())
}

#[tokio::test]
async fn the_readme_middleware_gathers_per_actor_outcomes() {
    let broker = connect("memory://").await.unwrap();
    let monitor = Arc::new(TaskMonitoringMiddleware::default());
    let app = App::builder(broker)
        .middleware(Arc::clone(&monitor))
        .actor(SendWelcome)
        .build()
        .unwrap();
    for user in [1, 2, 0] {
        SendWelcome.send(&app, user).await.unwrap();
    }
    let worker = Worker::builder(app.clone()).concurrency(2).start().await.unwrap();
    app.join_with("readme", Duration::from_secs(10), JoinOptions::new().fail_fast(false))
        .await
        .unwrap();
    worker.stop().await;
    println!("{:?}", monitor.stats.lock().unwrap_or_else(PoisonError::into_inner));
    let stats = monitor.stats.lock().unwrap_or_else(PoisonError::into_inner);
    // Two users welcomed; user 0 failed on its attempt and on its one retry.
    let (succeeded, failed, _time) = stats["send_welcome"];
    assert_eq!((succeeded, failed), (2, 2));
}

#[test]
fn every_line_of_the_readme_block_is_in_this_file() {
    let missing = common::missing_lines(
        include_str!("../../../README.md"),
        "struct TaskMonitoringMiddleware",
        include_str!("readme.rs"),
        |l| l.starts_with("//"),
        |l| l.replace(".build()?;", ".build().unwrap();"),
    );
    assert!(missing.is_empty(), "README lines not run by this test: {missing:#?}");
}
