//! The conformance suite against the SQLite broker (a fresh database file per case).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use troupe_sqlite::{SqliteBroker, SqliteOptions};
use troupe_test_suite::{Harness, RawEnqueue, TestBroker};

struct SqliteHarness;

impl Harness for SqliteHarness {
    fn setup(&self) -> BoxFuture<'_, TestBroker> {
        Box::pin(async {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("troupe.db");
            // The directory lives as long as the process: each case is its own process under
            // nextest, and the OS cleans the temp dir.
            std::mem::forget(dir);
            let limit = 64 * 1024;
            let options = SqliteOptions::new(path)
                // As PostgreSQL's: long enough that a loaded CI machine renews in time.
                .lease(Duration::from_millis(1000))
                .max_message_size(limit);
            let broker = SqliteBroker::open(options).await.expect("open the SQLite broker");
            let raw_broker = broker.clone();
            let raw: RawEnqueue = Arc::new(move |queue, bytes| {
                let b = raw_broker.clone();
                Box::pin(async move { b.enqueue_raw(&queue, bytes).await })
            });
            let results = troupe_sqlite::SqliteResults::from_pool(broker.pool().clone()).into_dyn();
            let state = troupe_sqlite::SqliteState::from_pool(broker.pool().clone()).into_dyn();
            TestBroker::new(Arc::new(broker), raw, Duration::from_millis(2500), limit)
                .with_results(results)
                .with_state(state)
        })
    }
}

troupe_test_suite::broker_conformance!(SqliteHarness);

async fn fresh_pool() -> troupe_sqlite::SqlitePool {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("troupe.db");
    std::mem::forget(dir);
    troupe_sqlite::open(&SqliteOptions::new(path)).await.expect("open")
}

mod results {
    troupe_test_suite::results_conformance!(async {
        troupe_sqlite::SqliteResults::from_pool(super::fresh_pool().await).into_dyn()
    });
}

mod state {
    troupe_test_suite::state_conformance!(async {
        troupe_sqlite::SqliteState::from_pool(super::fresh_pool().await).into_dyn()
    });
}
