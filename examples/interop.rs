//! Interoperability with Python Dramatiq on Redis or RabbitMQ, both directions: a Troupe worker
//! runs messages that Python sends, and Troupe sends messages that a Python worker runs. Both
//! store results in Redis with Dramatiq's result keys, so each side reads the other's results.
//!
//! The actors are those of the Python peer (`tests/interop/peer.py`), same names, same queue
//! (`default`), same options:
//!
//! | actor | returns | options |
//! |---|---|---|
//! | `add(a, b)` | `a + b` | `store_results` |
//! | `echo(value)` | `value`, unchanged (any JSON) | `store_results` |
//! | `fail_always()` | fails with `ValueError` | `store_results`, `max_retries = 2`, `min_backoff = 100ms`, `max_backoff = 1s` |
//! | `sleep_ms(ms)` | `ms`, after sleeping that long | `store_results` |
//! | `mutex_sleep(key, ms)` | `[start_ms, end_ms]`: holds the `ConcurrentRateLimiter` `key` (limit 1) for `ms` | `store_results`, `max_retries = 1000`, `min_backoff = 20ms`, `max_backoff = 200ms` |
//!
//! ```text
//! # a Troupe worker for Python producers (results in the same Redis by default):
//! cargo run -p troupe --all-features --example interop -- worker --broker-url redis://127.0.0.1:6379/0
//! #   python: add.send(1, 2).get_result(block=True) == 3
//!
//! # a message for a Python worker (prints its message_id):
//! cargo run -p troupe --all-features --example interop -- send --broker-url redis://127.0.0.1:6379/0 \
//!     --actor add --args '[1, 2]'
//! cargo run -p troupe --all-features --example interop -- send --actor echo --args '[]' \
//!     --kwargs '{"value": {"nested": [1, 2.5, null]}}' --delay-ms 500 --option result_ttl=60000
//! ```
//!
//! A Redis URL may carry the key prefix as `?namespace=NAME` (Dramatiq's `namespace`, default
//! `dramatiq`).
//!
//! # Cancellation, with Python's dramatiq-abort
//!
//! The worker keeps cancellation requests in the state backend of `--state-url`, which
//! defaults to the results URL (so a plain Redis run needs no new flag); with it, cancellation
//! is on. On Redis the requests are those of Python's dramatiq-abort (its `RedisBackend`, key
//! prefix `dramatiq:aborts:`, or `?abort_namespace=PREFIX` in the URL): a message Python's
//! `abort(id, mode=AbortMode.CANCEL)` cancelled is skipped (acked, never run), and a running one
//! that `abort(id)` aborts is dropped at its next `.await` (`sleep_ms` mid-sleep) and acked,
//! never retried. The other way, `cancel` asks Python workers with the `Abortable` middleware
//! (and Troupe workers) to skip a pending message or abort a running one; it prints the outcome
//! as one word, `cancelled`, `aborting`, `running`, `finished:STATUS` or `unknown` (no task
//! record of the message: tracking is off, or a Python producer sent it; the request is made all
//! the same).
//!
//! ```text
//! cargo run -p troupe --all-features --example interop -- cancel --message-id ID            # abort
//! cargo run -p troupe --all-features --example interop -- cancel --message-id ID --mode pending \
//!     --state-url redis://127.0.0.1:6379/0
//! #   python: Abortable(backend=RedisBackend(client=redis.Redis())) on the broker
//! ```
//!
//! # A mutex shared with Python
//!
//! `mutex_sleep(key, ms)` holds the `ConcurrentRateLimiter` named `key` (limit 1) in the state
//! backend of `--state-url` for `ms` milliseconds and returns `[start_ms, end_ms]` (ms since the
//! epoch, taken inside the hold). On Redis that limiter is Dramatiq's (its `RedisBackend`: the
//! counter under the raw key), so Python's `mutex_sleep` of the peer, holding
//! `ConcurrentRateLimiter(RedisBackend(...), key, limit=1)` on the same Redis, and Troupe's
//! exclude each other. While the mutex is taken the actor waits up to 1 s, then fails with
//! `RateLimitExceeded` and is retried after 20-200 ms, as Python's is.
//!
//! # Groups with Python's `GroupCallbacks`
//!
//! `group` runs `group([...]).add_completion_callback(...)` with Dramatiq's options and barrier
//! (the group's uuid as a raw key in the `--state-url` Redis), so Python workers with
//! `GroupCallbacks(RedisBackend(...))` on that Redis, Troupe workers, or both, run the children
//! and whichever runs the last one sends the callback, once; it prints
//! `{"group", "children": [ids], "callback": id}`. The worker arrives at Python groups' barriers
//! the same way.
//!
//! ```text
//! cargo run -p troupe --all-features --example interop -- group \
//!     --children '[{"actor": "add", "args": [1, 2]}, {"actor": "echo", "args": ["x"]}]' \
//!     --callback '{"actor": "echo", "args": ["done"]}'
//! ```
//!
//! On RabbitMQ (`amqp://`), as Python users run Dramatiq (`RabbitmqBroker` with a Redis
//! `RedisBackend`), the results go to the Redis that `--results-url` names; it is required,
//! since an `amqp://` broker keeps no results. Queues declared with `max_priority` by Python must
//! be declared with the same value here: `?max_priority=N` in the URL.
//!
//! ```text
//! cargo run -p troupe --all-features --example interop -- worker \
//!     --broker-url 'amqp://guest:guest@127.0.0.1:5672/%2f' --results-url redis://127.0.0.1:6379/0
//! #   python: RabbitmqBroker(url=..., confirm_delivery=True) + Results(backend=RedisBackend())
//! cargo run -p troupe --all-features --example interop -- send \
//!     --broker-url 'amqp://guest:guest@127.0.0.1:5672/%2f?max_priority=10' --actor echo --args '["hi"]' \
//!     --option broker_priority=5
//! ```

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Map, Number, Value, json};
use troupe::limits::{ConcurrentRateLimiter, WhenLimited};
use troupe::now_ms;
use troupe::prelude::*;
use troupe::worker::WorkerArgs;

