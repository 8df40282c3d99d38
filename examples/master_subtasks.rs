//! Master tasks, subtasks and dedicated workers, after a team generating images with Dramatiq:
//! a master actor takes a generation request and fans it out into subtasks as one group:
//! `master` (queue `master`) spreads them over the standard model (queue `subtask`) and Lumina
//! (queue `subtask_ops`), `master_ops` (queue `master_ops`) sends all of them to Lumina. Each
//! queue has its own worker, as the team ran one worker process per queue.
//!
//! When every subtask of a request has finished, failed ones included, the group's finished
//! callback `batch_done` (queue `master`) POSTs the batch's outcome to the webhook once:
//! `{"event": "batch_done", "task_id", "subtasks", "succeeded", "images", "failed": [{"message_id",
//! "error_type", "error"}]}`. The group's barrier lives in the state backend (the broker's
//! database by default), so it holds across worker processes and crashes.
//!
//! A `CatchExceptions` middleware also reports failures to the webhook (the team's Feishu bot):
//! every failed attempt, and every message that ends in the dead letters. Some subtasks time out
//! once and succeed on the retry; some are rejected by moderation and fail permanently
//! (`ActorError::fail_permanently`).
//!
//! ```text
//! cargo run --example master_subtasks                          # all-in-one: four workers, one process
//! cargo run --example master_subtasks -- run --subtasks 20 --webhook http://127.0.0.1:8080/hook
//!
//! # dedicated worker processes, one per queue, on a shared database:
//! cargo run --example master_subtasks -- worker --queues subtask --broker-url sqlite://shared.db
//! cargo run --example master_subtasks -- worker --queues subtask_ops --broker-url sqlite://shared.db
//! cargo run --example master_subtasks -- run --worker-queues master,master_ops --broker-url sqlite://shared.db
//! ```
//!
//! The webhook is plain `http://` (a minimal HTTP/1.1 POST over a TCP stream, no TLS); without
//! `--webhook` the documents are printed instead.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use troupe::prelude::*;
use troupe::redact_url;
use troupe::worker::WorkerArgs;

/// The error type of `run`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The four queues, each with its dedicated worker.
pub const QUEUES: [&str; 4] = ["master", "master_ops", "subtask", "subtask_ops"];

/// The broker used when no `--broker-url` is given.
pub const DEFAULT_BROKER_URL: &str = "sqlite://troupe-master-subtasks.db";

/// Command line: `run` (the default) or `worker`.
#[derive(Debug, clap::Parser)]
#[command(
    about = "Master task fanning out subtasks to dedicated per-queue workers",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The flags of `run`, when no subcommand is given.
    #[command(flatten)]
    pub run: Args,
}

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Send master tasks and process everything with one worker per queue in this process.
    Run(Args),
    /// Run a worker until Ctrl-C (`--queues subtask` makes it a dedicated one).
    Worker(WorkerCommand),
}

/// Flags of `run`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Broker URL (sqlite://PATH, memory://, ...).
    #[arg(long, env = "TROUPE_BROKER_URL", default_value = DEFAULT_BROKER_URL)]
    pub broker_url: String,
    /// Where to POST failure reports (http:// only); printed when not given.
    #[arg(long)]
    pub webhook: Option<String>,
    /// Master tasks to send (odd ones to `master`, even ones to `master_ops`).
    #[arg(long, default_value_t = 1)]
    pub tasks: u32,
    /// Subtasks per master task.
    #[arg(long, default_value_t = 10)]
    pub subtasks: u32,
    /// Queues to start a worker for in this process; leave out those that dedicated `worker`
    /// processes consume.
    #[arg(long, value_delimiter = ',', default_values_t = QUEUES.map(String::from))]
    pub worker_queues: Vec<String>,
}

