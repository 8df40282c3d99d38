//! The README's periodic actors compile as they read there (the macro checks their schedules),
//! and run: the `every` one ticks under a worker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use troupe::prelude::*;

static REPORTS: AtomicUsize = AtomicUsize::new(0);
static SYNCS: AtomicUsize = AtomicUsize::new(0);

#[troupe::actor(cron = "0 0 9 * * Mon-Fri", timezone = "Europe/Paris")]
async fn daily_report() {
    REPORTS.fetch_add(1, Ordering::SeqCst);
}

#[troupe::actor(every = "5m", missed = "run_once")]
async fn sync_inventory() {
    SYNCS.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_periodic_actors_schedule() {
    let options = DailyReport.options();
    assert_eq!(options.cron.as_deref(), Some("0 0 9 * * Mon-Fri"));
    assert_eq!(options.timezone.as_deref(), Some("Europe/Paris"));
    let options = SyncInventory.options();
    assert_eq!(options.every, Some(Duration::from_secs(300)));
    assert_eq!(options.missed, Some(troupe::periodic::MissedTicks::RunOnce));
    // Its last tick was ten minutes ago or more: a worker that starts runs once for the
    // missed tick(s).
    let state: Arc<dyn StateBackend> = Arc::new(troupe::MemoryState::new());
    let five_minutes = 300_000;
    let last = (troupe::now_ms() / five_minutes - 2) * five_minutes;
    let key = troupe::periodic::last_tick_key("sync_inventory");
    assert!(
        state
            .add(&key, i64::try_from(last).unwrap(), Duration::from_secs(3600))
            .await
            .unwrap()
    );
    let app = App::builder(Arc::new(MemoryBroker::new()))
        .state(state)
        .actor(DailyReport)
        .actor(SyncInventory)
        .build()
        .unwrap();
    let worker = Worker::builder(app.clone()).start().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while SYNCS.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "the due tick was sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.stop().await;
    // The catch-up, and the current tick when it fell in the last minute.
    assert!((1..=2).contains(&SYNCS.load(Ordering::SeqCst)));
    // The report runs at its next 09:00 (or now, in the minute after one).
    assert!(REPORTS.load(Ordering::SeqCst) <= 1);
}

/// A periodic actor's worker refuses to start without a state backend, saying why.
#[tokio::test]
async fn a_periodic_actor_needs_a_state_backend() {
    let app = App::builder(Arc::new(MemoryBroker::new()))
        .actor(SyncInventory)
        .build()
        .unwrap();
    let error = Worker::builder(app).start().await.unwrap_err().to_string();
    assert!(error.contains("needs a state backend"), "{error}");
}

#[test]
fn every_line_of_the_readme_block_is_in_this_file() {
    let missing = common::missing_lines(
        include_str!("../../../README.md"),
        "#[troupe::actor(cron = \"0 0 9 * * Mon-Fri\"",
        include_str!("readme_periodic.rs"),
        |l| l.ends_with("/* ... */ }"),
        str::to_owned,
    );
    assert!(missing.is_empty(), "README lines not run by this test: {missing:#?}");
}