/// The error type of the commands.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The broker used when no `--broker-url` is given.
pub const DEFAULT_BROKER_URL: &str = "redis://127.0.0.1:6379/0";

/// Command line: `worker`, `send`, `cancel` or `group`.
#[derive(Debug, clap::Parser)]
#[command(about = "Troupe and Python Dramatiq on one Redis or RabbitMQ: a worker, a producer, or a cancellation")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run a worker with the interop actors until Ctrl-C or SIGTERM.
    Worker(WorkerCommand),
    /// Enqueue one message by actor name and print its message_id.
    Send(SendArgs),
    /// Cancel a message (as dramatiq-abort's `abort`) and print the outcome.
    Cancel(CancelArgs),
    /// Run a group of messages with a completion callback (Dramatiq's options and barrier) and
    /// print its messages' ids.
    Group(GroupArgs),
}

/// Flags of `group`.
#[derive(Clone, Debug, clap::Args)]
pub struct GroupArgs {
    /// Broker URL, as `send` takes it.
    #[arg(long, env = "TROUPE_BROKER_URL", default_value = DEFAULT_BROKER_URL)]
    pub broker_url: String,
    /// The state backend of the group's barrier: the Redis where Python's `GroupCallbacks`
    /// (its rate-limit `RedisBackend`) and Troupe workers' `--state-url` keep it.
    #[arg(long, env = "TROUPE_STATE_URL", default_value = DEFAULT_BROKER_URL)]
    pub state_url: String,
    /// The children: a JSON list of `{"actor", "args"}` (queue `--queue`).
    #[arg(long)]
    pub children: String,
    /// The completion callback, sent once every child succeeded: one `{"actor", "args"}`.
    #[arg(long)]
    pub callback: String,
    /// The queue of the children and the callback.
    #[arg(long, default_value = "default")]
    pub queue: String,
}

/// Flags of `worker`: the standard worker flags and the actors' queue.
#[derive(Debug, clap::Args)]
pub struct WorkerCommand {
    /// The standard worker flags (`--broker-url`, `--results-url`, `--state-url`, `--queues`,
    /// `-c`, ...); the broker defaults to `redis://127.0.0.1:6379/0` (`amqp://` for RabbitMQ),
    /// the results to the broker URL when it is a Redis one (`--results-url` is required with
    /// any other broker), the state (cancellation requests) to the results URL.
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// The queue of the actors (the Python peer's `--actor-queue`).
    #[arg(long, default_value = "default")]
    pub actor_queue: String,
}