/// Flags of `worker`: the standard worker flags (the state backend defaults to the broker's
/// URL) and the webhook.
#[derive(Debug, clap::Args)]
pub struct WorkerCommand {
    /// The standard worker flags (`--queues`, `--concurrency`, `--broker-url`, ...).
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// Where to POST failure reports (http:// only); printed to stderr when not given.
    #[arg(long)]
    pub webhook: Option<String>,
}

// The seed team's default was MAX_RETRIES=0 with polling intervals of seconds; two quick retries
// (100 ms backoff) here show both a failure that recovers and one that does not.

/// Takes a generation request and creates its subtasks as one group: even ones on the standard
/// model (queue `subtask`), odd ones on Lumina (queue `subtask_ops`). Returns how many it created.
#[troupe::actor(queue_name = "master", max_retries = 0)]
async fn master(task_id: String, prompt: String, subtasks: u32, webhook: Option<String>) -> Result<u32, ActorError> {
    fan_out(&task_id, &prompt, subtasks, webhook, |index| index % 2 == 1).await
}

/// Takes a Lumina generation request: every subtask on queue `subtask_ops`.
#[troupe::actor(queue_name = "master_ops", max_retries = 0)]
async fn master_ops(
    task_id: String,
    prompt: String,
    subtasks: u32,
    webhook: Option<String>,
) -> Result<u32, ActorError> {
    fan_out(&task_id, &prompt, subtasks, webhook, |_| true).await
}

/// Sends the subtasks of `task_id` as a group (on Lumina where `lumina(index)`), with
/// `batch_done` as its finished callback.
async fn fan_out(
    task_id: &str,
    prompt: &str,
    subtasks: u32,
    webhook: Option<String>,
    lumina: impl Fn(u32) -> bool,
) -> Result<u32, ActorError> {
    let app = current_app()?;
    let mut children = Vec::new();
    for index in 0..subtasks {
        let args = (task_id.to_owned(), index, format!("{prompt}, variant {index}"));
        children.push(if lumina(index) {
            App::message(&RunSubtaskOps, &args)?
        } else {
            App::message(&RunSubtask, &args)?
        });
    }
    // `batch_done(task_id, webhook)`; the group appends the subtasks' outcomes.
    let done = Message::new(
        "master",
        "batch_done",
        vec![json!(task_id), json!(webhook)],
        serde_json::Map::new(),
    );
    group(children).add_finished_callback(done).run(&app, None).await?;
    Ok(subtasks)
}

/// The batch outcomes `batch_done` made in this process (the summary of `run` reports them).
static BATCHES: Mutex<Vec<Value>> = Mutex::new(Vec::new());

/// The group's finished callback: POSTs the batch's outcome to the webhook (or prints it), once
/// per master task, when every subtask has finished.
#[troupe::actor(queue_name = "master", max_retries = 3, min_backoff = "100ms")]
async fn batch_done(task_id: String, webhook: Option<String>, outcomes: Vec<Value>) -> Result<Value, ActorError> {
    let images: Vec<&Value> = outcomes
        .iter()
        .filter(|o| o["ok"] == true)
        .map(|o| &o["result"])
        .collect();
    let failed: Vec<Value> = outcomes
        .iter()
        .filter(|o| o["ok"] != true)
        .map(|o| {
            json!({
                "message_id": o["message_id"],
                "error_type": o["error"]["type"],
                "error": o["error"]["message"],
            })
        })
        .collect();
    let document = json!({
        "event": "batch_done",
        "task_id": task_id,
        "subtasks": outcomes.len(),
        "succeeded": images.len(),
        "images": images,
        "failed": failed,
    });
    match &webhook {
        // A webhook that is down fails the callback, which is retried.
        Some(url) => {
            post_json(url, &document.to_string())
                .await
                .map_err(|e| ActorError::new("WebhookError", e))?;
        }
        None => println!("{document}"),
    }
    BATCHES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(document.clone());
    Ok(document)
}

