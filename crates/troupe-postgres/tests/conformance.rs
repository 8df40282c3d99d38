//! The conformance suite, and the results and state cases, against the machine's PostgreSQL
//! (`TROUPE_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`). Each case uses a
//! schema of its own. A missing server fails the tests; it never skips them.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use troupe_postgres::{PostgresBroker, PostgresOptions, PostgresResults, PostgresState};
use troupe_test_suite::{Harness, RawEnqueue, TestBroker};

fn options() -> PostgresOptions {
    let url = std::env::var("TROUPE_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    PostgresOptions::from_url(&url)
        .expect("TROUPE_POSTGRES_URL")
        .schema(format!("troupe_t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]))
        .lease(Duration::from_millis(600))
        .poll_interval(Duration::from_millis(50))
        .max_message_size(64 * 1024)
        .max_connections(4)
}

struct PostgresHarness;

impl Harness for PostgresHarness {
    fn setup(&self) -> BoxFuture<'_, TestBroker> {
        Box::pin(async {
            let options = options();
            let limit = options.max_message_size;
            let broker = PostgresBroker::open(options)
                .await
                .expect("PostgreSQL must be running for these tests (scripts/test starts it)");
            let raw_broker = broker.clone();
            let raw: RawEnqueue = Arc::new(move |queue, bytes| {
                let b = raw_broker.clone();
                Box::pin(async move { b.enqueue_raw(&queue, bytes).await })
            });
            let results = PostgresResults::from_pool(broker.pool().clone()).into_dyn();
            TestBroker::new(Arc::new(broker), raw, Duration::from_millis(1500), limit).with_results(results)
        })
    }
}

troupe_test_suite::broker_conformance!(PostgresHarness);

async fn pool() -> troupe_postgres::PgPool {
    troupe_postgres::open(&options()).await.expect("PostgreSQL")
}

mod results {
    troupe_test_suite::results_conformance!(async {
        super::PostgresResults::from_pool(super::pool().await).into_dyn()
    });
}

mod state {
    troupe_test_suite::state_conformance!(async { super::PostgresState::from_pool(super::pool().await).into_dyn() });
}