/// Flags of `send`.
#[derive(Clone, Debug, clap::Args)]
pub struct SendArgs {
    /// Broker URL (redis://HOST[:PORT][/DB][?namespace=NAME], or
    /// amqp://USER:PASS@HOST[:PORT]/VHOST[?max_priority=N]).
    #[arg(long, env = "TROUPE_BROKER_URL", default_value = DEFAULT_BROKER_URL)]
    pub broker_url: String,
    /// The actor's name (no actor needs to be registered here).
    #[arg(long)]
    pub actor: String,
    /// Positional arguments: a JSON array.
    #[arg(long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments: a JSON object.
    #[arg(long)]
    pub kwargs: Option<String>,
    /// The queue.
    #[arg(long, default_value = "default")]
    pub queue: String,
    /// Enqueue on the delay queue, due after this many milliseconds.
    #[arg(long)]
    pub delay_ms: Option<u64>,
    /// A message option, `KEY=JSON` (`max_retries=0`, `result_ttl=60000`); repeatable.
    #[arg(long = "option", value_name = "KEY=JSON")]
    pub options: Vec<String>,
}

/// Flags of `cancel`.
#[derive(Clone, Debug, clap::Args)]
pub struct CancelArgs {
    /// The state backend where workers look for cancellation requests (the worker's
    /// `--state-url`, by default its results URL): redis://HOST[:PORT][/DB][?namespace=NAME],
    /// or any state backend URL.
    #[arg(long, env = "TROUPE_STATE_URL", default_value = DEFAULT_BROKER_URL)]
    pub state_url: String,
    /// The message to cancel.
    #[arg(long)]
    pub message_id: String,
    /// `pending`: only if it has not started (dramatiq-abort's `AbortMode.CANCEL`); `abort`: a
    /// running message is stopped too (`AbortMode.ABORT`).
    #[arg(long, value_enum, default_value_t = CancelModeArg::Abort)]
    pub mode: CancelModeArg,
}

/// The `--mode` of `cancel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CancelModeArg {
    /// Cancel it if it is pending; a running message goes on.
    Pending,
    /// Cancel it if it is pending, stop it if it is running.
    Abort,
}

impl From<CancelModeArg> for CancelMode {
    fn from(mode: CancelModeArg) -> Self {
        match mode {
            CancelModeArg::Pending => Self::Pending,
            CancelModeArg::Abort => Self::Abort,
        }
    }
}

/// Whether the actors print what they receive (the `worker` command does).
static PRINT_CALLS: AtomicBool = AtomicBool::new(false);
/// What the actors received, in order: one record per call.
static CALLS: Mutex<Vec<Value>> = Mutex::new(Vec::new());

