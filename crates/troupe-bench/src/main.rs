//! `troupe-bench`: how fast a broker enqueues and a worker drains messages, the end-to-end
//! latency at a fixed offered load, the idle pick-up latency and the worker's memory, with a
//! check that every message ran exactly once.
//!
//! ```text
//! cargo run --release -p troupe-bench -- --broker-url sqlite:///tmp/bench.db --messages 20000
//! ```
//!
//! Phases, in order: enqueue (the first half of the messages one at a time, each awaited; the
//! second half with `send_many` in batches of `--batch-size`), burn-down (start the workers,
//! time until every message ran), steady state (`--rate` messages/s for `--steady-secs`, each
//! sent from a task of its own and timed from its send to its actor's start), idle pick-up
//! (one message at a time to an idle worker). `bench/compare.sh` runs it next to Python Dramatiq.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use troupe::prelude::*;
use troupe::{AppBuilder, now_ms};

/// With the `mimalloc` feature, mimalloc instead of the system allocator (glibc's malloc,
/// whose arena locks the worker's cross-thread frees contend on).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Messages each worker holds per queue, running ones included (default: the worker's
    /// default, 2 × concurrency).
    #[arg(long)]
    prefetch: Option<usize>,
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
    /// hashing), `mixed` (alternating sleep and cpu), or `io` (awaits 50 ms, a stand-in for an
    /// HTTP call; raise `--concurrency` into the thousands).
    #[arg(long, value_enum, default_value_t = Scenario::Noop)]
    scenario: Scenario,
    /// Tasks sharing the one-at-a-time half of the enqueue phase, each awaiting one `send` at a
    /// time (100: what a busy web server does).
    #[arg(long, default_value_t = 1)]
    senders: u64,
    /// Messages per `send_many` call in the batched half of the enqueue phase.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Offered load of the steady-state phase, in messages/s.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Length of the steady-state phase in seconds (0: skip it).
    #[arg(long, default_value_t = 5.0)]
    steady_secs: f64,
    /// Print one JSON object instead of text (and no progress bar).
    #[arg(long)]
    json: bool,
    /// Track every message's state (`AppBuilder::track_tasks`, with cancellation on) in the
    /// state backend, to measure what tracking costs.
    #[arg(long)]
    track_tasks: bool,
    /// With `--track-tasks`: whether workers honour cancellations (`on`, the default, reads
    /// each message's cancellation before it runs; `off` measures tracking alone).
    #[arg(long, value_enum, default_value_t = Switch::On)]
    cancellation: Switch,
    /// The state backend for `--track-tasks` and `--task-records` (default: the broker's URL
    /// for sqlite://, redis:// and postgres://, memory for memory://).
    #[arg(long)]
    state_url: Option<String>,
    /// Task records to write into the state backend before timing task queries (0: no query
    /// figures). Use a dedicated database, schema or Redis namespace: they are deleted after.
    #[arg(long, default_value_t = 0)]
    task_records: u64,
    /// Runs of each task query.
    #[arg(long, default_value_t = 20)]
    query_runs: usize,
    /// Acquire/release cycles of each rate limiter to time on the state backend, alone and
    /// from 16 tasks at once (0: no limiter figures).
    #[arg(long, default_value_t = 0)]
    limiter_ops: u64,
    /// Leave the `--task-records` records in place (drop the database, schema or namespace
    /// yourself; deleting a million records one by one takes minutes).
    #[arg(long)]
    keep_task_records: bool,
    /// Instead of the drain: put this many messages in one queue (a tenth of them delayed) and
    /// as many task records in the state backend, then time the dashboard's pages (overview, a
    /// page of the queue, the task states) over HTTP. Use a dedicated database or namespace.
    #[arg(long, default_value_t = 0)]
    dashboard_backlog: u64,
    /// Requests per dashboard page timed.
    #[arg(long, default_value_t = 20)]
    page_runs: usize,
    /// Instead of the drain: put this many messages (of `--payload-bytes`) in the `bench`
    /// queue, then start one worker process at the default settings and sample its resident
    /// memory until the queue is drained (ready messages) or for `--memory-secs` (delayed
    /// ones). Use a dedicated database or namespace: the queue is purged first and after.
    #[arg(long, default_value_t = 0)]
    memory_backlog: u64,
    /// With `--memory-backlog`: delay every message by this many seconds (86400: due in a day);
    /// 0 sends them ready.
    #[arg(long, default_value_t = 0)]
    memory_delay_secs: u64,
    /// With `--memory-backlog`: how long to watch a worker holding delayed messages, and the
    /// longest a drain of ready ones may take.
    #[arg(long, default_value_t = 30.0)]
    memory_secs: f64,
    /// Run as the worker of `--memory-backlog` (used by it): the default settings, and nothing
    /// kept per message.
    #[arg(long, hide = true)]
    lean_worker: bool,
    /// Instead of the drain: put this many messages in the `bench` queue, start one worker
    /// process at the default settings on it and on nine quiet queues (`bench_trickle_0` to
    /// `_8`), send `--trickle-rate` messages/s spread over the quiet queues for
    /// `--fairness-secs`, and report their pick-up latency (send to actor start) while the
    /// backlog drains. Use a dedicated database or namespace: the queues are purged first and
    /// after.
    #[arg(long, default_value_t = 0)]
    fairness_backlog: u64,
    /// With `--fairness-backlog`: messages/s sent to the quiet queues, all nine together.
    #[arg(long, default_value_t = 180)]
    trickle_rate: u64,
    /// With `--fairness-backlog`: how long the quiet queues receive their trickle (short
    /// enough that the backlog outlasts it: the report's `backlog_left` says whether it did).
    #[arg(long, default_value_t = 5.0)]
    fairness_secs: f64,
    /// With `--fairness-backlog`: run the worker inside the benchmark process (at the default
    /// settings), as an embedded SQLite broker is used: there a send wakes the worker's
    /// consumer at once, where a worker in another process polls the file.
    #[arg(long)]
    fairness_in_process: bool,
    /// Run as the worker of `--fairness-backlog` (used by it): also consume this many quiet
    /// queues, and print the trickle's samples.
    #[arg(long, hide = true, default_value_t = 0)]
    trickle_queues: usize,
}

/// The quiet queues of `--fairness-backlog`.
const TRICKLE_QUEUES: usize = 9;

/// The name of quiet queue `i`.
fn trickle_queue(i: usize) -> String {
    format!("bench_trickle_{i}")
}

