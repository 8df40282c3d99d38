//! Opening a database: clear one-line errors for bad paths and foreign files; durability across
//! reopen.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, json};
use troupe_core::{Broker, ConsumerOptions, Message};
use troupe_sqlite::{SqliteBroker, SqliteOptions, SqliteResults};

fn one_line(e: &troupe_core::Error) -> String {
    let text = e.to_string();
    assert!(!text.contains('\n'), "one line: {text}");
    text
}

#[tokio::test]
async fn a_missing_directory_is_a_clear_error() {
    let e = SqliteBroker::connect("sqlite:///definitely/not/here/troupe.db")
        .await
        .unwrap_err();
    let text = one_line(&e);
    assert!(
        text.contains("/definitely/not/here") && text.contains("does not exist"),
        "{text}"
    );
    assert_eq!(e.kind(), troupe_core::ErrorKind::Config);
}

#[tokio::test]
async fn an_unwritable_path_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("is-a-directory.db");
    std::fs::create_dir(&path).unwrap();
    let e = SqliteBroker::open(SqliteOptions::new(&path)).await.unwrap_err();
    let text = one_line(&e);
    assert!(text.contains("cannot open the SQLite database"), "{text}");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.db");
    std::fs::write(&path, b"these are my notes, not a database; ".repeat(200)).unwrap();
    let e = SqliteBroker::open(SqliteOptions::new(&path)).await.unwrap_err();
    let text = one_line(&e);
    assert!(
        text.contains("not an SQLite database") || text.contains("not a database"),
        "{text}"
    );
    assert_eq!(std::fs::read(&path).unwrap().len(), 36 * 200, "the file was left alone");
}

#[tokio::test]
async fn another_applications_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE users (id INTEGER PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    let e = SqliteBroker::open(SqliteOptions::new(&path)).await.unwrap_err();
    let text = one_line(&e);
    assert!(text.contains("not a Troupe one") && text.contains("users"), "{text}");
}

#[tokio::test]
async fn a_database_from_a_newer_troupe_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let broker = SqliteBroker::open(SqliteOptions::new(&path)).await.unwrap();
    sqlx::query("UPDATE troupe_meta SET value = '999' WHERE key = 'schema_version'")
        .execute(broker.pool())
        .await
        .unwrap();
    broker.close().await.unwrap();
    let e = SqliteBroker::open(SqliteOptions::new(&path)).await.unwrap_err();
    assert!(one_line(&e).contains("newer Troupe"), "{e}");
}

#[tokio::test]
async fn opening_twice_migrates_once_and_messages_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let message = Message::new("q", "a", vec![json!("kept")], Map::new());
    {
        let broker = SqliteBroker::open(SqliteOptions::new(&path)).await.unwrap();
        broker.declare_queue("q").await.unwrap();
        broker.enqueue(message.clone(), None).await.unwrap();
        broker
            .enqueue(message.clone(), Some(Duration::from_millis(200)))
            .await
            .unwrap();
        let results = SqliteResults::from_pool(broker.pool().clone());
        troupe_core::ResultBackend::store(&results, &message, json!(42), Duration::from_secs(60))
            .await
            .unwrap();
        broker.close().await.unwrap();
    }
    let broker: Arc<dyn Broker> = Arc::new(SqliteBroker::open(SqliteOptions::new(&path)).await.unwrap());
    let stats = broker.stats("q").await.unwrap();
    assert_eq!((stats.ready, stats.delayed), (1, 1), "{stats:?}");
    let mut consumer = broker.consume("q", ConsumerOptions::new(10)).await.unwrap();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while seen.len() < 2 && std::time::Instant::now() < deadline {
        for d in consumer.fetch(10, Duration::from_millis(100)).await.unwrap() {
            seen.push(d.message().unwrap().args.clone());
            d.ack().await.unwrap();
        }
    }
    assert_eq!(seen, vec![vec![json!("kept")], vec![json!("kept")]]);
    let results = SqliteResults::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert_eq!(
        troupe_core::ResultBackend::get(&results, &message, None).await.unwrap(),
        json!(42)
    );
}

/// A file of schema 1 (before task records and rate-limit slots) is migrated on open: the task
/// and slot tables appear, what it held stays, and the task store and slots work.
#[tokio::test]
async fn a_database_of_schema_1_gains_the_task_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let message = Message::new("q", "a", vec![json!("kept")], Map::new());
    {
        let broker = SqliteBroker::open(SqliteOptions::new(&path)).await.unwrap();
        broker.declare_queue("q").await.unwrap();
        broker.enqueue(message.clone(), None).await.unwrap();
        // Back to schema 1: what migrations 2 and 3 add, gone.
        sqlx::raw_sql(
            "DROP TABLE troupe_tasks; DROP TABLE troupe_cancels; DROP TABLE troupe_unique; DROP TABLE troupe_slots;
             UPDATE troupe_meta SET value = '1' WHERE key = 'schema_version'",
        )
        .execute(broker.pool())
        .await
        .unwrap();
        broker.close().await.unwrap();
    }
    let broker = SqliteBroker::open(SqliteOptions::new(&path)).await.unwrap();
    let version: String = sqlx::query_scalar("SELECT value FROM troupe_meta WHERE key = 'schema_version'")
        .fetch_one(broker.pool())
        .await
        .unwrap();
    assert_eq!(version, "4");
    assert_eq!(broker.stats("q").await.unwrap().ready, 1, "the queue is kept");
    let state = troupe_sqlite::SqliteState::from_pool(broker.pool().clone());
    assert!(
        troupe_core::StateBackend::acquire_slot(&state, "k", "holder", 1, Duration::from_secs(5))
            .await
            .unwrap()
    );
    let tasks = troupe_core::StateBackend::tasks(&state).expect("a task store");
    let update = troupe_core::TaskUpdate::new(&message.message_id, "a", "q", troupe_core::TaskStatus::Enqueued, 0);
    assert!(tasks.record(&update, Duration::from_secs(60)).await.unwrap());
    assert_eq!(
        tasks.task(&message.message_id).await.unwrap().unwrap().status,
        troupe_core::TaskStatus::Enqueued
    );
}