/// Every call the actors of this process received so far, as the Python peer reports them:
/// `{"actor", "message_id", "queue_name", "retries", "received": {param: value}, "at_ms"}`.
#[must_use]
pub fn calls() -> Vec<Value> {
    CALLS.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

fn record(actor: &str, received: Value) {
    let message = current_message();
    let call = json!({
        "actor": actor,
        "message_id": message.as_ref().map(|m| m.message_id.clone()),
        "queue_name": message.as_ref().map(|m| m.queue_name.clone()),
        "retries": message.as_ref().map(Message::retries),
        "received": received,
        "at_ms": now_ms(),
    });
    if PRINT_CALLS.load(Ordering::Relaxed) {
        println!("{call}");
    }
    CALLS.lock().unwrap_or_else(PoisonError::into_inner).push(call);
}

/// Adds two JSON numbers, as Python's `a + b`: integers add exactly while the sum fits in 64
/// bits (i64, or u64 above `i64::MAX`), anything else (a float, or a larger sum) adds as f64.
/// `Value` parameters accept whatever number Python sends, int or float.
#[troupe::actor(store_results = true)]
pub async fn add(a: Value, b: Value) -> Result<Value, ActorError> {
    record("add", json!({"a": a, "b": b}));
    add_numbers(&a, &b)
}

fn add_numbers(a: &Value, b: &Value) -> Result<Value, ActorError> {
    let (Value::Number(x), Value::Number(y)) = (a, b) else {
        return Err(ActorError::new(
            "TypeError",
            format!("add needs two numbers, got {a} and {b}"),
        ));
    };
    let int = |n: &Number| n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
    if let (Some(x), Some(y)) = (int(x), int(y)) {
        let sum = x + y;
        if let Ok(v) = i64::try_from(sum) {
            return Ok(v.into());
        }
        if let Ok(v) = u64::try_from(sum) {
            return Ok(v.into());
        }
    }
    let sum = x.as_f64().unwrap_or(f64::NAN) + y.as_f64().unwrap_or(f64::NAN);
    Number::from_f64(sum)
        .map(Value::Number)
        .ok_or_else(|| ActorError::new("OverflowError", format!("{x} + {y} is not a finite number")))
}

/// Returns its argument unchanged: any JSON value.
#[troupe::actor(store_results = true)]
pub async fn echo(value: Value) -> Value {
    record("echo", json!({"value": value}));
    value
}

/// Always fails (as Python's `raise ValueError(...)`): two quick retries, then the dead letters.
#[troupe::actor(store_results = true, max_retries = 2, min_backoff = "100ms", max_backoff = "1s")]
pub async fn fail_always() -> Result<(), ActorError> {
    record("fail_always", json!({}));
    Err(ActorError::new("ValueError", "fail_always always fails"))
}

/// Sleeps `ms` milliseconds and returns `ms`. Async: a cancellation in mode abort drops it
/// mid-sleep (the message is acked, never retried).
#[troupe::actor(store_results = true)]
pub async fn sleep_ms(ms: u64) -> u64 {
    record("sleep_ms", json!({"ms": ms}));
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

/// Holds the `ConcurrentRateLimiter` named `key` (limit 1) in the app's state backend for `ms`
/// milliseconds; returns `[start_ms, end_ms]`, both taken while it holds the mutex. Waits up
/// to 1 s for it, then fails with `RateLimitExceeded` and is retried with a short backoff.
#[troupe::actor(
    store_results = true,
    max_retries = 1000,
    min_backoff = "20ms",
    max_backoff = "200ms"
)]
pub async fn mutex_sleep(key: String, ms: u64) -> Result<Vec<u64>, ActorError> {
    let state = current_app()?.state().cloned().ok_or_else(|| {
        ActorError::fail_permanently(ActorError::new(
            "RuntimeError",
            "mutex_sleep needs a state backend: give the worker --state-url",
        ))
    })?;
    let mutex = ConcurrentRateLimiter::new(state, key.clone(), 1);
    let slot = mutex.acquire(WhenLimited::Wait(Duration::from_secs(1))).await?;
    let start = now_ms();
    record("mutex_sleep", json!({"key": key, "ms": ms}));
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let end = now_ms();
    slot.release().await?;
    Ok(vec![start, end])
}

/// The app of a worker: the interop actors, results in `results`.
///
/// # Errors
/// As [`App::builder`]'s `build`.
pub fn build_app(broker: Arc<dyn Broker>, results: Arc<dyn ResultBackend>) -> troupe::Result<App> {
    build_app_on(broker, results, "default")
}

/// The app of a worker with the interop actors on `queue` instead of `default`.
///
/// # Errors
/// As [`App::builder`]'s `build`.
pub fn build_app_on(broker: Arc<dyn Broker>, results: Arc<dyn ResultBackend>, queue: &str) -> troupe::Result<App> {
    build_app_with(broker, results, None, queue)
}

/// The app of a worker with the interop actors on `queue`, and the state backend `state` when
/// given: then its workers honour cancellation requests (dramatiq-abort's too, on Redis) and
/// `mutex_sleep` can take its mutex.
///
/// # Errors
/// As [`App::builder`]'s `build`.
pub fn build_app_with(
    broker: Arc<dyn Broker>,
    results: Arc<dyn ResultBackend>,
    state: Option<Arc<dyn StateBackend>>,
    queue: &str,
) -> troupe::Result<App> {
    let mut builder = App::builder(broker).results(results);
    if let Some(state) = state {
        builder = builder.state(state);
    }
    builder
        .actor(OnQueue::new(Add, queue))
        .actor(OnQueue::new(Echo, queue))
        .actor(OnQueue::new(FailAlways, queue))
        .actor(OnQueue::new(SleepMs, queue))
        .actor(OnQueue::new(MutexSleep, queue))
        .build()
}

