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
    /// Worker processes to start (0: one worker inside the benchmark process). Each runs
    /// `--concurrency` actors at once.
    #[arg(long, default_value_t = 0)]
    processes: usize,
    /// PostgreSQL only: rows to bulk-insert behind the measured messages before the drain, to
    /// show whether claims slow down as the table grows (the drain is timed over the measured
    /// messages only).
    #[arg(long, default_value_t = 0)]
    backlog: u64,
    /// Run as a worker process only (used by --processes): consume until SIGTERM, then print
    /// the message numbers this process ran.
    #[arg(long, hide = true)]
    worker_only: bool,
    /// Idle pick-up latency samples (send one message to an idle worker, time until its actor
    /// starts), taken after the burn-down.
    #[arg(long, default_value_t = 200)]
    latency_samples: usize,
    /// Bytes of payload carried by each message (a string argument).
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// What each message does: `noop`, `sleep` (1 ms of async sleep), `cpu` (about 50 µs of
    /// hashing), or `mixed` (alternating sleep and cpu).
    #[arg(long, value_enum, default_value_t = Scenario::Noop)]
    scenario: Scenario,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What the benchmark actor does per message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    Noop,
    Sleep,
    Cpu,
    Mixed,
}

static SCENARIO: std::sync::OnceLock<Scenario> = std::sync::OnceLock::new();