/// Generates one image on the standard model.
#[troupe::actor(queue_name = "subtask", max_retries = 2, min_backoff = "100ms", max_backoff = "1s")]
async fn run_subtask(task_id: String, index: u32, prompt: String) -> Result<String, ActorError> {
    generate("standard", &task_id, index, &prompt).await
}

/// Generates one image on the Lumina model.
#[troupe::actor(
    queue_name = "subtask_ops",
    max_retries = 2,
    min_backoff = "100ms",
    max_backoff = "1s"
)]
async fn run_subtask_ops(task_id: String, index: u32, prompt: String) -> Result<String, ActorError> {
    generate("lumina", &task_id, index, &prompt).await
}

/// The pretend image API: subtask 4 of every 5 is rejected by moderation (permanently), subtask
/// 2 of every 5 times out on its first attempt.
async fn generate(model: &str, task_id: &str, index: u32, prompt: &str) -> Result<String, ActorError> {
    let attempt = current_message().map_or(0, |m| m.retries()) + 1;
    tokio::time::sleep(Duration::from_millis(20)).await; // submitting and polling the job
    match index % 5 {
        4 => Err(ActorError::fail_permanently(ActorError::new(
            "ContentRejected",
            format!("subtask {index} of {task_id}: prompt {prompt:?} rejected by {model} moderation"),
        ))),
        2 if attempt == 1 => Err(ActorError::new(
            "ApiTimeout",
            format!("subtask {index} of {task_id}: {model} job still running after the last poll"),
        )),
        _ => Ok(format!("https://images.example/{task_id}/{index}.png")),
    }
}

#[derive(Debug, Default)]
struct Reports {
    /// Every report, posted or not.
    documents: Vec<Value>,
    /// One line per report: where it went.
    lines: Vec<String>,
    delivered: usize,
    /// Per queue: attempts that succeeded and that failed.
    by_queue: BTreeMap<String, (u64, u64)>,
}

/// The seed's exception-catching middleware: every failed attempt (`"event": "failure"`) and
/// every dead-lettered message (`"event": "dead_lettered"`, from `after_nack`) is POSTed to the
/// webhook as `{event, actor, queue, message_id, error_type, error, retries}`. `retries` is the
/// message's retry count when the attempt started. A webhook that is down never fails a message.
#[derive(Clone, Debug)]
pub struct CatchExceptions {
    webhook: Option<String>,
    echo: bool,
    reports: Arc<Mutex<Reports>>,
}

impl CatchExceptions {
    /// Reports to `webhook`; with `echo`, also prints each report on stderr (for `worker`).
    #[must_use]
    pub fn new(webhook: Option<String>, echo: bool) -> Self {
        Self {
            webhook,
            echo,
            reports: Arc::default(),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Reports) -> R) -> R {
        f(&mut self.reports.lock().unwrap_or_else(PoisonError::into_inner))
    }

    async fn report(&self, event: &str, cx: &ProcessContext, error: &ActorError) {
        let message = cx.message();
        let document = json!({
            "event": event,
            "actor": message.actor_name,
            "queue": message.queue_name,
            "message_id": message.message_id,
            "error_type": error.type_name(),
            "error": error.message(),
            "retries": message.retries(),
        });
        let line = match &self.webhook {
            Some(url) => match post_json(url, &document.to_string()).await {
                Ok(status) => {
                    self.with(|r| r.delivered += 1);
                    format!("POST {event} {} -> HTTP {status}", message.actor_name)
                }
                Err(e) => format!("POST {event} {} failed: {e}", message.actor_name),
            },
            None => format!("(no --webhook) {document}"),
        };
        if self.echo {
            eprintln!("[catch_exceptions] {line}");
        }
        self.with(|r| {
            r.documents.push(document);
            r.lines.push(line);
        });
    }
}

