//! `troupe-bench`: how fast a broker enqueues and a worker drains no-op messages, with a check
//! that every message ran exactly once.
//!
//! ```text
//! cargo run --release -p troupe-bench -- --broker-url sqlite:///tmp/bench.db --messages 20000
//! ```
//!
//! This is the first cut of the benchmark (enqueue one by one, burn-down); latency, payload
//! sizes, several processes and the side-by-side comparison with Python Dramatiq come next.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use troupe::prelude::*;

#[derive(Debug, Parser)]
#[command(about = "Measure Troupe's enqueue and process rates")]
struct Args {
    /// Broker URL (memory://, sqlite://PATH, ...). A SQLite file is deleted first.
    #[arg(long, default_value = "sqlite:///tmp/troupe-bench.db")]
    broker_url: String,
    /// Messages to enqueue and drain.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Worker concurrency.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Idle pick-up latency samples (send one message to an idle worker, time until its actor
    /// starts), taken after the burn-down.
    #[arg(long, default_value_t = 200)]
    latency_samples: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

static SEEN: Mutex<Option<HashSet<u64>>> = Mutex::new(None);
static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static STARTED: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Instant>>> = Mutex::new(None);

/// Reports when it starts, for the latency samples.
#[troupe::actor(queue_name = "bench_latency")]
async fn ping() {
    if let Ok(tx) = STARTED.lock()
        && let Some(tx) = tx.as_ref()
    {
        let _ = tx.send(Instant::now());
    }
}

/// Does nothing but count.
#[troupe::actor(queue_name = "bench")]
async fn noop(n: u64) {
    RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Ok(mut seen) = SEEN.lock()
        && let Some(set) = seen.as_mut()
    {
        set.insert(n);
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(report) => {
            if args.json {
                println!("{report}");
            } else if let Some(o) = report.as_object() {
                for (k, v) in o {
                    println!("{k:>24}: {v}");
                }
            }
            if report["lost"] == json!(0) && report["duplicates"] == json!(0) {
                ExitCode::SUCCESS
            } else {
                eprintln!("error: the exactly-once check failed");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &Args) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    if let Some(path) = args.broker_url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or(path);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
    if let Ok(mut seen) = SEEN.lock() {
        *seen = Some(HashSet::new());
    }
    let broker = troupe::connect(&args.broker_url).await?;
    let app = App::builder(Arc::clone(&broker)).actor(Noop).actor(Ping).build()?;
    app.declare_queue("bench").await?;
    app.declare_queue("bench_latency").await?;

    let started = Instant::now();
    for n in 0..args.messages {
        Noop.send(&app, n).await?;
    }
    let enqueue_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let worker = Worker::builder(app.clone())
        .concurrency(args.concurrency)
        .fetch_timeout(Duration::from_millis(100))
        .start()
        .await?;
    loop {
        let stats = broker.stats("bench").await?;
        if stats.pending() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain_secs = started.elapsed().as_secs_f64();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    if let Ok(mut started) = STARTED.lock() {
        *started = Some(tx);
    }
    let mut latencies = Vec::with_capacity(args.latency_samples);
    for _ in 0..args.latency_samples {
        // Let the worker go idle first.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = Instant::now();
        Ping.send(&app).await?;
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(at)) => latencies.push(at.duration_since(sent).as_secs_f64() * 1000.0),
            _ => return Err("a latency probe was not picked up within 10 s".into()),
        }
    }
    worker.stop().await;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((latencies.len() - 1) as f64 * p).round() as usize;
        (latencies[i] * 100.0).round() / 100.0
    };

    let runs = RUNS.load(std::sync::atomic::Ordering::Relaxed);
    let distinct = SEEN.lock().ok().and_then(|s| s.as_ref().map(HashSet::len)).unwrap_or(0) as u64;
    let n = args.messages as f64;
    Ok(json!({
        "broker": broker.backend(),
        "messages": args.messages,
        "concurrency": args.concurrency,
        "enqueue_per_sec": (n / enqueue_secs).round(),
        "process_per_sec": (n / drain_secs).round(),
        "idle_pickup_ms_p50": pct(0.5),
        "idle_pickup_ms_p99": pct(0.99),
        "idle_pickup_ms_max": pct(1.0),
        "lost": args.messages.saturating_sub(distinct),
        "duplicates": runs.saturating_sub(distinct),
    }))
}
