//! Where a middleware sits relative to `Retries` decides what it sees: outside (placed with
//! `AppBuilder::middleware_before::<Retries>`), a failing message's final failure once; inside
//! (`middleware_after::<Retries>`, or appended with `.middleware`), every attempt's failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use troupe_core::middleware::{Next, Outcome, ProcessContext, Retries};
use troupe_core::{Actor, ActorError, ActorOptions, App, Broker, JoinOptions, MemoryBroker, Middleware, async_trait};
use troupe_worker::Worker;

/// Fails every time it runs.
struct AlwaysFails {
    runs: Arc<AtomicUsize>,
}

impl Actor for AlwaysFails {
    type Args = ();
    type Output = ();

    fn name(&self) -> &str {
        "always_fails"
    }

    fn options(&self) -> ActorOptions {
        ActorOptions::new().queue_name("order")
    }

    async fn call(&self, (): ()) -> Result<(), ActorError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Err(ActorError::msg("boom"))
    }
}

/// What a middleware saw of each attempt: whether it failed, and whether it was final
/// (`cx.is_failed()`: the message goes to the dead letters).
#[derive(Debug, Default)]
struct Watcher {
    seen: Mutex<Vec<(bool, bool)>>,
}

impl Watcher {
    fn failures(&self) -> usize {
        self.seen.lock().unwrap().iter().filter(|(failed, _)| *failed).count()
    }

    fn final_failures(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(failed, last)| *failed && *last)
            .count()
    }
}

#[async_trait]
impl Middleware for Watcher {
    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let outcome = next.run(cx).await;
        self.seen
            .lock()
            .unwrap()
            .push((outcome.error().is_some(), cx.is_failed()));
        outcome
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_retries_sees_the_final_failure_once_inside_sees_every_attempt() {
    let outside = Arc::new(Watcher::default());
    let inside = Arc::new(Watcher::default());
    let appended = Arc::new(Watcher::default());
    let runs = Arc::new(AtomicUsize::new(0));
    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .middleware(Arc::clone(&appended))
        .middleware_before::<Retries>(Arc::clone(&outside))
        .middleware_after::<Retries>(Arc::clone(&inside))
        .retries(
            Retries::default()
                .max_retries(Some(2))
                .min_backoff(Duration::ZERO)
                .max_backoff(Duration::ZERO),
        )
        .actor(AlwaysFails {
            runs: Arc::clone(&runs),
        })
        .build()
        .unwrap();
    app.send(
        &AlwaysFails {
            runs: Arc::clone(&runs),
        },
        (),
    )
    .await
    .unwrap();
    let worker = Worker::builder(app.clone())
        .concurrency(1)
        .fetch_timeout(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    app.join_with("order", Duration::from_secs(10), JoinOptions::new().fail_fast(false))
        .await
        .unwrap();
    worker.stop().await;

    assert_eq!(runs.load(Ordering::SeqCst), 3, "the first attempt and two retries");
    assert_eq!(broker.stats("order").await.unwrap().dead, 1);
    // Outside Retries: three attempts went by, and exactly one was the final failure.
    assert_eq!(outside.failures(), 3);
    assert_eq!(outside.final_failures(), 1, "{:?}", outside.seen.lock().unwrap());
    assert_eq!(
        outside.seen.lock().unwrap().last(),
        Some(&(true, true)),
        "the last attempt was the final one"
    );
    // Inside Retries (placed after it, or appended): every attempt's failure, before Retries
    // decided, so never a final one.
    for watcher in [&inside, &appended] {
        assert_eq!(watcher.failures(), 3);
        assert_eq!(watcher.final_failures(), 0, "{:?}", watcher.seen.lock().unwrap());
    }
}