#[troupe::async_trait]
impl Middleware for CatchExceptions {
    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let outcome = next.run(cx).await;
        let queue = cx.message().queue_name.clone();
        self.with(|r| {
            let counts = r.by_queue.entry(queue).or_default();
            if outcome.is_success() {
                counts.0 += 1;
            } else if outcome.error().is_some() {
                counts.1 += 1;
            }
        });
        if let Outcome::Failure(error) = &outcome {
            self.report("failure", cx, error).await;
        }
        outcome
    }

    async fn after_nack(&self, cx: &ProcessContext, outcome: &Outcome) {
        if let Some(error) = outcome.error() {
            self.report("dead_lettered", cx, error).await;
        }
    }
}

/// POSTs `body` as JSON with a minimal HTTP/1.1 client; returns the status code (2xx only).
async fn post_json(url: &str, body: &str) -> Result<u16, BoxError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// webhook URLs are supported by this example (no TLS)")?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    let address = if authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let exchange = async {
        let mut stream = TcpStream::connect(&address).await?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        let mut chunk = [0u8; 512];
        while !response.windows(2).any(|w| w == b"\r\n") {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            response.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .map_err(|_| format!("no answer from {address} within 3 s"))??;
    let status_line = String::from_utf8_lossy(&response);
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP response from {address}"))?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(format!("HTTP {status} from {address}").into())
    }
}

/// Builds the app, with the reporting middleware it uses and the state backend that keeps the
/// groups' barriers.
fn build_app(broker: Arc<dyn Broker>, state: Arc<dyn StateBackend>, reports: CatchExceptions) -> troupe::Result<App> {
    App::builder(broker)
        .state(state)
        .middleware(reports)
        .actor(Master)
        .actor(MasterOps)
        .actor(RunSubtask)
        .actor(RunSubtaskOps)
        .actor(BatchDone)
        .build()
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Master tasks sent.
    pub tasks: u32,
    /// Subtasks they created.
    pub subtasks: u32,
    /// The batch outcomes `batch_done` made (posted or printed), one per master task.
    pub batches: Vec<Value>,
    /// Per queue: attempts that succeeded and that failed, in this process.
    pub by_queue: BTreeMap<String, (u64, u64)>,
    /// Every failure report, in the order they were made.
    pub reports: Vec<Value>,
    /// Reports the webhook accepted.
    pub delivered: usize,
}