/// The state backend the flags name, when tracking or task queries are asked for.
async fn state_backend(args: &Args) -> Result<Option<Arc<dyn StateBackend>>, Box<dyn std::error::Error>> {
    if !args.track_tasks && args.task_records == 0 && args.limiter_ops == 0 {
        return Ok(None);
    }
    let url = match &args.state_url {
        Some(url) => url.clone(),
        None if args.broker_url.starts_with("amqp") => {
            return Err("an amqp:// broker keeps no state: give --state-url (redis://, postgres://, sqlite://)".into());
        }
        None => args.broker_url.clone(),
    };
    Ok(Some(troupe::connect_state(&url).await?))
}

/// `App::builder(broker)` with task tracking when `--track-tasks` is on.
fn builder(broker: Arc<dyn Broker>, state: Option<&Arc<dyn StateBackend>>, args: &Args) -> AppBuilder {
    let builder = App::builder(broker);
    match state.filter(|_| args.track_tasks) {
        Some(state) => {
            let builder = builder.state(Arc::clone(state)).track_tasks(TaskTracking::default());
            match args.cancellation {
                Switch::On => builder,
                Switch::Off => builder.cancellation(troupe::Cancellation::off()),
            }
        }
        None => builder,
    }
}

/// A setting that is on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Switch {
    On,
    Off,
}

/// What the benchmark actor does per message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    Noop,
    Sleep,
    Cpu,
    Mixed,
    Io,
}

/// How long the `io` scenario's actor awaits (a stand-in for an HTTP call).
const IO_WAIT: Duration = Duration::from_millis(50);

static SCENARIO: std::sync::OnceLock<Scenario> = std::sync::OnceLock::new();