/// An actor with its messages on another queue: everything else is the wrapped actor's.
#[derive(Clone, Debug)]
pub struct OnQueue<A> {
    actor: A,
    queue: String,
}

impl<A: Actor> OnQueue<A> {
    /// `actor`, on `queue`.
    pub fn new(actor: A, queue: impl Into<String>) -> Self {
        Self {
            actor,
            queue: queue.into(),
        }
    }
}

impl<A: Actor> Actor for OnQueue<A> {
    type Args = A::Args;
    type Output = A::Output;

    fn name(&self) -> &str {
        self.actor.name()
    }

    fn arg_names(&self) -> &[&str] {
        self.actor.arg_names()
    }

    fn options(&self) -> ActorOptions {
        let mut options = self.actor.options();
        options.queue_name.clone_from(&self.queue);
        options
    }

    fn decode_args(&self, values: Vec<Value>) -> Result<Self::Args, String> {
        self.actor.decode_args(values)
    }

    fn call(&self, args: Self::Args) -> impl std::future::Future<Output = Result<Self::Output, ActorError>> + Send {
        self.actor.call(args)
    }
}

/// Fills in the defaults of `worker`: the broker URL, the results URL (the broker's when it is
/// Redis), the state URL (the results URL).
///
/// # Errors
/// No results URL (the broker is not Redis, `amqp://` say, and no `--results-url`).
pub fn worker_defaults(command: &mut WorkerCommand) -> Result<(), BoxError> {
    let broker_url = command
        .worker
        .broker_url
        .get_or_insert_with(|| DEFAULT_BROKER_URL.to_owned())
        .clone();
    match &command.worker.results_url {
        Some(_) => {}
        None if broker_url.to_ascii_lowercase().starts_with("redis") => command.worker.results_url = Some(broker_url),
        None => {
            let scheme = broker_url.split(':').next().unwrap_or_default();
            return Err(format!(
                "the actors store results and a {scheme}:// broker keeps none: pass --results-url redis://HOST:6379/0 \
                 (where Python's RedisBackend keeps them)"
            )
            .into());
        }
    }
    if command.worker.state_url.is_none() {
        command.worker.state_url.clone_from(&command.worker.results_url);
    }
    Ok(())
}

/// Runs a worker with the interop actors until SIGINT or SIGTERM (`troupe::run_worker_with`),
/// each call printed as a JSON line on stdout, cancellation requests read from the state
/// backend (see [`worker_defaults`]). Returns Dramatiq's exit code (0 clean, 2 bad
/// configuration, 3 broker, results or state backend unreachable).
///
/// # Errors
/// No results URL (the broker is not Redis, `amqp://` say, and no `--results-url`).
pub async fn worker(mut command: WorkerCommand) -> Result<u8, BoxError> {
    worker_defaults(&mut command)?;
    PRINT_CALLS.store(true, Ordering::Relaxed);
    let queue = command.actor_queue;
    Ok(troupe::run_worker_status_with(command.worker, |backends| {
        let results = backends
            .results
            .ok_or_else(|| troupe::Error::Config("the interop actors need a results backend".into()))?;
        build_app_with(backends.broker, results, backends.state, &queue)
    })
    .await)
}

