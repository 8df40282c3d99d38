//! The README's rate-limit example runs: its actor, as it reads there, under a worker, with the
//! limits it names.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use troupe::prelude::*;

#[troupe::actor(max_retries = 100, min_backoff = "1s")]
async fn call_image_api(prompt: String) -> Result<usize, ActorError> {
    #[rustfmt::skip] // the README's line, as it reads there
    let state = current_app()?.state().cloned().ok_or_else(|| ActorError::msg("no state backend"))?;
    // At most 2 calls at once across every worker: wait up to 10 s, else retry later.
    let _slot = ConcurrentRateLimiter::new(state.clone(), "image-api", 2)
        .acquire(WhenLimited::Wait(Duration::from_secs(10)))
        .await?;
    // And at most 50 calls in any minute.
    WindowRateLimiter::new(state, "image-api-per-minute", 50, Duration::from_secs(60))
        .acquire(WhenLimited::Retry)
        .await?;
    Ok(prompt.len()) // call the API here
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_rate_limit_example_runs() {
    let state: Arc<dyn StateBackend> = Arc::new(troupe::MemoryState::new());
    let app = App::builder(Arc::new(MemoryBroker::new()))
        .state(Arc::clone(&state))
        .actor(CallImageApi)
        .build()
        .unwrap();
    for i in 0..5 {
        CallImageApi.send(&app, "x".repeat(i)).await.unwrap();
    }
    let worker = Worker::builder(app.clone()).concurrency(4).start().await.unwrap();
    app.join("default", Duration::from_secs(10)).await.unwrap();
    worker.stop().await;
    // Five calls counted in the minute's window: 45 left.
    let window = WindowRateLimiter::new(state, "image-api-per-minute", 50, Duration::from_secs(60));
    let mut left = 0;
    while window.try_acquire().await.unwrap() {
        left += 1;
    }
    assert_eq!(left, 45);
}

#[test]
fn every_line_of_the_readme_block_is_in_this_file() {
    let missing = common::missing_lines(
        include_str!("../../../README.md"),
        "#[troupe::actor(max_retries = 100, min_backoff = \"1s\")]",
        include_str!("readme_limits.rs"),
        |_| false,
        str::to_owned,
    );
    assert!(missing.is_empty(), "README lines not run by this test: {missing:#?}");
}
