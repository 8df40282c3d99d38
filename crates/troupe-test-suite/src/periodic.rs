//! Periodic actors: one message per tick across workers, and the missed-ticks policies.

use std::sync::Arc;
use std::time::Duration;

use troupe_core::App;
use troupe_core::periodic::{MISSED_OPTION, MissedTicks, TICK_OPTION};
use troupe_worker::{Worker, WorkerHandle};

use crate::TestBroker;
use crate::support::{Call, TestActor, unique_queue};

async fn start(tb: &TestBroker, actor: &TestActor) -> WorkerHandle {
    let app = App::builder(Arc::clone(&tb.broker))
        .state(Arc::clone(&tb.state))
        .actor(actor.clone())
        .build()
        .expect("app");
    Worker::builder(app)
        .concurrency(2)
        .fetch_timeout(Duration::from_millis(100))
        .shutdown_timeout(Duration::from_secs(5))
        .start()
        .await
        .expect("worker starts")
}

fn tick_of(call: &Call) -> (u64, bool) {
    let message = call.message.as_ref().expect("the current message");
    let tick = message
        .options
        .get(TICK_OPTION)
        .and_then(serde_json::Value::as_u64)
        .expect("a tick");
    let missed = message
        .options
        .get(MISSED_OPTION)
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    (tick, missed)
}

/// Three workers (as three processes would) with one periodic actor: each tick runs once, and
/// the ticks follow each other one period apart.
pub async fn periodic_actor_runs_once_per_tick_across_workers(tb: &TestBroker) {
    let q = unique_queue("tick");
    let actor = TestActor::new(&format!("every_{q}"), &q).options(|o| o.every(Duration::from_secs(1)));
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(start(tb, &actor).await);
    }
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for w in workers {
        w.stop().await;
    }
    let mut ticks: Vec<u64> = actor.calls().iter().map(|c| tick_of(c).0).collect();
    ticks.sort_unstable();
    assert!(ticks.len() >= 3, "about one tick a second for 3.5 s: {ticks:?}");
    for pair in ticks.windows(2) {
        assert_eq!(pair[1] - pair[0], 1000, "each tick once, none skipped: {ticks:?}");
    }
    assert!(
        ticks.iter().all(|t| t % 1000 == 0),
        "ticks fall on the period: {ticks:?}"
    );
}

/// Ticks missed while every worker was stopped: skipped, or run once (one message with
/// `troupe_missed`) when the actor says `missed = "run_once"`.
pub async fn missed_ticks_are_skipped_or_run_once(tb: &TestBroker) {
    for policy in [MissedTicks::Skip, MissedTicks::RunOnce] {
        let q = unique_queue("missed");
        let actor =
            TestActor::new(&format!("missed_{q}"), &q).options(|o| o.every(Duration::from_secs(1)).missed(policy));
        let worker = start(tb, &actor).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while actor.count() == 0 {
            assert!(std::time::Instant::now() < deadline, "the first tick ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        worker.stop().await;
        let before = actor.count();
        // At least two ticks pass with no worker.
        tokio::time::sleep(Duration::from_millis(2600)).await;
        let worker = start(tb, &actor).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        worker.stop().await;
        let calls = actor.calls();
        let after: Vec<(u64, bool)> = calls[before..].iter().map(tick_of).collect();
        let caught_up = after.iter().filter(|(_, missed)| *missed).count();
        let expected = usize::from(policy == MissedTicks::RunOnce);
        assert_eq!(caught_up, expected, "{policy:?}: {after:?}");
        assert!(
            after.iter().any(|(_, missed)| !*missed),
            "the ticks after the restart run: {after:?}"
        );
        let mut due: Vec<u64> = after.iter().filter(|(_, m)| !*m).map(|(t, _)| *t).collect();
        let n = due.len();
        due.dedup();
        assert_eq!(due.len(), n, "no tick twice: {after:?}");
    }
}