/// Builds the message `args` describe (by actor name, so no actor is registered), enqueues it
/// through an app without actors, prints its `message_id` on `out` and returns it as enqueued
/// (on `q.DQ` with an `eta` when delayed).
///
/// # Errors
/// Bad JSON in `--args`, `--kwargs` or `--option`, an invalid queue name, or a broker error.
pub async fn send(args: SendArgs, out: &mut dyn Write) -> Result<Message, BoxError> {
    let positional: Vec<Value> =
        serde_json::from_str(&args.args).map_err(|e| format!("--args must be a JSON array: {e}"))?;
    let kwargs: Map<String, Value> = match &args.kwargs {
        Some(text) => serde_json::from_str(text).map_err(|e| format!("--kwargs must be a JSON object: {e}"))?,
        None => Map::new(),
    };
    let mut message = Message::new(args.queue, args.actor, positional, kwargs);
    for option in &args.options {
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| format!("--option {option:?} is not KEY=JSON"))?;
        let value: Value =
            serde_json::from_str(value).map_err(|e| format!("--option {key}: {value:?} is not JSON: {e}"))?;
        message.options.insert(key.to_owned(), value);
    }
    let app = App::builder(troupe::connect(&args.broker_url).await?).build()?;
    let enqueued = app.enqueue(message, args.delay_ms.map(Duration::from_millis)).await?;
    writeln!(out, "{}", enqueued.message_id)?;
    Ok(enqueued)
}

/// Cancels the message `args` names through an app without actors (its broker in memory, only
/// its state backend is used), prints the outcome on `out` as one word (`cancelled`,
/// `aborting`, `running`, `finished:STATUS`, `unknown`) and returns it.
///
/// # Errors
/// A bad state URL, or a state backend error.
pub async fn cancel(args: CancelArgs, out: &mut dyn Write) -> Result<CancelOutcome, BoxError> {
    let state = connect_state(&args.state_url).await?;
    let app = App::builder(connect("memory://").await?).state(state).build()?;
    let outcome = app.cancel_with(&args.message_id, args.mode.into()).await?;
    writeln!(out, "{}", outcome_word(&outcome))?;
    Ok(outcome)
}

/// Runs the group `args` describe (`group([...]).add_completion_callback(...)`) through an app
/// with the state backend of `--state-url` and no actors, prints
/// `{"group", "children": [ids], "callback": id}` on `out` and returns it.
///
/// # Errors
/// Bad JSON in `--children` or `--callback`, a bad URL, or a broker or state backend error.
pub async fn run_group(args: GroupArgs, out: &mut dyn Write) -> Result<Value, BoxError> {
    let message = |spec: &Value| -> Result<Message, BoxError> {
        let actor = spec["actor"].as_str().ok_or("each message needs an \"actor\"")?;
        let positional = spec.get("args").and_then(Value::as_array).cloned().unwrap_or_default();
        Ok(Message::new(args.queue.clone(), actor, positional, Map::new()))
    };
    let children: Vec<Value> =
        serde_json::from_str(&args.children).map_err(|e| format!("--children must be a JSON list: {e}"))?;
    let children = children.iter().map(message).collect::<Result<Vec<_>, _>>()?;
    let callback: Value =
        serde_json::from_str(&args.callback).map_err(|e| format!("--callback must be a JSON object: {e}"))?;
    let callback = message(&callback)?;
    let state = connect_state(&args.state_url).await?;
    let app = App::builder(troupe::connect(&args.broker_url).await?)
        .state(state)
        .build()?;
    let ids: Vec<String> = children.iter().map(|m| m.message_id.clone()).collect();
    let id = troupe::group(children)
        .add_completion_callback(callback.clone())
        .run(&app, None)
        .await?;
    let printed = json!({"group": id, "children": ids, "callback": callback.message_id});
    writeln!(out, "{printed}")?;
    Ok(printed)
}

/// The word `cancel` prints for `outcome`.
#[must_use]
pub fn outcome_word(outcome: &CancelOutcome) -> String {
    match outcome {
        CancelOutcome::Cancelled => "cancelled".into(),
        CancelOutcome::Aborting => "aborting".into(),
        CancelOutcome::Running => "running".into(),
        CancelOutcome::Finished(status) => format!("finished:{status}"),
        CancelOutcome::Unknown => "unknown".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[tokio::main]
async fn main() -> Result<ExitCode, BoxError> {
    match <Cli as clap::Parser>::parse().command {
        Command::Worker(command) => Ok(ExitCode::from(worker(command).await?)),
        Command::Send(args) => {
            send(args, &mut std::io::stdout()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel(args) => {
            cancel(args, &mut std::io::stdout()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Group(args) => {
            run_group(args, &mut std::io::stdout()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