/// Sends the master tasks, runs one worker per queue of `--worker-queues` until everything is
/// processed, and prints the failure reports and per-queue counts to `out`.
///
/// # Errors
/// A broker that cannot be reached, or processing that does not finish within 60 s.
pub async fn run(args: Args, out: &mut dyn Write) -> Result<Summary, BoxError> {
    let started = Instant::now();
    let broker = troupe::connect(&args.broker_url).await?;
    let state = troupe::connect_state(&args.broker_url).await?;
    let reports = CatchExceptions::new(args.webhook.clone(), false);
    let app = build_app(broker, state, reports.clone())?;
    writeln!(out, "broker: {}", redact_url(&args.broker_url))?;
    match &args.webhook {
        Some(url) => writeln!(out, "failure reports go to {url}")?,
        None => writeln!(out, "no --webhook: failure reports are printed")?,
    }

    // One dedicated worker per queue, as the team ran one process per queue.
    let mut workers = Vec::new();
    for queue in &args.worker_queues {
        let concurrency = if queue == "master" { 1 } else { 4 };
        let worker = Worker::builder(app.clone())
            .queues([queue.as_str()])
            .concurrency(concurrency)
            .start()
            .await?;
        writeln!(out, "worker for queue {queue:<11} concurrency {concurrency}")?;
        workers.push(worker);
    }
    let external: Vec<&str> = QUEUES
        .into_iter()
        .filter(|q| !args.worker_queues.iter().any(|w| w == q))
        .collect();
    if !external.is_empty() {
        writeln!(out, "expecting dedicated worker processes for {external:?}")?;
    }

    let mut batches = Vec::new();
    for n in 1..=args.tasks {
        let task_id = format!("task-{n}");
        let prompt = format!("a lighthouse at dusk #{n}");
        let webhook = args.webhook.clone();
        if n % 2 == 1 {
            Master.send(&app, task_id, prompt, args.subtasks, webhook).await?;
        } else {
            MasterOps.send(&app, task_id, prompt, args.subtasks, webhook).await?;
        }
    }
    writeln!(
        out,
        "sent {} master task(s) of {} subtasks each\n",
        args.tasks, args.subtasks
    )?;

    let drained = wait_until_drained(&app, Duration::from_secs(60)).await;
    for worker in workers {
        worker.stop().await;
    }
    drained?;

    let (lines, documents, delivered, by_queue) = reports.with(|r| {
        (
            std::mem::take(&mut r.lines),
            r.documents.clone(),
            r.delivered,
            r.by_queue.clone(),
        )
    });
    writeln!(out, "failure reports ({}):", lines.len())?;
    for line in &lines {
        writeln!(out, "  {line}")?;
    }
    writeln!(out, "\nattempts per queue (this process):")?;
    writeln!(out, "  {:<12} {:>4} {:>7}", "queue", "ok", "failed")?;
    for (queue, (ok, failed)) in &by_queue {
        writeln!(out, "  {queue:<12} {ok:>4} {failed:>7}")?;
    }
    for batch in BATCHES.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
        batches.push(batch);
    }
    writeln!(out, "\nbatches done ({}):", batches.len())?;
    for batch in &batches {
        writeln!(
            out,
            "  {} {}/{} images, failed: {}",
            batch["task_id"].as_str().unwrap_or("?"),
            batch["succeeded"],
            batch["subtasks"],
            batch["failed"].as_array().map_or(0, Vec::len)
        )?;
    }
    writeln!(out, "\ndone in {:.1?}", started.elapsed())?;
    Ok(Summary {
        tasks: args.tasks,
        subtasks: args.tasks * args.subtasks,
        batches,
        by_queue,
        reports: documents,
        delivered,
    })
}

/// Waits until no message of [`QUEUES`] is ready, delayed or in flight ([`App::join`]).
async fn wait_until_drained(app: &App, timeout: Duration) -> Result<(), BoxError> {
    let deadline = Instant::now() + timeout;
    // Messages flow forward through QUEUES (the masters send subtasks), then back to `master`
    // (the last subtask of a group sends its `batch_done` before it is acked), so once each queue
    // is joined in that order and `master` again, all are drained. Failures are expected: no
    // fail-fast.
    for queue in QUEUES.into_iter().chain(["master"]) {
        let left = deadline.saturating_duration_since(Instant::now());
        app.join_with(queue, left, JoinOptions::new().fail_fast(false)).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<ExitCode, BoxError> {
    let cli = <Cli as clap::Parser>::parse();
    match cli.command {
        Some(Command::Worker(WorkerCommand { mut worker, webhook })) => {
            let broker_url = worker
                .broker_url
                .get_or_insert_with(|| DEFAULT_BROKER_URL.to_owned())
                .clone();
            worker.state_url.get_or_insert(broker_url);
            let reports = CatchExceptions::new(webhook, true);
            Ok(troupe::run_worker_with(worker, |backends| {
                let state = backends
                    .state
                    .ok_or_else(|| troupe::Error::Config("the groups need a state backend (--state-url)".into()))?;
                build_app(backends.broker, state, reports)
            })
            .await)
        }
        Some(Command::Run(args)) => run_and_check(args).await,
        None => run_and_check(cli.run).await,
    }
}

async fn run_and_check(args: Args) -> Result<ExitCode, BoxError> {
    let webhook = args.webhook.is_some();
    let summary = run(args, &mut std::io::stdout()).await?;
    if webhook && summary.delivered < summary.reports.len() {
        eprintln!(
            "warning: the webhook accepted {} of {} reports",
            summary.delivered,
            summary.reports.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
