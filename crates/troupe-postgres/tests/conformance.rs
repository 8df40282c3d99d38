//! The conformance suite, and the results and state cases, against the machine's PostgreSQL
//! (`TROUPE_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`). Each case uses a
//! schema of its own. A missing server fails the tests; it never skips them.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use troupe_postgres::{PoolMode, PostgresBroker, PostgresOptions, PostgresResults, PostgresState};
use troupe_test_suite::{Harness, RawEnqueue, TestBroker, servers};

fn options() -> PostgresOptions {
    let url = std::env::var("TROUPE_POSTGRES_URL").unwrap_or_else(|_| DIRECT.into());
    options_from(&url)
}

/// The machine's PostgreSQL, directly.
const DIRECT: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The test settings on `url`, in a schema of the case's own.
fn options_from(url: &str) -> PostgresOptions {
    PostgresOptions::from_url(url)
        .expect("TROUPE_POSTGRES_URL")
        .schema(format!("troupe_t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]))
        // Short enough to test redelivery quickly, long enough that a loaded CI machine renews
        // in time (600 ms let a starved consumer's batch be redelivered mid-test).
        .lease(Duration::from_millis(1000))
        .poll_interval(Duration::from_millis(50))
        .max_message_size(64 * 1024)
        .max_connections(4)
}

/// Through PgBouncer in transaction mode, LISTEN over the server's own address.
fn through_transaction_pooler() -> PostgresOptions {
    options_from(&servers::pgbouncer_url("transaction"))
        .pool_mode(PoolMode::Transaction)
        .listen_url(DIRECT)
}

/// Through PgBouncer in session mode (nothing to say: the defaults work).
fn through_session_pooler() -> PostgresOptions {
    options_from(&servers::pgbouncer_url("session"))
}

/// The broker the options name, with results and state over its store.
struct PostgresHarness(fn() -> PostgresOptions);

impl Harness for PostgresHarness {
    fn setup(&self) -> BoxFuture<'_, TestBroker> {
        Box::pin(async {
            let options = (self.0)();
            let limit = options.max_message_size;
            let broker = PostgresBroker::open(options)
                .await
                .expect("PostgreSQL must be running for these tests (scripts/test starts it)");
            let raw_broker = broker.clone();
            let raw: RawEnqueue = Arc::new(move |queue, bytes| {
                let b = raw_broker.clone();
                Box::pin(async move { b.enqueue_raw(&queue, bytes).await })
            });
            let results = PostgresResults::from_store(broker.store().clone()).into_dyn();
            let state = PostgresState::from_store(broker.store().clone()).into_dyn();
            TestBroker::new(Arc::new(broker), raw, Duration::from_millis(2500), limit)
                .with_results(results)
                .with_state(state)
        })
    }
}

troupe_test_suite::broker_conformance!(PostgresHarness(options));

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

/// The same cases through PgBouncer in transaction mode (`pool_mode=transaction`, LISTEN over
/// `listen_url`); the results and state backends opened from a URL.
mod transaction_pooler {
    use super::*;

    troupe_test_suite::broker_conformance!(PostgresHarness(through_transaction_pooler));

    /// The URL of [`through_transaction_pooler`] in a schema of its own.
    fn url() -> String {
        let schema = format!("troupe_t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        format!(
            "{}?pool_mode=transaction&schema={schema}&listen_url={}",
            servers::pgbouncer_url("transaction"),
            DIRECT.replace(':', "%3A").replace('/', "%2F").replace('@', "%40")
        )
    }

    mod results {
        troupe_test_suite::results_conformance!(async {
            super::PostgresResults::connect(&super::url())
                .await
                .expect("PgBouncer")
                .into_dyn()
        });
    }

    mod state {
        troupe_test_suite::state_conformance!(async {
            super::PostgresState::connect(&super::url())
                .await
                .expect("PgBouncer")
                .into_dyn()
        });
    }
}

/// The same cases through PgBouncer in session mode, with the default settings.
mod session_pooler {
    use super::*;

    troupe_test_suite::broker_conformance!(PostgresHarness(through_session_pooler));
}

/// Behind a transaction pooler without `listen_url`, idle consumers find messages by polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_without_listen_url_polls() {
    use troupe_core::{Broker, ConsumerOptions, Message};
    let options = options_from(&servers::pgbouncer_url("transaction")).pool_mode(PoolMode::Transaction);
    let broker = PostgresBroker::open(options).await.expect("PgBouncer");
    broker.declare_queue("q").await.unwrap();
    let mut consumer = broker.consume("q", ConsumerOptions::new(10)).await.unwrap();
    assert!(consumer.fetch(10, Duration::from_millis(200)).await.unwrap().is_empty());
    broker
        .enqueue(Message::new("q", "a", vec![], serde_json::Map::new()), None)
        .await
        .unwrap();
    let got = consumer.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1, "the message was found by polling");
    got[0].ack().await.unwrap();
    consumer.close().await.unwrap();
    assert_eq!(broker.stats("q").await.unwrap().ready, 0);
}

