//! The quick start: actors, messages, a worker, retries, a delay and a result.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! It runs on the in-memory broker, so it needs no server.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use troupe::SendOptions;
use troupe::prelude::*;

/// Adds two numbers; its result is stored.
#[troupe::actor(queue_name = "math", store_results = true)]
async fn add(x: i64, y: i64) -> i64 {
    x + y
}

static ATTEMPTS: AtomicU32 = AtomicU32::new(0);

/// Fails twice, then succeeds: the Retries middleware re-enqueues it with backoff.
#[troupe::actor(queue_name = "flaky", max_retries = 5, min_backoff = "100ms", max_backoff = "1s")]
async fn flaky(job: String) -> Result<String, ActorError> {
    let attempt = ATTEMPTS.fetch_add(1, Ordering::SeqCst) + 1;
    if attempt < 3 {
        return Err(ActorError::msg(format!("attempt {attempt} of {job} failed")));
    }
    Ok(format!("{job} done on attempt {attempt}"))
}

/// A plain (sync) function runs on the blocking pool.
#[troupe::actor(queue_name = "default")]
fn greet(name: String) {
    println!("  hello, {name}!");
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    troupe::worker::init_logging(0);
    let started = Instant::now();
    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .results(MemoryResults::new().into_dyn())
        .actor(Add)
        .actor(Flaky)
        .actor(Greet)
        .build()?;

    println!("sending messages…");
    let sums: Vec<_> = futures_join(&app).await?;
    Flaky.send(&app, "report".into()).await?;
    Greet
        .send_with_options(
            &app,
            "delayed world".into(),
            SendOptions::new().delay(Duration::from_millis(300)),
        )
        .await?;

    println!("running a worker until the queues drain…");
    let worker = Worker::builder(app.clone()).concurrency(4).start().await?;
    for queue in ["math", "flaky", "default"] {
        broker.join(queue, Duration::from_secs(30)).await?;
        println!("  queue {queue:?} drained");
    }
    worker.stop().await;

    println!("results:");
    for (i, sent) in sums.iter().enumerate() {
        println!("  add({i}, {}) = {}", i * 10, sent.get_result(&app).await?);
    }
    println!(
        "  flaky ran {} times (2 failures, then success)",
        ATTEMPTS.load(Ordering::SeqCst)
    );
    for queue in ["math", "flaky", "default"] {
        let stats = app.broker().stats(queue).await?;
        println!(
            "  {queue:8} ready={} delayed={} in_flight={} dead={}",
            stats.ready, stats.delayed, stats.in_flight, stats.dead
        );
    }
    println!("done in {:?}", started.elapsed());
    Ok(())
}

async fn futures_join(app: &App) -> troupe::Result<Vec<Sent<i64>>> {
    let mut sent = Vec::new();
    for i in 0..5_i64 {
        sent.push(Add.send(app, i, i * 10).await?);
    }
    Ok(sent)
}
