//! This process's writers take turns: with `busy_timeout=0s` (a writer that finds SQLite's
//! write lock taken fails at once, "database is locked"), two brokers, a results backend and a
//! consumer settling its deliveries, each on its own pool of the same file, write all at once
//! and none of them fails.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{Map, json};
use troupe_core::{Broker, ConsumerOptions, Message, ResultBackend};
use troupe_sqlite::{SqliteBroker, SqliteResults};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_of_one_process_never_meet_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?busy_timeout=0s&durability=full",
        dir.path().join("t.db").display()
    );
    let first = SqliteBroker::connect(&url).await.unwrap();
    let second = SqliteBroker::connect(&url).await.unwrap();
    let results = SqliteResults::connect(&url).await.unwrap();
    first.declare_queue("w").await.unwrap();

    const SENDS: usize = 300;
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..SENDS {
        let broker = if i % 2 == 0 { first.clone() } else { second.clone() };
        let results = results.clone();
        writers.spawn(async move {
            let message = Message::new("w", "a", vec![json!(i)], Map::new());
            let sent = broker.enqueue(message.clone(), None).await?;
            results.store(&sent, json!(i), Duration::from_secs(60)).await
        });
    }
    // Claims and settling batches beside the sends.
    let consumer = {
        let broker = first.clone();
        tokio::spawn(async move {
            let mut consumer = broker.consume("w", ConsumerOptions::new(64)).await?;
            let mut acked = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while acked < SENDS && tokio::time::Instant::now() < deadline {
                let batch = consumer.fetch(64, Duration::from_millis(50)).await?;
                let acks = batch.iter().map(|d| d.ack());
                for outcome in futures::future::join_all(acks).await {
                    outcome?;
                    acked += 1;
                }
            }
            Ok::<_, troupe_core::Error>(acked)
        })
    };
    let mut failures = Vec::new();
    while let Some(outcome) = writers.join_next().await {
        if let Err(e) = outcome.unwrap() {
            failures.push(e.to_string());
        }
    }
    let acked = consumer.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {SENDS} writers failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert_eq!(acked.unwrap(), SENDS);
    assert_eq!(first.stats("w").await.unwrap().pending(), 0);
}
