//! Throttling calls to an external API shared by several worker processes, as the seed teams
//! throttled image generation and email providers: every call takes a `BucketRateLimiter` slot
//! (at most `--limit` calls per second, across every process, in the state backend: the
//! broker's SQLite file by default), waiting for the next second when this one is full.
//!
//! `run` (the default) starts two worker processes (this program's `worker` command), sends
//! `--calls` messages, and prints how many calls each second saw and which process made them:
//!
//! ```text
//! cargo run --example throttled_api                              # 40 calls, 10 per second, 2 processes
//! cargo run --example throttled_api -- run --calls 100 --limit 25 --processes 3
//! cargo run --example throttled_api -- worker --broker-url sqlite://troupe-throttled-api.db --limit 10
//! ```
//!
//! Each worker prints one JSON line per call, `{"call": N, "bucket": S, "at_ms": T, "pid": P}`
//! (`bucket`: the start, in ms, of the second whose slot the call took); `run` reads them from
//! its children.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use troupe::now_ms;
use troupe::prelude::*;

/// The error type of the commands.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The broker (and state) used when no `--broker-url` is given.
pub const DEFAULT_BROKER_URL: &str = "sqlite://troupe-throttled-api.db";

/// The calls' queue.
pub const QUEUE: &str = "api_calls";

/// Command line: `run` (the default) or `worker`.
#[derive(Debug, clap::Parser)]
#[command(
    about = "Calls to an external API throttled across worker processes",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Sub>,
    /// The flags of `run`, when no subcommand is given.
    #[command(flatten)]
    pub run: RunArgs,
}

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Sub {
    /// Start worker processes, send the calls, report the rate each second saw.
    Run(RunArgs),
    /// Run one worker until Ctrl-C (or until `--exit-after` calls).
    Worker(WorkerArgs),
}

/// Flags of `run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Broker and state URL (sqlite://PATH, redis://..., postgres://...).
    #[arg(long, env = "TROUPE_BROKER_URL", default_value = DEFAULT_BROKER_URL)]
    pub broker_url: String,
    /// Calls to make.
    #[arg(long, default_value_t = 40)]
    pub calls: u32,
    /// Calls per second allowed, across every process.
    #[arg(long, default_value_t = 10)]
    pub limit: u32,
    /// Worker processes to start.
    #[arg(long, default_value_t = 2)]
    pub processes: u32,
}

/// Flags of `worker`.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    /// Broker and state URL.
    #[arg(long, env = "TROUPE_BROKER_URL", default_value = DEFAULT_BROKER_URL)]
    pub broker_url: String,
    /// Calls per second allowed, across every process.
    #[arg(long, default_value_t = 10)]
    pub limit: u32,
    /// Stop after this many calls in all processes have been made (`run` passes its `--calls`).
    #[arg(long)]
    pub exit_after: Option<u32>,
}

/// The limiter every process shares: `--limit` calls per one-second bucket.
fn limiter(state: Arc<dyn StateBackend>, limit: u32) -> BucketRateLimiter {
    BucketRateLimiter::new(state, "external-api", limit, Duration::from_secs(1))
}

/// Calls made by this process.
static MADE: AtomicU32 = AtomicU32::new(0);

/// The limit of this process's worker (set once, before it starts).
static LIMIT: AtomicU32 = AtomicU32::new(10);

/// Takes a slot of the API's rate (waiting up to 10 s for a second with room, else retried
/// later), then "calls" it: prints `{"call", "bucket", "at_ms", "pid"}` (`bucket`: the start of
/// the second its slot was counted in).
#[troupe::actor(
    queue_name = "api_calls",
    max_retries = 20,
    min_backoff = "200ms",
    max_backoff = "2s"
)]
async fn call_api(n: u32) -> Result<(), ActorError> {
    let state = current_app()?
        .state()
        .cloned()
        .ok_or_else(|| ActorError::msg("no state backend"))?;
    let bucket = limiter(state, LIMIT.load(Ordering::Relaxed))
        .acquire(WhenLimited::Wait(Duration::from_secs(10)))
        .await?;
    let line = json!({"call": n, "bucket": bucket, "at_ms": now_ms(), "pid": std::process::id()});
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    MADE.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The app of every process: the broker and its state backend (one URL), the actor.
async fn app(url: &str) -> Result<App, BoxError> {
    let broker = troupe::connect(url).await?;
    let state = troupe::connect_state(url).await?;
    Ok(App::builder(broker).state(state).actor(CallApi).build()?)
}

/// Runs one worker until Ctrl-C, or until `--exit-after` calls are made in all (the queue is
/// empty and nothing is in flight).
///
/// # Errors
/// A broker or state backend that cannot be reached.
pub async fn worker(args: WorkerArgs) -> Result<(), BoxError> {
    LIMIT.store(args.limit, Ordering::Relaxed);
    let app = app(&args.broker_url).await?;
    let worker = Worker::builder(app.clone())
        .queues([QUEUE])
        .concurrency(8)
        .start()
        .await?;
    match args.exit_after {
        Some(_) => {
            // Until the queue is drained (every call made, by this process or another).
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let stats = app.broker().stats(QUEUE).await?;
                if stats.pending() == 0 || Instant::now() > deadline {
                    break;
                }
            }
        }
        None => {
            tokio::signal::ctrl_c().await?;
        }
    }
    worker.stop().await;
    eprintln!("worker {}: {} calls", std::process::id(), MADE.load(Ordering::Relaxed));
    Ok(())
}

