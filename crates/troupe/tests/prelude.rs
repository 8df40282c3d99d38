//! What a newcomer writes with `use troupe::prelude::*` alone: a middleware, an app handed a
//! shared handle on it, backends from URLs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use troupe::prelude::*;

/// Counts outcomes per actor; the test keeps an `Arc` to read them.
#[derive(Debug, Default)]
struct Monitor {
    seen: Mutex<Vec<(String, bool)>>,
}

impl Monitor {
    fn seen(&self) -> Vec<(String, bool)> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

#[async_trait]
impl Middleware for Monitor {
    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let outcome = next.run(cx).await;
        let actor = cx.message().actor_name.clone();
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((actor, outcome.is_success()));
        outcome
    }
}

#[troupe::actor(queue_name = "prelude", max_retries = 0)]
async fn half(x: i64) -> Result<i64, ActorError> {
    // current_message and current_app come from the prelude too.
    let message = current_message().expect("the worker sets the current message");
    assert_eq!(message.actor_name, "half");
    // The app's state backend is shared with actors: count the calls there.
    let state = current_app()?.state().cloned().expect("the app has a state backend");
    state
        .incr("prelude-calls", 1, i64::MAX, Duration::from_secs(60))
        .await?;
    if x % 2 == 0 {
        Ok(x / 2)
    } else {
        Err(ActorError::msg(format!("{x} is odd")))
    }
}

#[tokio::test]
async fn a_kept_arc_reads_what_the_middleware_gathered() {
    let broker: Arc<dyn Broker> = connect("memory://").await.unwrap();
    let results: Arc<dyn ResultBackend> = connect_results("memory://").await.unwrap();
    let state: Arc<dyn StateBackend> = connect_state("memory://").await.unwrap();
    let monitor = Arc::new(Monitor::default());
    let boxed = Box::new(Monitor::default());
    let app = App::builder(broker)
        .results(results)
        .state(state)
        .middleware(Arc::clone(&monitor))
        .middleware(boxed)
        .actor(Half)
        .build()
        .unwrap();
    for x in [2, 3, 4] {
        Half.send(&app, x).await.unwrap();
    }
    let worker = Worker::builder(app.clone()).concurrency(2).start().await.unwrap();
    // 3 is odd: that message is dead-lettered, so wait through failures.
    let through_failures = JoinOptions::new().fail_fast(false);
    app.join_with("prelude", Duration::from_secs(10), through_failures)
        .await
        .unwrap();
    worker.stop().await;
    let calls = app.state().unwrap().get("prelude-calls").await.unwrap();
    assert_eq!(calls, Some(3), "each actor call counted in the app's state backend");
    let mut seen = monitor.seen();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("half".to_owned(), false),
            ("half".to_owned(), true),
            ("half".to_owned(), true)
        ]
    );
    // A pipeline, from the prelude as well.
    let stages = vec![App::message(&Half, &(8,)).unwrap(), App::message(&Half, &(0,)).unwrap()];
    assert_eq!(pipeline(stages).unwrap().messages().len(), 2);
}
