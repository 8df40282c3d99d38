//! The README's task-state example runs: every line of its block is in this file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use troupe::prelude::*;

#[troupe::actor(queue_name = "default")]
async fn render(page: u64) -> u64 {
    page
}

#[tokio::test]
async fn the_readme_task_example_runs() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("troupe.db").display());
    let app = run(&url).await;
    let worker = Worker::builder(app.clone()).concurrency(2).start().await.unwrap();
    app.join("default", Duration::from_secs(10)).await.unwrap();
    worker.stop().await;
}

async fn run(url: &str) -> App {
    let state = connect_state(url).await.unwrap();
    let app = App::builder(connect(url).await.unwrap())
        .state(state)
        .track_tasks(TaskTracking::default())
        .actor(Render)
        .build()
        .unwrap();
    let sent = Render.send(&app, 7).await.unwrap();
    let task = app.task(sent.message_id()).await.unwrap();
    assert_eq!(task.map(|t| t.status), Some(TaskStatus::Enqueued));
    #[rustfmt::skip] // the README's line, as it reads there
    let failed = app.tasks(&TaskQuery::new(TaskFilter::new().status(TaskStatus::Failed).actor("render"))).await.unwrap();
    assert!(failed.tasks.is_empty());
    let counts = app.task_counts(&TaskFilter::new().queue("default")).await.unwrap();
    assert_eq!(counts.status(TaskStatus::Enqueued), 1);
    let cancelled = app.cancel(sent.message_id()).await.unwrap();
    assert_eq!(cancelled, CancelOutcome::Cancelled);
    let other = Render.send(&app, 8).await.unwrap();
    assert_ne!(other.message_id(), sent.message_id());
    app
}

#[test]
fn every_line_of_the_readme_block_is_in_this_file() {
    let readme = include_str!("../../../README.md");
    let this = include_str!("readme_tasks.rs");
    let start = readme
        .find("let state = connect_state(\"sqlite://troupe.db\")")
        .expect("the README shows the task example");
    let block = &readme[start..];
    let block = &block[..block.find("```").expect("the block ends")];
    // The README's `?` stands for the test's unwrap; its literals for the test's temporary file.
    let normalise = |l: &str| {
        let l = l.split(" // ").next().unwrap_or(l).trim();
        l.replace(".await?", ".await.unwrap()")
            .replace(".build()?", ".build().unwrap()")
            .replace("\"sqlite://troupe.db\"", "url")
            .replace(' ', "")
    };
    let here: Vec<String> = this.lines().map(normalise).collect();
    let whole = here.concat();
    let missing: Vec<&str> = block
        .lines()
        .filter(|l| !normalise(l).is_empty())
        .filter(|l| {
            let wanted = normalise(l);
            let wanted = wanted.trim_start_matches("let").trim_start_matches("_=");
            let body = wanted.split_once('=').map_or(wanted, |(_, rhs)| rhs);
            !whole.contains(body)
        })
        .collect();
    assert!(missing.is_empty(), "README lines not run by this test: {missing:#?}");
}