/// What a run saw.
#[derive(Clone, Debug)]
pub struct Report {
    /// Calls made per second (unix seconds, the limiter's buckets), over every process.
    pub per_second: BTreeMap<u64, u32>,
    /// Calls made per process id.
    pub per_process: BTreeMap<u32, u32>,
    /// The calls made (their numbers), each once.
    pub calls: BTreeSet<u32>,
}

/// Sends the calls, runs `--processes` workers as `worker` commands built by `command` (this
/// program, or a test's stand-in), reads their call lines and prints the calls per second and
/// per process on `out`.
///
/// # Errors
/// A broker that cannot be reached, a worker that fails, or a call line that is not JSON.
pub async fn run(
    args: RunArgs,
    command: impl Fn(&WorkerArgs) -> Command,
    out: &mut dyn Write,
) -> Result<Report, BoxError> {
    let app = app(&args.broker_url).await?;
    app.declare_queue(QUEUE).await?;
    for n in 0..args.calls {
        CallApi.send(&app, n).await?;
    }
    writeln!(
        out,
        "sent {} calls; limit {} per second across {} processes",
        args.calls, args.limit, args.processes
    )?;
    let worker_args = WorkerArgs {
        broker_url: args.broker_url.clone(),
        limit: args.limit,
        exit_after: Some(args.calls),
    };
    let mut children = Vec::new();
    for _ in 0..args.processes {
        children.push(
            command(&worker_args)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?,
        );
    }
    let mut lines = Vec::new();
    for child in children {
        let output = tokio::task::spawn_blocking(move || {
            let mut child = child;
            let mut lines = Vec::new();
            if let Some(stdout) = child.stdout.take() {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    lines.push(line);
                }
            }
            (child.wait(), lines)
        })
        .await?;
        let (status, mut got) = output;
        let status = status?;
        if !status.success() {
            return Err(format!("a worker process failed: {status}").into());
        }
        lines.append(&mut got);
    }
    let mut report = Report {
        per_second: BTreeMap::new(),
        per_process: BTreeMap::new(),
        calls: BTreeSet::new(),
    };
    // A call line may follow other output on its line (a test harness's, say).
    for line in lines.iter().filter_map(|l| l.find("{\"call\"").map(|i| &l[i..])) {
        let call: Value = serde_json::from_str(line).map_err(|e| format!("{line:?}: {e}"))?;
        let at = call["bucket"].as_u64().ok_or("a call line without its bucket")?;
        let pid = call["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or("a call line without pid")?;
        let n = call["call"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or("a call line without call")?;
        *report.per_second.entry(at / 1000).or_default() += 1;
        *report.per_process.entry(pid).or_default() += 1;
        report.calls.insert(n);
    }
    writeln!(out, "\ncalls per second (limit {}):", args.limit)?;
    for (second, calls) in &report.per_second {
        writeln!(out, "  {second}  {calls:>4}  {}", "#".repeat(*calls as usize))?;
    }
    writeln!(out, "\ncalls per process:")?;
    for (pid, calls) in &report.per_process {
        writeln!(out, "  pid {pid:<8} {calls:>4}")?;
    }
    Ok(report)
}

/// `worker` as this program's own command.
fn own_worker(args: &WorkerArgs) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap_or_else(|_| "throttled_api".into()));
    command.args([
        "worker",
        "--broker-url",
        &args.broker_url,
        "--limit",
        &args.limit.to_string(),
    ]);
    if let Some(n) = args.exit_after {
        command.args(["--exit-after", &n.to_string()]);
    }
    command
}

#[tokio::main]
async fn main() -> Result<ExitCode, BoxError> {
    let cli = <Cli as clap::Parser>::parse();
    match cli.command {
        Some(Sub::Worker(args)) => worker(args).await?,
        Some(Sub::Run(args)) => {
            run(args, own_worker, &mut std::io::stdout()).await?;
        }
        None => {
            run(cli.run, own_worker, &mut std::io::stdout()).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