async fn work(n: u64) {
    let scenario = SCENARIO.get().copied().unwrap_or(Scenario::Noop);
    let sleep = matches!(scenario, Scenario::Sleep) || (scenario == Scenario::Mixed && n.is_multiple_of(2));
    let cpu = matches!(scenario, Scenario::Cpu) || (scenario == Scenario::Mixed && !n.is_multiple_of(2));
    if sleep {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    if scenario == Scenario::Io {
        tokio::time::sleep(IO_WAIT).await;
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

/// A field of /proc/self/status in KiB (`VmRSS`, `VmHWM`; Linux), 0 when unreadable.
fn status_kib(field: &str) -> u64 {
    proc_status_kib("self", field)
}

/// A field of /proc/PID/status in KiB, 0 when unreadable.
fn proc_status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Microseconds since the epoch.
fn epoch_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

static SEEN: Mutex<Option<HashSet<u64>>> = Mutex::new(None);
static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Runs of measured messages (numbered below `--messages`; backlog rows are numbered above).
static MEASURED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static MEASURED_BELOW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);
static STARTED: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Instant>>> = Mutex::new(None);
/// Steady-state samples: (message number, ms from its send to its actor's start).
static STEADY: Mutex<Vec<(u64, f64)>> = Mutex::new(Vec::new());

/// Reports when it starts, for the latency samples.
#[troupe::actor(queue_name = "bench_latency")]
async fn ping() {
    if let Ok(tx) = STARTED.lock()
        && let Some(tx) = tx.as_ref()
    {
        let _ = tx.send(Instant::now());
    }
}

/// Records how long after it was sent (µs since the epoch) it started.
#[troupe::actor(queue_name = "bench_steady")]
async fn steady(n: u64, sent_us: u64) {
    record_pickup(n, sent_us);
}

/// A steady-state sample: message `n`, sent at `sent_us` (µs since the epoch), starts now.
fn record_pickup(n: u64, sent_us: u64) {
    #[allow(clippy::cast_precision_loss)]
    let ms = epoch_us().saturating_sub(sent_us) as f64 / 1000.0;
    if let Ok(mut samples) = STEADY.lock() {
        samples.push((n, ms));
    }
}

/// The actor of quiet queue `i` of `--fairness-backlog` (`quiet_0` on `bench_trickle_0`, ...):
/// records its pick-up latency as `steady` does. A worker consumes its actors' queues, so each
/// quiet queue has an actor of its own.
struct Quiet {
    name: String,
    queue: String,
}

impl Quiet {
    fn new(i: usize) -> Self {
        Self {
            name: format!("quiet_{i}"),
            queue: trickle_queue(i),
        }
    }
}

impl Actor for Quiet {
    type Args = (u64, u64);
    type Output = ();

    fn name(&self) -> &str {
        &self.name
    }

    fn options(&self) -> ActorOptions {
        let mut options = ActorOptions::default();
        options.queue_name.clone_from(&self.queue);
        options
    }

    async fn call(&self, (n, sent_us): (u64, u64)) -> Result<(), ActorError> {
        record_pickup(n, sent_us);
        Ok(())
    }
}

/// Runs the scenario's work and counts.
#[troupe::actor(queue_name = "bench")]
async fn noop(n: u64, payload: String) {
    std::hint::black_box(payload.len());
    work(n).await;
    RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if n < MEASURED_BELOW.load(std::sync::atomic::Ordering::Relaxed) {
        MEASURED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    if let Ok(mut seen) = SEEN.lock()
        && let Some(set) = seen.as_mut()
    {
        set.insert(n);
    }
}

/// A progress line on stderr: redrawn in place on a terminal, a line every few seconds
/// otherwise. Off with `--json`.
#[derive(Clone, Default)]
struct Progress {
    on: bool,
    state: Arc<Mutex<(String, u64, u64)>>,
}

impl Progress {
    fn new(on: bool) -> Self {
        let progress = Self {
            on,
            state: Arc::default(),
        };
        if on {
            let state = Arc::clone(&progress.state);
            tokio::spawn(async move {
                use std::io::IsTerminal;
                let tty = std::io::stderr().is_terminal();
                let every = if tty {
                    Duration::from_millis(200)
                } else {
                    Duration::from_secs(5)
                };
                loop {
                    tokio::time::sleep(every).await;
                    let Ok((phase, done, total)) = state.lock().map(|s| s.clone()) else {
                        return;
                    };
                    if phase.is_empty() || total == 0 {
                        continue;
                    }
                    let filled = usize::try_from(done.min(total) * 30 / total).unwrap_or(30);
                    let bar = format!("{}{}", "#".repeat(filled), ".".repeat(30 - filled));
                    if tty {
                        eprint!("\r{phase:>12} [{bar}] {done}/{total}   ");
                    } else {
                        eprintln!("{phase:>12} [{bar}] {done}/{total}");
                    }
                }
            });
        }
        progress
    }

    fn phase(&self, name: &str, total: u64) {
        if !self.on {
            return;
        }
        if let Ok(mut s) = self.state.lock() {
            if !s.0.is_empty() {
                eprintln!("\r{:>12} done{}", s.0, " ".repeat(40));
            }
            *s = (name.to_owned(), 0, total);
        }
    }

    fn set(&self, done: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = done;
        }
    }

    fn finish(&self) {
        self.phase("", 0);
    }
}

/// Prints a report's JSON (exit 0) or the error (exit 2).
fn print_report(outcome: Result<serde_json::Value, Box<dyn std::error::Error>>) -> ExitCode {
    match outcome {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let _ = SCENARIO.set(args.scenario);
    if args.dashboard_backlog > 0 {
        return print_report(dashboard_pages(&args).await);
    }
    if args.fairness_backlog > 0 && !args.worker_only {
        return print_report(fairness(&args).await);
    }
    if args.memory_backlog > 0 && !args.worker_only {
        return print_report(memory_backlog(&args).await);
    }
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
                    println!("{k:>32}: {v}");
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

/// A worker with the benchmark's settings: `--concurrency`, `--prefetch` when given, and a
/// short fetch time-out.
fn tuned(builder: troupe::worker::WorkerBuilder, args: &Args) -> troupe::worker::WorkerBuilder {
    let builder = builder
        .concurrency(args.concurrency)
        .fetch_timeout(Duration::from_millis(100));
    match args.prefetch {
        Some(n) => builder.prefetch(n),
        None => builder,
    }
}

/// A worker process for `--processes`: runs until SIGTERM, then prints the numbers it ran and
/// its resident memory (idle by then) and peak.
async fn worker_only(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    if !args.lean_worker
        && let Ok(mut seen) = SEEN.lock()
    {
        *seen = Some(HashSet::new());
    }
    let broker = troupe::connect(&args.broker_url).await?;
    let state = state_backend(args).await?;
    let app = (0..args.trickle_queues)
        .fold(builder(broker, state.as_ref(), args).actor(Noop), |b, i| {
            b.actor(Quiet::new(i))
        })
        .build()?;
    let queues = std::iter::once("bench".to_owned()).chain((0..args.trickle_queues).map(trickle_queue));
    let worker = if args.lean_worker {
        Worker::builder(app).queues(queues).start().await?
    } else {
        tuned(Worker::builder(app), args).queues(["bench"]).start().await?
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    let rss_idle = status_kib("VmRSS");
    worker.stop().await;
    let seen: Vec<u64> = SEEN
        .lock()
        .ok()
        .and_then(|s| s.as_ref().map(|s| s.iter().copied().collect()))
        .unwrap_or_default();
    let runs = RUNS.load(std::sync::atomic::Ordering::Relaxed);
    let steady = STEADY.lock().map(|s| s.clone()).unwrap_or_default();
    println!(
        "{}",
        json!({"runs": runs, "seen": seen, "rss_idle_kib": rss_idle, "rss_peak_kib": status_kib("VmHWM"), "steady": steady})
    );
    Ok(())
}

/// Deletes a SQLite broker's files, so each run starts from an empty database.
fn fresh_sqlite(url: &str) {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or(path);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
}

/// Puts `count` no-op messages of `--payload-bytes` in the `bench` queue with `enqueue_many`,
/// `--batch-size` at a time, each delayed by `delay`; returns the seconds it took.
async fn fill(
    app: &App,
    args: &Args,
    count: u64,
    delay: Option<Duration>,
    progress: &Progress,
) -> Result<f64, Box<dyn std::error::Error>> {
    let payload = serde_json::Value::String("x".repeat(args.payload_bytes));
    progress.phase("enqueue", count);
    let started = Instant::now();
    let mut n = 0;
    while n < count {
        let end = (n + args.batch_size.max(1) as u64).min(count);
        let batch = (n..end)
            .map(|i| {
                let message =
                    troupe::Message::new("bench", "noop", vec![json!(i), payload.clone()], serde_json::Map::new());
                (message, delay)
            })
            .collect();
        app.enqueue_many(batch).await?;
        n = end;
        progress.set(n);
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Megabytes from KiB, to one decimal.
#[allow(clippy::cast_precision_loss)]
fn mb(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

/// `--fairness-backlog`: the pick-up latency of nine quiet queues while one queue's backlog
/// drains, in a worker process at the default settings.
async fn fairness(args: &Args) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    fresh_sqlite(&args.broker_url);
    let progress = Progress::new(!args.json);
    let broker = troupe::connect(&args.broker_url).await?;
    let app = (0..TRICKLE_QUEUES)
        .fold(App::builder(Arc::clone(&broker)).actor(Noop), |b, i| {
            b.actor(Quiet::new(i))
        })
        .build()?;
    let quiet: Vec<String> = (0..TRICKLE_QUEUES).map(trickle_queue).collect();
    for queue in std::iter::once("bench").chain(quiet.iter().map(String::as_str)) {
        app.declare_queue(queue).await?;
        broker.purge(queue).await?;
    }
    let fill_secs = fill(&app, args, args.fairness_backlog, None, &progress).await?;

    progress.phase("worker", 0);
    let (mut child, worker) = if args.fairness_in_process {
        let queues = std::iter::once("bench".to_owned()).chain(quiet.iter().cloned());
        (None, Some(Worker::builder(app.clone()).queues(queues).start().await?))
    } else {
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["--worker-only", "--lean-worker", "--broker-url", &args.broker_url])
            .args(["--trickle-queues", &TRICKLE_QUEUES.to_string()])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        (Some(child), None)
    };
    // The trickle starts once the worker has started on the backlog.
    let waited = Instant::now();
    let backlog_at_start = loop {
        let pending = broker.stats("bench").await?.pending();
        if pending < args.fairness_backlog {
            break pending;
        }
        if let Some(status) = child
            .as_mut()
            .map(tokio::process::Child::try_wait)
            .transpose()?
            .flatten()
        {
            return Err(format!("the worker process exited with {status}").into());
        }
        if waited.elapsed() > Duration::from_secs(60) {
            return Err("the worker took nothing from the backlog within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let total = (args.trickle_rate as f64 * args.fairness_secs).round() as u64;
    progress.phase("trickle", total);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // How long each send took to return (durable): part of its pick-up latency.
    let mut sends = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for n in 0..total {
        #[allow(clippy::cast_precision_loss)]
        let offset = Duration::from_secs_f64(n as f64 / args.trickle_rate.max(1) as f64);
        tokio::time::sleep_until((started + offset).into()).await;
        let app = app.clone();
        let i = usize::try_from(n).unwrap_or(0) % quiet.len();
        let (queue, actor) = (quiet[i].clone(), format!("quiet_{i}"));
        tasks.spawn(async move {
            let sent = Instant::now();
            let message = troupe::Message::new(queue, actor, vec![json!(n), json!(epoch_us())], serde_json::Map::new());
            app.enqueue(message, None).await?;
            Ok::<_, troupe::Error>(sent.elapsed().as_secs_f64() * 1000.0)
        });
        while let Some(done) = tasks.try_join_next() {
            sends.push(done??);
        }
        progress.set(n);
    }
    while let Some(done) = tasks.join_next().await {
        sends.push(done??);
    }
    sends.sort_by(f64::total_cmp);
    // Until the quiet queues are empty (their last messages ran).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut pending = 0;
        for queue in &quiet {
            pending += broker.stats(queue).await?.pending();
        }
        if pending == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let trickle_secs = started.elapsed().as_secs_f64();
    let backlog_left = broker.stats("bench").await?.pending();
    // Let a duplicate, if any, show up before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let samples: Vec<(u64, f64)> = match (child, worker) {
        (Some(child), _) => {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-s", "TERM", &pid.to_string()])
                    .status();
            }
            let out = child.wait_with_output().await?;
            let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            report["steady"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| Some((s.get(0)?.as_u64()?, s.get(1)?.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default()
        }
        (None, Some(worker)) => {
            worker.stop().await;
            STEADY.lock().map(|s| s.clone()).unwrap_or_default()
        }
        (None, None) => Vec::new(),
    };
    progress.finish();
    for queue in std::iter::once("bench").chain(quiet.iter().map(String::as_str)) {
        broker.purge(queue).await?;
    }
    let distinct: HashSet<u64> = samples.iter().map(|(n, _)| *n).collect();
    let mut latencies: Vec<f64> = samples.iter().map(|(_, ms)| *ms).collect();
    latencies.sort_by(f64::total_cmp);
    Ok(json!({
        "broker": broker.backend(),
        "date": date(),
        "backlog": args.fairness_backlog,
        "fill_secs": (fill_secs * 10.0).round() / 10.0,
        "quiet_queues": TRICKLE_QUEUES,
        "trickle_per_sec": args.trickle_rate,
        "trickle_secs": (trickle_secs * 10.0).round() / 10.0,
        "trickle_samples": latencies.len(),
        "trickle_ms_p50": quantile(&latencies, 0.5),
        "trickle_ms_p90": quantile(&latencies, 0.9),
        "trickle_ms_p99": quantile(&latencies, 0.99),
        "trickle_ms_max": quantile(&latencies, 1.0),
        "trickle_send_ms_p50": quantile(&sends, 0.5),
        "trickle_send_ms_p99": quantile(&sends, 0.99),
        "backlog_at_start": backlog_at_start,
        "backlog_left": backlog_left,
        "backlog_per_sec": per_sec(backlog_at_start.saturating_sub(backlog_left), trickle_secs),
        "lost": total.saturating_sub(distinct.len() as u64),
        "duplicates": (samples.len() - distinct.len()) as u64,
        "worker": if args.fairness_in_process { "in the benchmark process" } else { "a process of its own" },
        "settings": "worker defaults (concurrency 8 per core, adaptive prefetch window per queue)",
    }))
}

/// `--memory-backlog`: a worker process's resident memory with a backlog waiting.
async fn memory_backlog(args: &Args) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    fresh_sqlite(&args.broker_url);
    let progress = Progress::new(!args.json);
    let broker = troupe::connect(&args.broker_url).await?;
    let app = App::builder(Arc::clone(&broker)).actor(Noop).build()?;
    app.declare_queue("bench").await?;
    broker.purge("bench").await?;
    let delay = (args.memory_delay_secs > 0).then(|| Duration::from_secs(args.memory_delay_secs));
    let fill_secs = fill(&app, args, args.memory_backlog, delay, &progress).await?;
    // The producer's peak: enqueueing a deep backlog must not grow it without bound.
    let producer_peak_kib = status_kib("VmHWM");

    progress.phase("worker", 0);
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--worker-only", "--lean-worker", "--broker-url", &args.broker_url])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().ok_or("the worker process exited at once")?.to_string();
    let started = Instant::now();
    let watch = Duration::from_secs_f64(args.memory_secs);
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut drained_secs = None;
    // When the worker was first seen taking messages, and what was pending then: the drain
    // rate counts from there, leaving out the process's start.
    let mut first_taken: Option<(f64, u64)> = None;
    let poll = Duration::from_millis(if delay.is_none() { 20 } else { 250 });
    loop {
        tokio::time::sleep(poll).await;
        if let Some(status) = child.try_wait()? {
            return Err(format!("the worker process exited with {status}").into());
        }
        let rss = proc_status_kib(&pid, "VmRSS");
        samples.push((started.elapsed().as_secs_f64(), rss));
        if delay.is_none() {
            let pending = broker.stats("bench").await?.pending();
            progress.set(args.memory_backlog.saturating_sub(pending));
            if first_taken.is_none() && pending < args.memory_backlog {
                first_taken = Some((started.elapsed().as_secs_f64(), pending));
            }
            if pending == 0 {
                drained_secs = Some(started.elapsed().as_secs_f64());
                break;
            }
            if started.elapsed() > watch {
                break;
            }
        } else if started.elapsed() > watch {
            break;
        }
    }
    let peak_kib = proc_status_kib(&pid, "VmHWM");
    let _ = std::process::Command::new("kill").args(["-s", "TERM", &pid]).status();
    let out = child.wait_with_output().await?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    progress.finish();
    broker.purge("bench").await?;

    // The largest sample in each tenth of the watch: flat when memory is bounded.
    let slices: Vec<f64> = (0..10)
        .map(|i| {
            let lo = samples.len() * i / 10;
            let hi = (samples.len() * (i + 1) / 10).max(lo + 1).min(samples.len());
            samples
                .get(lo..hi)
                .and_then(|s| s.iter().map(|(_, k)| *k).max())
                .map_or(0.0, mb)
        })
        .collect();
    Ok(json!({
        "broker": broker.backend(),
        "messages": args.memory_backlog,
        "payload_bytes": args.payload_bytes,
        "delay_secs": args.memory_delay_secs,
        "fill_secs": (fill_secs * 10.0).round() / 10.0,
        "fill_per_sec": (args.memory_backlog as f64 / fill_secs).round(),
        "worker_runs": report["runs"],
        "drained_secs": drained_secs.map(|s| (s * 10.0).round() / 10.0),
        "drain_per_sec": match (first_taken, drained_secs) {
            (Some((at, pending)), Some(end)) if end > at => per_sec(pending, end - at),
            _ => json!(null),
        },
        "producer_rss_peak_mb": mb(producer_peak_kib),
        "worker_rss_peak_mb": mb(peak_kib.max(samples.iter().map(|(_, k)| *k).max().unwrap_or(0))),
        "worker_rss_end_mb": mb(samples.last().map_or(0, |(_, k)| *k)),
        "worker_rss_by_tenth_mb": slices,
        "settings": "worker defaults (concurrency 8 per core, adaptive prefetch window, delay prefetch min(1000 x concurrency, 8000))",
    }))
}

/// Redis only: script calls and server time so far (`INFO commandstats`, EVAL and EVALSHA).
async fn redis_script_stats(url: &str) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    use troupe::redis::redis;
    let url = url.split('?').next().unwrap_or(url);
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await?;
    let (mut calls, mut usec) = (0, 0);
    for line in info.lines() {
        let Some(fields) = line
            .strip_prefix("cmdstat_evalsha:")
            .or_else(|| line.strip_prefix("cmdstat_eval:"))
        else {
            continue;
        };
        for field in fields.split(',') {
            match field.split_once('=') {
                Some(("calls", v)) => calls += v.parse::<u64>().unwrap_or(0),
                Some(("usec", v)) => usec += v.parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
    }
    Ok((calls, usec))
}

/// The `p` quantile (0..=1) of sorted samples, rounded to 0.01.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    (sorted[i.min(sorted.len() - 1)] * 100.0).round() / 100.0
}

/// Sends `--rate` messages/s for `--steady-secs` to the steady actor, each on a task of its own
/// so a slow round trip never delays the schedule, and waits until all ran. Returns the
/// latencies (sorted) and how many of the messages did not run exactly once.
async fn steady_state(
    app: &App,
    args: &Args,
    progress: &Progress,
) -> Result<(Vec<f64>, u64, u64), Box<dyn std::error::Error>> {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let total = (args.rate as f64 * args.steady_secs).round() as u64;
    if total == 0 || args.rate == 0 {
        return Ok((Vec::new(), 0, 0));
    }
    if let Ok(mut samples) = STEADY.lock() {
        samples.clear();
    }
    progress.phase("steady", total);
    let lead = Duration::from_millis(50);
    let start = Instant::now() + lead;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..total {
        #[allow(clippy::cast_precision_loss)]
        let offset = Duration::from_secs_f64(n as f64 / args.rate as f64);
        tokio::time::sleep_until((start + offset).into()).await;
        let app = app.clone();
        // Timed from the moment of sending: the schedule only sets the offered load (its timer
        // fires up to a millisecond late, which is the benchmark's lag, not Troupe's).
        tasks.spawn(async move { Steady.send(&app, n, epoch_us()).await.map(|_| ()) });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
        progress.set(n);
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = STEADY.lock().map(|s| s.len() as u64).unwrap_or(0);
        progress.set(got);
        if got >= total || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let a duplicate, if any, show up before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let samples = STEADY.lock().map(|s| s.clone()).unwrap_or_default();
    let distinct: HashSet<u64> = samples.iter().map(|(n, _)| *n).collect();
    let lost = total.saturating_sub(distinct.len() as u64);
    let duplicates = (samples.len() - distinct.len()) as u64;
    let mut latencies: Vec<f64> = samples.into_iter().map(|(_, ms)| ms).collect();
    latencies.sort_by(f64::total_cmp);
    Ok((latencies, lost, duplicates))
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
    fresh_sqlite(&args.broker_url);
    if let Ok(mut seen) = SEEN.lock() {
        *seen = Some(HashSet::new());
    }
    if args.backlog > 0 && args.processes > 0 {
        return Err("--backlog runs the worker in the benchmark process; leave out --processes".into());
    }
    MEASURED_BELOW.store(args.messages, std::sync::atomic::Ordering::Relaxed);
    let progress = Progress::new(!args.json);
    let broker = troupe::connect(&args.broker_url).await?;
    let state = state_backend(args).await?;
    let app = builder(Arc::clone(&broker), state.as_ref(), args)
        .actor(Noop)
        .actor(Ping)
        .actor(Steady)
        .build()?;
    for queue in ["bench", "bench_latency", "bench_steady"] {
        app.declare_queue(queue).await?;
    }

    // Enqueue: the first half one at a time, the second half in batches.
    let payload = "x".repeat(args.payload_bytes);
    let one_by_one = args.messages / 2;
    progress.phase("enqueue", args.messages);
    let started = Instant::now();
    let senders = args.senders.max(1);
    if senders == 1 {
        for n in 0..one_by_one {
            Noop.send(&app, n, payload.clone()).await?;
            if n % 256 == 0 {
                progress.set(n);
            }
        }
    } else {
        // Sender `i` sends the numbers i, i + senders, ... one at a time.
        let tasks: Vec<_> = (0..senders)
            .map(|i| {
                let (app, payload) = (app.clone(), payload.clone());
                tokio::spawn(async move {
                    let mut n = i;
                    while n < one_by_one {
                        Noop.send(&app, n, payload.clone()).await?;
                        n += senders;
                    }
                    Ok::<_, troupe::Error>(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        progress.set(one_by_one);
    }
    let enqueue_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut n = one_by_one;
    while n < args.messages {
        let end = (n + args.batch_size.max(1) as u64).min(args.messages);
        Noop.send_many(&app, (n..end).map(|i| (i, payload.clone()))).await?;
        n = end;
        progress.set(n);
    }
    let batched_secs = started.elapsed().as_secs_f64();

    let backlog_secs = if args.backlog > 0 {
        progress.phase("backlog", 0);
        let at = Instant::now();
        backlog(&args.broker_url, args.messages, args.backlog).await?;
        at.elapsed().as_secs_f64()
    } else {
        0.0
    };

    // Burn-down.
    let redis = broker.backend() == "redis";
    let script_stats_before = if redis {
        Some(redis_script_stats(&args.broker_url).await?)
    } else {
        None
    };
    progress.phase("drain", args.messages);
    let started = Instant::now();
    let mut children = Vec::new();
    for _ in 0..args.processes {
        children.push(
            tokio::process::Command::new(std::env::current_exe()?)
                .args(["--worker-only", "--broker-url", &args.broker_url, "--concurrency"])
                .arg(args.concurrency.to_string())
                .args(
                    args.prefetch
                        .iter()
                        .flat_map(|n| ["--prefetch".to_owned(), n.to_string()]),
                )
                .args(if args.track_tasks {
                    vec!["--track-tasks"]
                } else {
                    Vec::new()
                })
                .args(args.state_url.iter().flat_map(|u| ["--state-url", u.as_str()]))
                .arg("--scenario")
                .arg(format!("{:?}", args.scenario).to_lowercase())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    let worker = if args.processes == 0 {
        Some(tuned(Worker::builder(app.clone()), args).start().await?)
    } else {
        None
    };
    // In-process runs count what the actor ran (cheap, exact); with worker processes the
    // broker's counts tell, polled less often so the polling does not load the server it
    // measures.
    loop {
        let done = if args.processes == 0 {
            MEASURED.load(std::sync::atomic::Ordering::Relaxed)
        } else {
            args.messages.saturating_sub(broker.stats("bench").await?.pending())
        };
        progress.set(done);
        if done >= args.messages {
            break;
        }
        let poll = if args.processes == 0 { 2 } else { 20 };
        tokio::time::sleep(Duration::from_millis(poll)).await;
    }
    let drain_secs = started.elapsed().as_secs_f64();
    let script_stats = match script_stats_before {
        Some((calls, usec)) => {
            let (calls_after, usec_after) = redis_script_stats(&args.broker_url).await?;
            Some((calls_after.saturating_sub(calls), usec_after.saturating_sub(usec)))
        }
        None => None,
    };
    for child in &children {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-s", "TERM", &pid.to_string()])
                .status();
        }
    }
    let (mut child_rss_idle, mut child_rss_peak) = (0, 0);
    for child in children {
        let out = child.wait_with_output().await?;
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        RUNS.fetch_add(
            report["runs"].as_u64().unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
        child_rss_idle = child_rss_idle.max(report["rss_idle_kib"].as_u64().unwrap_or(0));
        child_rss_peak = child_rss_peak.max(report["rss_peak_kib"].as_u64().unwrap_or(0));
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
            tuned(Worker::builder(app.clone()), args)
                .queues(["bench_latency", "bench_steady"])
                .start()
                .await?
        }
    };
    if args.backlog > 0 {
        broker.purge("bench").await?;
    }

    // Steady state at the offered load.
    let (steady, steady_lost, steady_duplicates) = steady_state(&app, args, &progress).await?;

    // Idle pick-up.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    if let Ok(mut started) = STARTED.lock() {
        *started = Some(tx);
    }
    progress.phase("idle pick-up", args.latency_samples as u64);
    let mut latencies = Vec::with_capacity(args.latency_samples);
    for i in 0..args.latency_samples {
        // Let the worker go idle first.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = Instant::now();
        Ping.send(&app).await?;
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(at)) => latencies.push(at.duration_since(sent).as_secs_f64() * 1000.0),
            _ => return Err("a latency probe was not picked up within 10 s".into()),
        }
        progress.set(i as u64 + 1);
    }
    progress.finish();
    // The worker is idle now. In-process runs measure the benchmark process, which also holds
    // the producer's bookkeeping; with --processes, the largest worker process.
    let (rss_idle, rss_peak, rss_of) = if args.processes > 0 {
        (child_rss_idle, child_rss_peak, "largest worker process")
    } else {
        (
            status_kib("VmRSS"),
            status_kib("VmHWM"),
            "benchmark process (worker and producer)",
        )
    };
    worker.stop().await;
    latencies.sort_by(f64::total_cmp);
    let queries = match &state {
        Some(state) if args.task_records > 0 => task_queries(state, args, &progress).await?,
        _ => json!(null),
    };
    let limiters = match &state {
        Some(state) if args.limiter_ops > 0 => limiter_rates(state, args.limiter_ops, &progress).await?,
        _ => json!(null),
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
    let rate = |count: u64, secs: f64| -> serde_json::Value {
        if count == 0 || secs <= 0.0 {
            serde_json::Value::Null
        } else {
            #[allow(clippy::cast_precision_loss)]
            let per_sec = (count as f64 / secs).round();
            json!(per_sec)
        }
    };
    let (script_calls, script_usec) = script_stats.map_or((json!(null), json!(null)), |(calls, usec)| {
        #[allow(clippy::cast_precision_loss)]
        let per = |x: u64| json!(((x as f64 / args.messages.max(1) as f64) * 1000.0).round() / 1000.0);
        (per(calls), per(usec))
    });
    Ok(json!({
        "broker": broker.backend(),
        "date": date(),
        "messages": args.messages,
        "concurrency": args.concurrency,
        "processes": args.processes,
        "scenario": args.scenario,
        "payload_bytes": args.payload_bytes,
        "backlog": args.backlog,
        "backlog_insert_secs": (backlog_secs * 10.0).round() / 10.0,
        "senders": senders,
        "enqueue_per_sec": rate(one_by_one, enqueue_secs),
        "enqueue_batched_per_sec": rate(args.messages - one_by_one, batched_secs),
        "batch_size": args.batch_size,
        "process_per_sec": rate(args.messages, drain_secs),
        "latency_offered_per_sec": args.rate,
        "latency_samples": steady.len(),
        "latency_ms_p50": quantile(&steady, 0.5),
        "latency_ms_p90": quantile(&steady, 0.9),
        "latency_ms_p99": quantile(&steady, 0.99),
        "latency_ms_max": quantile(&steady, 1.0),
        "idle_pickup_ms_p50": quantile(&latencies, 0.5),
        "idle_pickup_ms_p99": quantile(&latencies, 0.99),
        "idle_pickup_ms_max": quantile(&latencies, 1.0),
        "worker_rss_idle_kib": rss_idle,
        "worker_rss_peak_kib": rss_peak,
        "rss_measured_in": rss_of,
        "redis_script_calls_per_message": script_calls,
        "redis_server_usec_per_message": script_usec,
        "track_tasks": args.track_tasks,
        "cancellation": args.track_tasks.then_some(args.cancellation),
        "task_queries": queries,
        "limiters": limiters,
        "lost": args.messages.saturating_sub(distinct) + steady_lost,
        "duplicates": runs.saturating_sub(distinct) + steady_duplicates,
    }))
}

/// Tasks of the contended limiter figures.
const CONTENDERS: u64 = 16;

/// Operations per second, rounded.
#[allow(clippy::cast_precision_loss)]
fn per_sec(count: u64, secs: f64) -> serde_json::Value {
    if secs <= 0.0 {
        json!(null)
    } else {
        json!((count as f64 / secs).round())
    }
}

/// Times `ops` operations of each limiter on `state`: a `ConcurrentRateLimiter` acquire and
/// release one after another, then from 16 tasks at once on a limit of 4 (attempts, and how
/// many took a slot); `BucketRateLimiter` and `WindowRateLimiter` acquires (limits too high to
/// be reached) alone and from 16 tasks.
async fn limiter_rates(
    state: &Arc<dyn StateBackend>,
    ops: u64,
    progress: &Progress,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let key = |what: &str| format!("troupe-bench-{what}-{}", now_ms());
    progress.phase("limiters", ops * 6);
    let mutex = ConcurrentRateLimiter::new(Arc::clone(state), key("mutex"), 1);
    let (mut acquire, mut release) = (Duration::ZERO, Duration::ZERO);
    for i in 0..ops {
        let t = Instant::now();
        let slot = mutex.try_acquire().await?.ok_or("the bench's own mutex was taken")?;
        acquire += t.elapsed();
        let t = Instant::now();
        slot.release().await?;
        release += t.elapsed();
        progress.set(i + 1);
    }
    let shared = ConcurrentRateLimiter::new(Arc::clone(state), key("shared"), 4);
    let started = Instant::now();
    let taken = std::sync::atomic::AtomicU64::new(0);
    let each = ops.div_ceil(CONTENDERS);
    let contend = (0..CONTENDERS).map(|_| async {
        for _ in 0..each {
            if let Some(slot) = shared.try_acquire().await? {
                taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                slot.release().await?;
            }
        }
        Ok::<_, troupe::Error>(())
    });
    for r in futures::future::join_all(contend).await {
        r?;
    }
    let contended_secs = started.elapsed().as_secs_f64();
    progress.set(ops * 2);
    let mut figures = serde_json::Map::new();
    figures.insert("ops".into(), json!(ops));
    figures.insert(
        "concurrent".into(),
        json!({
            "acquire_per_sec": per_sec(ops, acquire.as_secs_f64()),
            "release_per_sec": per_sec(ops, release.as_secs_f64()),
            "contended_attempts_per_sec": per_sec(each * CONTENDERS, contended_secs),
            "contended_taken_per_sec": per_sec(taken.into_inner(), contended_secs),
        }),
    );
    let bucket = BucketRateLimiter::new(Arc::clone(state), key("bucket"), u32::MAX, Duration::from_secs(60));
    let window = WindowRateLimiter::new(Arc::clone(state), key("window"), u32::MAX, Duration::from_secs(1));
    let bucket_alone = time_acquires(ops, 1, || bucket.try_acquire()).await?;
    let bucket_contended = time_acquires(ops, CONTENDERS, || bucket.try_acquire()).await?;
    progress.set(ops * 4);
    let window_alone = time_acquires(ops, 1, || window.try_acquire()).await?;
    let window_contended = time_acquires(ops, CONTENDERS, || window.try_acquire()).await?;
    progress.set(ops * 6);
    progress.finish();
    figures.insert(
        "bucket".into(),
        json!({"acquire_per_sec": bucket_alone, "contended_acquire_per_sec": bucket_contended}),
    );
    figures.insert(
        "window".into(),
        json!({"acquire_per_sec": window_alone, "contended_acquire_per_sec": window_contended}),
    );
    Ok(serde_json::Value::Object(figures))
}

/// Runs `ops` acquires (every one must get room) from `tasks` tasks at once; their rate.
async fn time_acquires<F, Fut>(
    ops: u64,
    tasks: u64,
    acquire: F,
) -> Result<serde_json::Value, Box<dyn std::error::Error>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = troupe::Result<bool>>,
{
    let each = ops.div_ceil(tasks);
    let started = Instant::now();
    let runs = (0..tasks).map(|_| async {
        for _ in 0..each {
            if !acquire().await? {
                return Err(troupe::Error::Config("a bench limiter reached its limit".into()));
            }
        }
        Ok(())
    });
    for r in futures::future::join_all(runs).await {
        r?;
    }
    Ok(per_sec(each * tasks, started.elapsed().as_secs_f64()))
}

/// Actors and queues the seeded task records spread over.
const SEED_ACTORS: u64 = 20;
const SEED_QUEUES: u64 = 5;

/// Writes `--task-records` records (the 8 statuses in turn, 20 actors and 5 queues spread over
/// them independently, so a status and an actor select 1/160 of the records; one a millisecond
/// apart), times the queries a dashboard makes (each `--query-runs` times), then deletes them.
async fn task_queries(
    state: &Arc<dyn StateBackend>,
    args: &Args,
    progress: &Progress,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let store = state.tasks().ok_or("this state backend keeps no task states")?;
    let run = format!("{:x}", epoch_us());
    let first = now_ms().saturating_sub(args.task_records);
    let retention = Duration::from_secs(3600);
    progress.phase("task records", args.task_records);
    let started = Instant::now();
    let mut ids = Vec::with_capacity(usize::try_from(args.task_records).unwrap_or(0));
    let mut n = 0;
    while n < args.task_records {
        let end = (n + 1000).min(args.task_records);
        let batch: Vec<troupe::tasks::TaskUpdate> = (n..end)
            .map(|i| {
                let status = TaskStatus::ALL[usize::try_from(i % 8).unwrap_or(0)];
                let mut u = troupe::tasks::TaskUpdate::new(
                    format!("seed-{run}-{i}"),
                    format!("seed_{run}_actor_{}", (i / 8) % SEED_ACTORS),
                    format!("seed_{run}_q_{}", (i / 3) % SEED_QUEUES),
                    status,
                    if status.is_final() { 2 } else { 0 },
                );
                u.at = first + i;
                u
            })
            .collect();
        store.record_many(&batch, retention).await?;
        ids.extend(batch.into_iter().map(|u| u.message_id));
        n = end;
        progress.set(n);
    }
    let insert_secs = started.elapsed().as_secs_f64();
    // PostgreSQL plans by table statistics, which autovacuum's ANALYZE keeps current as a table
    // grows; a million rows written in a minute would be planned as the empty table it was.
    let state_url = args.state_url.as_deref().unwrap_or(&args.broker_url);
    if state_url.starts_with("postgres") {
        use troupe::postgres::sqlx;
        let options = troupe::postgres::PostgresOptions::from_url(state_url)?;
        let pool = sqlx::PgPool::connect(&options.url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {}.tasks", options.schema)))
            .execute(&pool)
            .await?;
    }
    let actor = format!("seed_{run}_actor_7");
    let queue = format!("seed_{run}_q_3");
    let shapes: Vec<(&str, TaskQuery)> = vec![
        (
            "status_and_actor",
            TaskQuery::new(TaskFilter::new().status(TaskStatus::Failed).actor(actor.clone())),
        ),
        ("status", TaskQuery::new(TaskFilter::new().status(TaskStatus::Failed))),
        ("actor", TaskQuery::new(TaskFilter::new().actor(actor.clone()))),
        (
            "status_and_queue",
            TaskQuery::new(TaskFilter::new().status(TaskStatus::Running).queue(queue.clone())),
        ),
        ("all", TaskQuery::new(TaskFilter::new())),
    ];
    let mut figures = serde_json::Map::new();
    progress.phase("task queries", shapes.len() as u64);
    for (i, (name, query)) in shapes.into_iter().enumerate() {
        let mut times = Vec::with_capacity(args.query_runs);
        let mut query = query;
        let mut page_sizes = Vec::new();
        for run in 0..args.query_runs.max(1) {
            let at = Instant::now();
            let page = store.tasks(&query).await?;
            times.push(at.elapsed().as_secs_f64() * 1000.0);
            page_sizes.push(page.tasks.len());
            // Every other run fetches the next page, as a user paging through would.
            query = match (run % 2, page.next) {
                (0, Some(next)) => query.after(next),
                _ => TaskQuery::new(query.filter.clone()),
            };
        }
        times.sort_by(f64::total_cmp);
        if args.task_records >= 1000 && page_sizes.first().is_none_or(|n| *n == 0) {
            return Err(format!(
                "the task query {name} found nothing among {} records",
                args.task_records
            )
            .into());
        }
        figures.insert(
            format!("page_{name}_ms"),
            json!({"p50": quantile(&times, 0.5), "max": quantile(&times, 1.0), "rows": page_sizes.first()}),
        );
        progress.set(i as u64 + 1);
    }
    let mut times = Vec::new();
    for _ in 0..args.query_runs.max(1) {
        let at = Instant::now();
        store.task_counts(&TaskFilter::new().actor(actor.clone())).await?;
        times.push(at.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    figures.insert(
        "counts_of_actor_ms".into(),
        json!({"p50": quantile(&times, 0.5), "max": quantile(&times, 1.0)}),
    );
    progress.phase("cleanup", args.task_records);
    let mut deleted = 0;
    let ids = if args.keep_task_records { Vec::new() } else { ids };
    for chunk in ids.chunks(256) {
        futures::future::try_join_all(chunk.iter().map(|id| store.delete_task(id))).await?;
        deleted += chunk.len() as u64;
        progress.set(deleted);
    }
    progress.finish();
    figures.insert("records".into(), json!(args.task_records));
    figures.insert("insert_per_sec".into(), {
        #[allow(clippy::cast_precision_loss)]
        let rate = (args.task_records as f64 / insert_secs.max(1e-9)).round();
        json!(rate)
    });
    Ok(serde_json::Value::Object(figures))
}

/// Today's date (UTC), for the report.
fn date() -> String {
    let days = epoch_us() / 86_400_000_000;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// `--dashboard-backlog N`: N messages in one queue and N task records, then the dashboard's
/// pages timed over HTTP (one request at a time, a fresh connection each, as a browser's first
/// load).
async fn dashboard_pages(args: &Args) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let n = args.dashboard_backlog;
    let progress = Progress::new(!args.json);
    let broker = troupe::connect(&args.broker_url).await?;
    let state_url = args.state_url.clone().unwrap_or_else(|| args.broker_url.clone());
    let state = troupe::connect_state(&state_url).await?;
    let store = state.tasks().ok_or("this state backend keeps no task states")?;
    let queue = "dashboard_bench";
    broker.declare_queue(queue).await?;
    let have = broker.stats(queue).await?;
    let backlog = n.saturating_sub(have.ready + have.delayed);
    progress.phase("messages", backlog);
    let started = Instant::now();
    let mut sent = 0;
    while sent < backlog {
        let end = (sent + 5000).min(backlog);
        let batch: Vec<(Message, Option<Duration>)> = (sent..end)
            .map(|i| {
                let message = Message::new(
                    queue,
                    format!("actor_{}", i % 20),
                    vec![json!(i), json!("some text")],
                    Default::default(),
                );
                let delay = i.is_multiple_of(10).then(|| Duration::from_secs(86_400));
                (message, delay)
            })
            .collect();
        broker.enqueue_many(batch).await?;
        sent = end;
        progress.set(sent);
    }
    let enqueue_secs = started.elapsed().as_secs_f64();
    let counts = store.task_counts(&troupe::TaskFilter::new()).await?;
    let records = n.saturating_sub(counts.total());
    progress.phase("task records", records);
    let first = now_ms().saturating_sub(records);
    let run = format!("{:x}", epoch_us());
    let mut written = 0;
    while written < records {
        let end = (written + 1000).min(records);
        let batch: Vec<troupe::tasks::TaskUpdate> = (written..end)
            .map(|i| {
                let status = TaskStatus::ALL[usize::try_from(i % 8).unwrap_or(0)];
                let mut u = troupe::tasks::TaskUpdate::new(
                    format!("dash-{run}-{i}"),
                    format!("actor_{}", i % 20),
                    queue.to_owned(),
                    status,
                    if status.is_final() { 2 } else { 0 },
                );
                u.at = first + i;
                u
            })
            .collect();
        store.record_many(&batch, Duration::from_secs(7 * 86_400)).await?;
        written = end;
        progress.set(written);
    }
    progress.finish();
    if state_url.starts_with("postgres") {
        use troupe::postgres::sqlx;
        let options = troupe::postgres::PostgresOptions::from_url(&state_url)?;
        let pool = sqlx::PgPool::connect(&options.url).await?;
        for table in ["tasks", "jobs"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {}.{table}", options.schema)))
                .execute(&pool)
                .await?;
        }
    }
    let app = App::builder(Arc::clone(&broker)).state(Arc::clone(&state)).build()?;
    let server = troupe_dashboard::Dashboard::new(app)
        .start("127.0.0.1:0".parse()?)
        .await?;
    let addr = server.local_addr();
    let mut pages = serde_json::Map::new();
    for (name, path) in [
        ("overview", "/".to_owned()),
        ("queue_page", format!("/queues/{queue}")),
        ("queue_page_100", format!("/queues/{queue}?page=100")),
        ("delayed_page", format!("/queues/{queue}?state=delayed")),
        ("dead_letters", "/dead".to_owned()),
        ("tasks", "/tasks".to_owned()),
        ("tasks_failed", "/tasks?status=failed".to_owned()),
    ] {
        let mut ms = Vec::with_capacity(args.page_runs);
        for _ in 0..args.page_runs.max(1) {
            let t = Instant::now();
            let (status, bytes) = http_get(addr, &path).await?;
            if status != 200 {
                return Err(format!("GET {path} answered {status}").into());
            }
            ms.push((t.elapsed().as_secs_f64() * 1000.0, bytes));
        }
        ms.sort_by(|a, b| a.0.total_cmp(&b.0));
        let at = |q: f64| {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let i = ((ms.len() - 1) as f64 * q).round() as usize;
            (ms[i].0 * 10.0).round() / 10.0
        };
        pages.insert(
            name.to_owned(),
            json!({"path": path, "p50_ms": at(0.5), "p95_ms": at(0.95), "max_ms": at(1.0), "bytes": ms[0].1}),
        );
    }
    let stats = broker.stats(queue).await?;
    Ok(json!({
        "broker": broker.backend(),
        "dashboard": {
            "queued": stats.ready + stats.delayed,
            "ready": stats.ready,
            "delayed": stats.delayed,
            "task_records": store.task_counts(&troupe::TaskFilter::new()).await?.total(),
            "enqueue_secs": (enqueue_secs * 10.0).round() / 10.0,
            "runs": args.page_runs,
            "pages": pages,
        }
    }))
}

/// `GET path` on a fresh connection: the status and the body's size.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, usize), Box<dyn std::error::Error>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
    Ok((status, body))
}