async fn work(n: u64) {
    let scenario = SCENARIO.get().copied().unwrap_or(Scenario::Noop);
    let sleep = matches!(scenario, Scenario::Sleep) || (scenario == Scenario::Mixed && n.is_multiple_of(2));
    let cpu = matches!(scenario, Scenario::Cpu) || (scenario == Scenario::Mixed && !n.is_multiple_of(2));
    if sleep {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    if cpu {
        let mut x = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        std::hint::black_box(x);
    }
}

/// Resident memory of this process, in KiB (Linux).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
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

/// Runs the scenario's work and counts.
#[troupe::actor(queue_name = "bench")]
async fn noop(n: u64, payload: String) {
    std::hint::black_box(payload.len());
    work(n).await;
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
    let _ = SCENARIO.set(args.scenario);
    if args.worker_only {
        return match worker_only(&args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
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

/// A worker process for `--processes`: runs until SIGTERM, then prints the numbers it ran.
async fn worker_only(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    if let Ok(mut seen) = SEEN.lock() {
        *seen = Some(HashSet::new());
    }
    let broker = troupe::connect(&args.broker_url).await?;
    let app = App::builder(broker).actor(Noop).build()?;
    let worker = Worker::builder(app)
        .concurrency(args.concurrency)
        .fetch_timeout(Duration::from_millis(100))
        .queues(["bench"])
        .start()
        .await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    worker.stop().await;
    let seen: Vec<u64> = SEEN
        .lock()
        .ok()
        .and_then(|s| s.as_ref().map(|s| s.iter().copied().collect()))
        .unwrap_or_default();
    let runs = RUNS.load(std::sync::atomic::Ordering::Relaxed);
    println!("{}", json!({"runs": runs, "seen": seen}));
    Ok(())
}

/// Bulk-inserts `count` no-op messages numbered from `first` behind the measured ones.
async fn backlog(url: &str, first: u64, count: u64) -> Result<(), Box<dyn std::error::Error>> {
    use troupe::postgres::sqlx;
    let options = troupe::postgres::PostgresOptions::from_url(url)?;
    let pool = sqlx::PgPool::connect(&options.url).await?;
    let sql = format!(
        "INSERT INTO {schema}.jobs (queue, message_id, state, body)
         SELECT 'bench', md5(n::text), 0, convert_to(json_build_object(
             'queue_name', 'bench', 'actor_name', 'noop', 'args', json_build_array(n, ''), 'kwargs', '{{}}'::json,
             'options', '{{}}'::json, 'message_id', md5(n::text), 'message_timestamp', 0)::text, 'UTF8')
         FROM generate_series($1::bigint, $2::bigint) AS n",
        schema = options.schema
    );
    let first = i64::try_from(first)?;
    let last = first + i64::try_from(count)? - 1;
    // In chunks, so one statement never holds the table long.
    let mut at = first;
    while at <= last {
        let end = (at + 99_999).min(last);
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(at)
            .bind(end)
            .execute(&pool)
            .await?;
        at = end + 1;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {}.jobs", options.schema)))
        .execute(&pool)
        .await?;
    Ok(())
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

    let payload = "x".repeat(args.payload_bytes);
    let started = Instant::now();
    for n in 0..args.messages {
        Noop.send(&app, n, payload.clone()).await?;
    }
    let enqueue_secs = started.elapsed().as_secs_f64();

    let backlog_secs = if args.backlog > 0 {
        let at = Instant::now();
        backlog(&args.broker_url, args.messages, args.backlog).await?;
        at.elapsed().as_secs_f64()
    } else {
        0.0
    };

    let started = Instant::now();
    let mut children = Vec::new();
    for _ in 0..args.processes {
        children.push(
            tokio::process::Command::new(std::env::current_exe()?)
                .args(["--worker-only", "--broker-url", &args.broker_url, "--concurrency"])
                .arg(args.concurrency.to_string())
                .arg("--scenario")
                .arg(format!("{:?}", args.scenario).to_lowercase())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    let worker = if args.processes == 0 {
        Some(
            Worker::builder(app.clone())
                .concurrency(args.concurrency)
                .fetch_timeout(Duration::from_millis(100))
                .start()
                .await?,
        )
    } else {
        None
    };
    loop {
        let done = if args.backlog > 0 {
            SEEN.lock()
                .ok()
                .and_then(|s| s.as_ref().map(|s| s.iter().filter(|n| **n < args.messages).count()))
                .unwrap_or(0) as u64
                >= args.messages
        } else {
            broker.stats("bench").await?.pending() == 0
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain_secs = started.elapsed().as_secs_f64();
    for child in &children {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-s", "TERM", &pid.to_string()])
                .status();
        }
    }
    for child in children {
        let out = child.wait_with_output().await?;
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        RUNS.fetch_add(
            report["runs"].as_u64().unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
        if let (Ok(mut seen), Some(list)) = (SEEN.lock(), report["seen"].as_array())
            && let Some(set) = seen.as_mut()
        {
            // A number run by two processes counts once here and twice in RUNS.
            set.extend(list.iter().filter_map(serde_json::Value::as_u64));
        }
    }
    let worker = match worker {
        Some(w) => w,
        None => {
            Worker::builder(app.clone())
                .concurrency(args.concurrency)
                .fetch_timeout(Duration::from_millis(100))
                .queues(["bench_latency"])
                .start()
                .await?
        }
    };
    if args.backlog > 0 {
        broker.purge("bench").await?;
    }

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
    // The worker is idle now; in-process runs also hold the producer's bookkeeping.
    let rss = rss_kib();
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

    let (distinct, extra) = SEEN
        .lock()
        .ok()
        .and_then(|s| {
            s.as_ref().map(|s| {
                (
                    s.iter().filter(|n| **n < args.messages).count() as u64,
                    s.iter().filter(|n| **n >= args.messages).count() as u64,
                )
            })
        })
        .unwrap_or((0, 0));
    // Backlog messages run during the drain are neither measured nor checked.
    let runs = RUNS.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(extra);
    let n = args.messages as f64;
    Ok(json!({
        "broker": broker.backend(),
        "messages": args.messages,
        "concurrency": args.concurrency,
        "processes": args.processes,
        "scenario": args.scenario,
        "payload_bytes": args.payload_bytes,
        "rss_idle_kib": rss,
        "backlog": args.backlog,
        "backlog_insert_secs": (backlog_secs * 10.0).round() / 10.0,
        "enqueue_per_sec": (n / enqueue_secs).round(),
        "process_per_sec": (n / drain_secs).round(),
        "idle_pickup_ms_p50": pct(0.5),
        "idle_pickup_ms_p99": pct(0.99),
        "idle_pickup_ms_max": pct(1.0),
        "lost": args.messages.saturating_sub(distinct),
        "duplicates": runs.saturating_sub(distinct),
    }))
}
