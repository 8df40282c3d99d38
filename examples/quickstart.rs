//! The quick start: actors, messages, a worker, retries, a delay, results, dead letters, all on
//! the embedded SQLite broker, so no server is needed.
//!
//! ```text
//! cargo run --example quickstart                      # uses ./troupe-quickstart.db
//! cargo run --example quickstart -- --db /tmp/q.db    # another file
//! ```
//!
//! Run it twice: the run counter, the stored results and the dead letters live in the database
//! file, so the second run shows what the first left behind.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use troupe::prelude::*;
use troupe::sqlite::{SqliteBroker, SqliteResults, SqliteState};
use troupe::{SendOptions, StateBackend, current_message};

/// Adds two numbers; its result is stored in the database.
#[troupe::actor(queue_name = "math", store_results = true)]
async fn add(x: i64, y: i64) -> i64 {
    x + y
}

/// Fails on its first two attempts, then succeeds: the Retries middleware re-enqueues it with
/// backoff each time.
#[troupe::actor(
    queue_name = "reports",
    max_retries = 5,
    min_backoff = "100ms",
    max_backoff = "1s",
    store_results = true
)]
async fn build_report(name: String) -> Result<String, ActorError> {
    let attempt = current_message().map_or(0, |m| m.retries()) + 1;
    if attempt < 3 {
        return Err(ActorError::new(
            "TemporaryError",
            format!("attempt {attempt} of {name} failed"),
        ));
    }
    Ok(format!("{name} built on attempt {attempt}"))
}

/// Always fails: after one retry it lands in the dead letters, where it stays (7 days).
#[troupe::actor(queue_name = "reports", max_retries = 1, min_backoff = "50ms")]
async fn doomed(reason: String) -> Result<(), ActorError> {
    Err(ActorError::new("ValueError", reason))
}

/// A plain (sync) function runs on the blocking pool; this one is sent with a delay.
#[troupe::actor(queue_name = "default")]
fn greet(name: String) {
    println!("\n  greet: hello, {name}!");
}

const QUEUES: [&str; 3] = ["math", "reports", "default"];

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut db = String::from("troupe-quickstart.db");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--db" => db = args.next().ok_or("--db needs a path")?,
            other => return Err(format!("unknown argument {other:?}; usage: quickstart [--db PATH]").into()),
        }
    }
    let started = Instant::now();

    // One file holds the queues, the results and the state.
    let broker = SqliteBroker::connect(&format!("sqlite://{db}")).await?;
    let results = SqliteResults::from_pool(broker.pool().clone());
    let state = SqliteState::from_pool(broker.pool().clone());
    let run = bump_run_counter(&state).await?;
    println!(
        "database {db}: run #{run}{}",
        if run > 1 {
            " (state from earlier runs is still there)"
        } else {
            ""
        }
    );

    let app = App::builder(Arc::new(broker.clone()))
        .results(results.into_dyn())
        .state(state.into_dyn())
        .actor(Add)
        .actor(BuildReport)
        .actor(Doomed)
        .actor(Greet)
        .build()?;

    // Producer side: send a batch.
    let mut sums = Vec::new();
    for i in 0..20_i64 {
        sums.push(Add.send(&app, i, i * 10).await?);
    }
    let report = BuildReport.send(&app, format!("report-{run}")).await?;
    Doomed.send(&app, format!("bad input in run {run}")).await?;
    Greet
        .send_with_options(
            &app,
            format!("run {run}"),
            SendOptions::new().delay(Duration::from_millis(500)),
        )
        .await?;
    println!("sent 23 messages (20 additions, a report that fails twice, a doomed job, a greeting delayed 500 ms)");

    // Worker side: run until the batch is done, showing progress.
    let worker = Worker::builder(app.clone()).concurrency(8).start().await?;
    wait_until_drained(&app).await?;
    worker.stop().await;

    println!("\nresults (read back from the database):");
    let total: i64 = futures_sum(&app, &sums).await?;
    println!("  20 additions stored, sum of results = {total}");
    println!("  {}", report.wait_result(&app, Duration::from_secs(5)).await?);

    println!("\nper-queue summary:");
    println!(
        "  {:<8} {:>5} {:>7} {:>9} {:>5}",
        "queue", "ready", "delayed", "in-flight", "dead"
    );
    for queue in QUEUES {
        let s = app.broker().stats(queue).await?;
        println!(
            "  {queue:<8} {:>5} {:>7} {:>9} {:>5}",
            s.ready, s.delayed, s.in_flight, s.dead
        );
    }
    let dead = app.broker().dead_letters("reports", 100).await?;
    println!("\ndead letters in \"reports\" ({}, one per run so far):", dead.len());
    for letter in dead.iter().rev().take(3) {
        println!("  {} - {}", letter.id, letter.reason.lines().next().unwrap_or(""));
    }
    println!(
        "\ndone in {:.1?}; run it again to see the state survive",
        started.elapsed()
    );
    Ok(())
}

async fn bump_run_counter(state: &SqliteState) -> troupe::Result<i64> {
    let ttl = Duration::from_secs(30 * 24 * 3600);
    state.incr("quickstart:runs", 1, i64::MAX, ttl).await?;
    Ok(state.get("quickstart:runs").await?.unwrap_or(1))
}

async fn wait_until_drained(app: &App) -> troupe::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut pending = 0;
        for queue in QUEUES {
            pending += app.broker().stats(queue).await?.pending();
        }
        print!("\r  progress: {pending:>3} messages pending ");
        let _ = std::io::stdout().flush();
        if pending == 0 {
            println!("- batch done");
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(troupe::Error::QueueJoinTimeout("quickstart".into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn futures_sum(app: &App, sums: &[Sent<i64>]) -> troupe::Result<i64> {
    let mut total = 0;
    for sent in sums {
        total += sent.wait_result(app, Duration::from_secs(5)).await?;
    }
    Ok(total)
}
