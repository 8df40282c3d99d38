//! The README's group example runs: its lines are this file's (a test checks every line of
//! the README's block is here), under a worker, and its callbacks come once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Map, Value, json};
use troupe::prelude::*;

static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static REPORTS: Mutex<Vec<Value>> = Mutex::new(Vec::new());

#[troupe::actor]
async fn render(page: u64) -> Result<u64, ActorError> {
    if page == 3 {
        return Err(ActorError::fail_permanently(ActorError::new(
            "Blank",
            "page 3 is blank",
        )));
    }
    Ok(page * 10)
}

#[troupe::actor]
async fn notify(text: String) {
    NOTES.lock().unwrap().push(text);
}

#[troupe::actor]
async fn report(batch: String, outcomes: Value) {
    REPORTS
        .lock()
        .unwrap()
        .push(json!({"batch": batch, "outcomes": outcomes}));
}

async fn readme(app: App) -> troupe::Result<Vec<String>> {
    let batch = group([
        App::message(&Render, &(1,))?,
        App::message(&Render, &(2,))?,
        App::message(&Render, &(3,))?,
    ])
    // Dramatiq's: once every child succeeded (Python's GroupCallbacks shares its barrier on Redis).
    .add_completion_callback(App::message(&Notify, &("all rendered".into(),))?)
    // Once every child finished, failed ones included; gets the outcomes as its last argument:
    .add_finished_callback(Message::new("default", "report", vec![json!("batch-7")], Map::new()));
    batch.run(&app, None).await?;
    Ok(batch
        .children()
        .iter()
        .filter_map(|c| match c {
            troupe::GroupChild::Message(m) => Some(m.message_id.clone()),
            _ => None,
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_group_example_runs() {
    let app = App::builder(Arc::new(MemoryBroker::new()))
        .state(Arc::new(troupe::MemoryState::new()))
        .actor(Render)
        .actor(Notify)
        .actor(Report)
        .build()
        .unwrap();
    let ids = readme(app.clone()).await.unwrap();
    let worker = Worker::builder(app.clone()).concurrency(4).start().await.unwrap();
    app.join_with("default", Duration::from_secs(10), JoinOptions::new().fail_fast(false))
        .await
        .unwrap();
    worker.stop().await;
    // Page 3 failed for good: Dramatiq's callback is never sent; the finished one is, once.
    assert!(NOTES.lock().unwrap().is_empty());
    let reports = REPORTS.lock().unwrap().clone();
    assert_eq!(
        reports,
        [json!({"batch": "batch-7", "outcomes": [
            {"message_id": ids[0], "ok": true, "result": 10},
            {"message_id": ids[1], "ok": true, "result": 20},
            {"message_id": ids[2], "ok": false, "error": {"type": "Blank", "message": "page 3 is blank"}},
        ]})]
    );
}

#[test]
fn every_line_of_the_readme_block_is_in_this_file() {
    let missing = common::missing_lines(
        include_str!("../../../README.md"),
        "let batch = group([",
        include_str!("readme_groups.rs"),
        |l| l.starts_with("// [{"),
        str::to_owned,
    );
    assert!(missing.is_empty(), "README lines not run by this test: {missing:#?}");
}