/// A `listen_url` that reaches the pooler instead of the server would lose every wake-up
/// without a word: opening checks that a notification arrives over it, and says what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_url_that_does_not_reach_the_server_is_refused() {
    let pooler = servers::pgbouncer_url("transaction");
    let options = options_from(&pooler)
        .pool_mode(PoolMode::Transaction)
        .listen_url(pooler.clone());
    let e = PostgresBroker::open(options).await.unwrap_err().to_string();
    assert!(e.contains("listen_url") && e.contains("not the pooler"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    let options = options_from(&pooler)
        .pool_mode(PoolMode::Transaction)
        .listen_url(format!(
            "postgres://postgres:secret@127.0.0.1:{}/test",
            servers::free_port()
        ));
    let e = PostgresBroker::open(options).await.unwrap_err().to_string();
    assert!(e.contains("listen_url") && !e.contains("secret"), "{e}");
}

/// `enqueue_in`: the message exists if and only if the caller's transaction commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_enqueue_follows_the_transaction() {
    use troupe_core::{Broker, ConsumerOptions, Message};
    let broker = PostgresBroker::open(options()).await.expect("PostgreSQL");
    sqlx::query("CREATE TABLE signups (address text PRIMARY KEY)")
        .execute(broker.pool())
        .await
        .unwrap();
    let queue = "email";
    broker.declare_queue(queue).await.unwrap();
    let mut committed = 0;
    for (address, commit) in [("ada@example.com", true), ("bob@example.com", false)] {
        let mut tx = broker.pool().begin().await.unwrap();
        sqlx::query("INSERT INTO signups (address) VALUES ($1)")
            .bind(address)
            .execute(&mut *tx)
            .await
            .unwrap();
        let message = Message::new(
            queue,
            "welcome",
            vec![serde_json::json!(address)],
            serde_json::Map::new(),
        );
        broker.enqueue_in(&mut tx, message, None).await.unwrap();
        // Invisible to others until the commit.
        assert_eq!(broker.stats(queue).await.unwrap().ready, committed);
        if commit {
            tx.commit().await.unwrap();
            committed += 1;
        } else {
            tx.rollback().await.unwrap();
        }
    }
    let stats = broker.stats(queue).await.unwrap();
    assert_eq!(stats.ready, 1, "only the committed sign-up's message exists: {stats:?}");
    let mut consumer = broker.consume(queue, ConsumerOptions::new(10)).await.unwrap();
    let got = consumer.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].message().unwrap().args,
        vec![serde_json::json!("ada@example.com")]
    );
    got[0].ack().await.unwrap();
    consumer.close().await.unwrap();
}

/// Several workers starting at once on a fresh schema migrate it once, without errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_migrate_once() {
    let options = options();
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let o = options.clone();
            tokio::spawn(async move { PostgresBroker::open(o).await })
        })
        .collect();
    for open in opens {
        open.await.expect("join").expect("every concurrent start succeeds");
    }
    let broker = PostgresBroker::open(options.clone()).await.expect("open");
    let version: String = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'schema_version'")
        .fetch_one(broker.pool())
        .await
        .expect("version");
    assert_eq!(version, "4");
}

/// A schema of version 1 (before task records and rate-limit slots) is migrated on connect: the
/// task and slot tables appear, what it held stays, and the task store and slots work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_of_version_1_gains_the_task_tables() {
    use troupe_core::{Broker, Message, StateBackend, TaskStatus, TaskUpdate};
    let options = options();
    let message = Message::new("q", "a", vec![serde_json::json!("kept")], serde_json::Map::new());
    {
        let broker = PostgresBroker::open(options.clone()).await.expect("PostgreSQL");
        broker.declare_queue("q").await.unwrap();
        broker.enqueue(message.clone(), None).await.unwrap();
        // Back to version 1: what migrations 2 and 3 add, gone.
        sqlx::raw_sql(
            "DROP TABLE tasks; DROP TABLE cancels; DROP TABLE unique_keys; DROP TABLE slots;
             UPDATE meta SET value = '1' WHERE key = 'schema_version'",
        )
        .execute(broker.pool())
        .await
        .unwrap();
        broker.close().await.unwrap();
    }
    let broker = PostgresBroker::open(options).await.expect("open");
    let version: String = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'schema_version'")
        .fetch_one(broker.pool())
        .await
        .unwrap();
    assert_eq!(version, "4");
    assert_eq!(broker.stats("q").await.unwrap().ready, 1, "the queue is kept");
    let state = PostgresState::from_pool(broker.pool().clone());
    assert!(
        state
            .acquire_slot("k", "holder", 1, Duration::from_secs(5))
            .await
            .unwrap()
    );
    let tasks = state.tasks().expect("a task store");
    let update = TaskUpdate::new(&message.message_id, "a", "q", TaskStatus::Enqueued, 0);
    assert!(tasks.record(&update, Duration::from_secs(60)).await.unwrap());
    assert_eq!(
        tasks.task(&message.message_id).await.unwrap().unwrap().status,
        TaskStatus::Enqueued
    );
}
