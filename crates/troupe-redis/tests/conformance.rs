//! The conformance suite, and the results and state cases, against the machine's Redis
//! (`TROUPE_REDIS_URL`, default `redis://127.0.0.1:6379/0`). Each case uses a namespace of its
//! own. A missing server fails the tests; it never skips them.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use troupe_redis::{RedisBroker, RedisOptions, RedisResults, RedisState};
use troupe_test_suite::{Harness, RawEnqueue, TestBroker};

fn options() -> RedisOptions {
    let url = std::env::var("TROUPE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    RedisOptions::from_url(&url)
        .expect("TROUPE_REDIS_URL")
        .namespace(format!("troupe-test-{}", uuid::Uuid::new_v4().simple()))
        .heartbeat_timeout(Duration::from_secs(1))
        .maintenance_interval(Duration::from_millis(200))
        .max_message_size(64 * 1024)
}

/// Brokers, results and state on the Redis that the options function names.
struct RedisHarness(fn() -> RedisOptions);

impl Harness for RedisHarness {
    fn setup(&self) -> BoxFuture<'_, TestBroker> {
        Box::pin(async {
            let options = (self.0)();
            let limit = options.max_message_size;
            let broker = RedisBroker::open(options.clone())
                .await
                .expect("Redis must be running for these tests (scripts/test starts it)");
            let raw_broker = broker.clone();
            let raw: RawEnqueue = Arc::new(move |queue, bytes| {
                let b = raw_broker.clone();
                Box::pin(async move { b.enqueue_raw(&queue, bytes).await })
            });
            let results = RedisResults::open(options.clone()).await.expect("results").into_dyn();
            let state = RedisState::open(options).await.expect("state").into_dyn();
            TestBroker::new(Arc::new(broker), raw, Duration::from_millis(2500), limit)
                .with_results(results)
                .with_state(state)
        })
    }
}

troupe_test_suite::broker_conformance!(RedisHarness(options));

mod results {
    troupe_test_suite::results_conformance!(async {
        troupe_redis::RedisResults::open(super::options())
            .await
            .expect("Redis")
            .into_dyn()
    });
}

mod state {
    troupe_test_suite::state_conformance!(async {
        super::RedisState::open(super::options())
            .await
            .expect("Redis")
            .into_dyn()
    });
}

/// The same cases on a Redis Cluster of three masters (started by the test suite on loopback
/// when it is not up): each case's namespace is hash-tagged, so its keys are in one slot, on
/// one master, which its connections find through the cluster.
mod cluster {
    use super::*;

    pub(super) fn options() -> RedisOptions {
        let url = std::env::var("TROUPE_REDIS_CLUSTER_URL")
            .unwrap_or_else(|_| troupe_test_suite::servers::redis_cluster_url());
        RedisOptions::from_url(&url)
            .expect("TROUPE_REDIS_CLUSTER_URL")
            .namespace(format!("{{troupe-test-{}}}", uuid::Uuid::new_v4().simple()))
            .heartbeat_timeout(Duration::from_secs(1))
            .maintenance_interval(Duration::from_millis(200))
            .max_message_size(64 * 1024)
    }

    troupe_test_suite::broker_conformance!(RedisHarness(options));

    mod results {
        troupe_test_suite::results_conformance!(async {
            troupe_redis::RedisResults::open(super::options())
                .await
                .expect("Redis Cluster")
                .into_dyn()
        });
    }

    mod state {
        troupe_test_suite::state_conformance!(async {
            troupe_redis::RedisState::open(super::options())
                .await
                .expect("Redis Cluster")
                .into_dyn()
        });
    }
}
