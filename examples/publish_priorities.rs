//! A publish service with priorities, task states, cancellation and a manual-review table, after
//! a team that moved its in-memory `PriorityQueue` of social-media posts to a durable task queue
//! and kept its own `publish_task_state` table next to it. Here the library keeps the states:
//!
//! * `publish_single` and `publish_batch` (queue `publish`) post to a platform; every message is
//!   sent with its own priority (`SendOptions::priority`, lower runs first, as the team's
//!   0-9 scale), which the broker itself orders by (every broker does);
//! * `track_tasks` records every message's state in the state backend (enqueued, running,
//!   retrying, succeeded, failed, cancelled, with times, attempts and the last error), and the
//!   run prints them from `App::tasks` and `App::task_counts`; `publish_batch` reports its
//!   progress (`{"published": k, "of": n}`) on its record with `current_task()?.report_progress`;
//! * a user withdraws a post before it goes out: `App::cancel` on its message id, and the worker
//!   never runs it (its state is `cancelled`);
//! * a task whose retries are exhausted is sent to `to_manual_review` (the actor option
//!   `on_retry_exhausted`), which inserts it into a `manual_review` table.
//!
//! ```text
//! cargo run --example publish_priorities                                     # ./troupe-publish.db
//! cargo run --example publish_priorities -- --broker-url sqlite:///tmp/p.db
//! cargo run --example publish_priorities -- --broker-url memory://           # states in memory
//! cargo run --example publish_priorities --all-features -- --broker-url redis://localhost:6379
//! cargo run --example publish_priorities --all-features -- \
//!     --broker-url amqp://localhost:5672 --state-url redis://localhost:6379
//! ```
//!
//! The worker runs one message at a time so the order is easy to read. Task states are kept by
//! the state backend of `--state-url`, by default the broker's own URL when it can keep state
//! (SQLite, Redis, PostgreSQL, memory); with RabbitMQ and no `--state-url` there is none, so the
//! states and the cancellation are skipped. The `manual_review` table is kept in the broker's
//! file when the broker is SQLite, in memory otherwise.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Row;
use troupe::prelude::*;
use troupe::sqlite::{SqliteBroker, SqlitePool, SqliteState};
use troupe::{TaskRecord, now_ms, redact_url};

/// The error type of `run`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Queues this example consumes.
pub const QUEUES: [&str; 2] = ["publish", "manual_review"];

/// Command-line flags.
#[derive(Clone, Debug, clap::Parser)]
#[command(about = "Publish service: per-message priorities, task states, cancellation, manual review")]
pub struct Args {
    /// Broker URL (sqlite://PATH also keeps the review table; memory://, redis://, ...).
    #[arg(long, env = "TROUPE_BROKER_URL", default_value = "sqlite://troupe-publish.db")]
    pub broker_url: String,
    /// State backend URL for task states and cancellation (sqlite://, redis://, postgres://,
    /// memory://). Default: the broker URL, when that backend can keep state.
    #[arg(long, env = "TROUPE_STATE_URL")]
    pub state_url: Option<String>,
}

/// One post to publish.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishTask {
    /// Our id for it.
    pub task_id: String,
    /// douyin, kuaishou, xiaohongshu, bilibili, weibo.
    pub platform: String,
    /// The account it is posted from; `*-expired` accounts have an expired login.
    pub account: String,
    /// The post's title.
    pub title: String,
}

/// What the API receives: single posts and batches, each with a priority (0 most urgent).
#[must_use]
pub fn sample_requests() -> Vec<(i32, Request)> {
    let task = |id: &str, platform: &str, account: &str, title: &str| PublishTask {
        task_id: id.to_owned(),
        platform: platform.to_owned(),
        account: account.to_owned(),
        title: title.to_owned(),
    };
    vec![
        (
            5,
            Request::Single(task("t-01", "douyin", "brand-main", "Spring launch teaser")),
        ),
        (
            0,
            Request::Single(task("t-02", "xiaohongshu", "brand-main", "Price drop: today only")),
        ),
        (
            9,
            Request::Single(task("t-03", "bilibili", "brand-main", "Weekly vlog #12")),
        ),
        (
            1,
            Request::Single(task("t-04", "kuaishou", "shop-expired", "Flash sale starts now")),
        ),
        (
            3,
            Request::Single(task("t-05", "douyin", "brand-main", "Behind the scenes")),
        ),
        (
            2,
            Request::Batch(
                "b-01".to_owned(),
                vec![
                    task("b-01-a", "kuaishou", "brand-main", "Store opening"),
                    task("b-01-b", "xiaohongshu", "brand-main", "Store opening"),
                ],
            ),
        ),
        (
            7,
            Request::Batch(
                "b-02".to_owned(),
                vec![
                    task("b-02-a", "bilibili", "brand-main", "Customer stories"),
                    task("b-02-b", "weibo", "agency-expired", "Customer stories"),
                ],
            ),
        ),
    ]
}

/// A publish request.
#[derive(Clone, Debug)]
pub enum Request {
    /// One post.
    Single(PublishTask),
    /// A batch id and its posts.
    Batch(String, Vec<PublishTask>),
}

// The seed team turned automatic retries off (a failure went straight to manual review); one
// quick retry (100 ms backoff instead of seconds) shows both a failure that recovers and one that
// ends in review. With `max_retries = 0` every failure goes to review at once.

/// Publishes one post.
#[troupe::actor(
    queue_name = "publish",
    max_retries = 1,
    min_backoff = "100ms",
    max_backoff = "1s",
    on_retry_exhausted = "to_manual_review"
)]
async fn publish_single(task: PublishTask) -> Result<String, ActorError> {
    let attempt = attempt();
    let result = publish(&task, attempt).await;
    services()?.ran(&task.task_id, "publish_single", attempt, result.as_ref().err());
    result
}

/// Publishes a batch of posts, reporting `{"published": k, "of": n}` on its task record after each
/// post; one failure fails the batch. (A retry publishes the whole batch again; real code would
/// skip the posts already out.)
#[troupe::actor(
    queue_name = "publish",
    max_retries = 1,
    min_backoff = "100ms",
    max_backoff = "1s",
    on_retry_exhausted = "to_manual_review"
)]
async fn publish_batch(batch_id: String, tasks: Vec<PublishTask>) -> Result<usize, ActorError> {
    let services = services()?;
    let attempt = attempt();
    let mut result = Ok(tasks.len());
    for (done, task) in tasks.iter().enumerate() {
        if let Err(e) = publish(task, attempt).await {
            result = Err(ActorError::new(
                e.type_name().to_owned(),
                format!("{done} of {} posts published; {}", tasks.len(), e.message()),
            ));
            break;
        }
        services
            .report_progress(json!({"published": done + 1, "of": tasks.len()}))
            .await;
    }
    services.ran(&batch_id, "publish_batch", attempt, result.as_ref().err());
    result
}

/// Receives `(message, {"retries", "max_retries"})` when a publish task has used up its
/// retries, and files it for manual review.
#[troupe::actor(queue_name = "manual_review")]
async fn to_manual_review(message: Message, info: Value) -> Result<(), ActorError> {
    let error = message
        .options
        .get("traceback")
        .and_then(Value::as_str)
        .and_then(|t| t.lines().next())
        .unwrap_or("")
        .to_owned();
    let row = ReviewRow {
        message_id: message.message_id.clone(),
        actor: message.actor_name.clone(),
        task_id: task_label(&message),
        error,
        retries: info.get("retries").and_then(Value::as_u64).unwrap_or(0),
        max_retries: info.get("max_retries").and_then(Value::as_u64),
    };
    services()?.file_for_review(row).await
}

/// The pretend platform API: expired logins always fail; douyin uploads time out on the first
/// attempt.
async fn publish(task: &PublishTask, attempt: u64) -> Result<String, ActorError> {
    tokio::time::sleep(Duration::from_millis(10)).await;
    if task.account.ends_with("-expired") {
        return Err(ActorError::new(
            "LoginExpired",
            format!(
                "{}: the {} login of {} expired",
                task.task_id, task.platform, task.account
            ),
        ));
    }
    if task.platform == "douyin" && attempt == 1 {
        return Err(ActorError::new(
            "UploadTimeout",
            format!("{}: douyin upload timed out", task.task_id),
        ));
    }
    Ok(format!("{} published on {}", task.title, task.platform))
}

fn attempt() -> u64 {
    current_message().map_or(0, |m| m.retries()) + 1
}

/// The task id of a publish message: the task's id, or the batch id.
fn task_label(message: &Message) -> String {
    match message.args.first() {
        Some(Value::String(batch_id)) => batch_id.clone(),
        Some(task) => task.get("task_id").and_then(Value::as_str).unwrap_or("?").to_owned(),
        None => "?".to_owned(),
    }
}

/// One attempt, in the order they ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ran {
    /// Task or batch id.
    pub task_id: String,
    /// The actor.
    pub actor: String,
    /// The message's priority.
    pub priority: i64,
    /// 1 for the first attempt.
    pub attempt: u64,
    /// The error, when it failed.
    pub error: Option<String>,
}

/// A row of the `manual_review` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewRow {
    /// The failed message.
    pub message_id: String,
    /// Its actor.
    pub actor: String,
    /// Task or batch id.
    pub task_id: String,
    /// The last error's first line.
    pub error: String,
    /// Retries made.
    pub retries: u64,
    /// The retry limit.
    pub max_retries: Option<u64>,
}

/// A message this run sent: the ids to find its task record by, and its priority (the record
/// does not keep the message's options).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The message id (`Sent::message_id`).
    pub message_id: String,
    /// Task or batch id.
    pub task_id: String,
    /// The actor.
    pub actor: String,
    /// The message's priority.
    pub priority: i32,
}

/// What the actors share: the database (when the broker is SQLite), whether task states are
/// kept, and the run's records.
#[derive(Clone, Debug)]
pub struct Services {
    run_id: i64,
    pool: Option<SqlitePool>,
    tracking: bool,
    order: Arc<Mutex<Vec<Ran>>>,
    reviews: Arc<Mutex<Vec<ReviewRow>>>,
}

impl Services {
    /// Stores `progress` on the running task's record, when the app keeps task states. A
    /// progress that cannot be stored does not fail the publish (the posts are already out).
    async fn report_progress(&self, progress: Value) {
        if !self.tracking {
            return;
        }
        let stored = match current_task() {
            Ok(task) => task.report_progress(progress).await,
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            eprintln!("progress not stored: {e}");
        }
    }

    fn ran(&self, task_id: &str, actor: &str, attempt: u64, error: Option<&ActorError>) {
        let priority = current_message()
            .and_then(|m| m.options.get("troupe_priority").and_then(Value::as_i64))
            .unwrap_or(0);
        self.order.lock().unwrap_or_else(PoisonError::into_inner).push(Ran {
            task_id: task_id.to_owned(),
            actor: actor.to_owned(),
            priority,
            attempt,
            error: error.map(ToString::to_string),
        });
    }

    async fn file_for_review(&self, row: ReviewRow) -> Result<(), ActorError> {
        match &self.pool {
            Some(pool) => {
                sqlx::query(
                    "INSERT INTO manual_review (run_id, message_id, actor, task_id, error, retries, max_retries, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .bind(self.run_id)
                .bind(&row.message_id)
                .bind(&row.actor)
                .bind(&row.task_id)
                .bind(&row.error)
                .bind(i64::try_from(row.retries).unwrap_or(i64::MAX))
                .bind(row.max_retries.and_then(|m| i64::try_from(m).ok()))
                .bind(now())
                .execute(pool)
                .await?;
            }
            None => self.reviews.lock().unwrap_or_else(PoisonError::into_inner).push(row),
        }
        Ok(())
    }
}

tokio::task_local! {
    static SERVICES: Services;
}

fn services() -> Result<Services, ActorError> {
    SERVICES
        .try_with(Clone::clone)
        .map_err(|_| ActorError::new("NoServices", "actor called outside of a worker with ProvideServices"))
}

/// Makes [`Services`] available to actors while they run.
#[derive(Debug)]
pub struct ProvideServices(pub Services);

#[troupe::async_trait]
impl Middleware for ProvideServices {
    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        SERVICES.scope(self.0.clone(), next.run(cx)).await
    }
}

fn now() -> i64 {
    i64::try_from(now_ms()).unwrap_or(i64::MAX)
}

/// Creates the example's `manual_review` table in the broker's SQLite file.
async fn create_tables(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS manual_review (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER NOT NULL,
            message_id TEXT NOT NULL,
            actor TEXT NOT NULL,
            task_id TEXT NOT NULL,
            error TEXT NOT NULL,
            retries INTEGER NOT NULL,
            max_retries INTEGER,
            created_at INTEGER NOT NULL
        )",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Every message sent, in arrival order.
    pub submitted: Vec<Submitted>,
    /// The withdrawn post (`t-03`) and what `App::cancel` answered (None without task states).
    pub cancelled: Option<(Submitted, CancelOutcome)>,
    /// Every attempt, in the order it ran.
    pub order: Vec<Ran>,
    /// The manual-review rows of this run.
    pub reviews: Vec<ReviewRow>,
    /// The library's records of this run's publish messages, by priority then send time (None
    /// without a state backend).
    pub states: Option<Vec<TaskRecord>>,
}

impl Summary {
    /// The record of the message of task or batch `task_id`, when states are kept.
    #[must_use]
    pub fn record(&self, task_id: &str) -> Option<&TaskRecord> {
        let sent = self.submitted.iter().find(|s| s.task_id == task_id)?;
        self.states.as_ref()?.iter().find(|r| r.message_id == sent.message_id)
    }
}

/// The post a user withdraws before the worker starts.
pub const WITHDRAWN: &str = "t-03";

/// The state backend URL: `--state-url`, else the broker URL when its backend keeps state.
fn state_url(args: &Args) -> Option<String> {
    if let Some(url) = &args.state_url {
        return Some(url.clone());
    }
    let scheme = args.broker_url.split_once(':').map_or("", |(scheme, _)| scheme);
    let keeps_state = matches!(
        scheme,
        "sqlite" | "memory" | "redis" | "rediss" | "redis+unix" | "postgres" | "postgresql"
    );
    keeps_state.then(|| args.broker_url.clone())
}

/// Sends the sample requests with their priorities, withdraws one, runs a one-at-a-time worker
/// until all is done, and prints the run order, the task states and the manual-review rows to
/// `out`.
///
/// # Errors
/// A broker, state backend or database error, or processing that does not finish within 30 s.
pub async fn run(args: Args, out: &mut dyn Write) -> Result<Summary, BoxError> {
    let started = Instant::now();
    let run_id = now();
    let run_start = now_ms();
    writeln!(out, "broker: {}", redact_url(&args.broker_url))?;
    let (broker, pool): (Arc<dyn Broker>, Option<SqlitePool>) = if args.broker_url.starts_with("sqlite:") {
        let broker = SqliteBroker::connect(&args.broker_url).await?;
        let pool = broker.pool().clone();
        create_tables(&pool).await?;
        writeln!(out, "failed tasks in table manual_review (same file)")?;
        (Arc::new(broker), Some(pool))
    } else {
        writeln!(
            out,
            "not an SQLite broker, so the manual-review rows are kept in memory"
        )?;
        (troupe::connect(&args.broker_url).await?, None)
    };
    let state = match state_url(&args) {
        // The broker's own file: share its pool.
        Some(url) if url == args.broker_url && pool.is_some() => {
            writeln!(out, "task states: tracked in the broker's file (troupe_tasks)")?;
            pool.clone().map(|pool| SqliteState::from_pool(pool).into_dyn())
        }
        Some(url) => {
            writeln!(out, "task states: tracked in {}", redact_url(&url))?;
            Some(connect_state(&url).await?)
        }
        None => {
            writeln!(
                out,
                "task states: skipped ({} keeps no state; pass --state-url), and so is the cancellation",
                redact_url(&args.broker_url)
            )?;
            None
        }
    };
    let services = Services {
        run_id,
        pool: pool.clone(),
        tracking: state.is_some(),
        order: Arc::default(),
        reviews: Arc::default(),
    };
    let mut builder = App::builder(broker)
        .middleware(ProvideServices(services.clone()))
        .actor(PublishSingle)
        .actor(PublishBatch)
        .actor(ToManualReview);
    if let Some(state) = state {
        builder = builder.state(state).track_tasks(TaskTracking::default());
    }
    let app = builder.build()?;

    // Producer: the API accepts requests in arrival order, each with its priority.
    writeln!(out, "\nsent (arrival order):")?;
    let mut submitted = Vec::new();
    for (priority, request) in sample_requests() {
        let options = SendOptions::new().priority(priority);
        let (task_id, actor, message_id) = match request {
            Request::Single(task) => {
                writeln!(out, "  p{priority} {} publish_single ({})", task.task_id, task.title)?;
                let task_id = task.task_id.clone();
                let sent = PublishSingle.send_with_options(&app, task, options).await?;
                (task_id, "publish_single", sent.message_id().to_owned())
            }
            Request::Batch(batch_id, tasks) => {
                writeln!(out, "  p{priority} {batch_id} publish_batch ({} posts)", tasks.len())?;
                let sent = PublishBatch
                    .send_with_options(&app, batch_id.clone(), tasks, options)
                    .await?;
                (batch_id, "publish_batch", sent.message_id().to_owned())
            }
        };
        submitted.push(Submitted {
            message_id,
            task_id,
            actor: actor.to_owned(),
            priority,
        });
    }

    // The author of one post withdraws it before it goes out.
    let cancelled = match submitted.iter().find(|s| s.task_id == WITHDRAWN) {
        Some(withdrawn) if services.tracking => {
            let outcome = app.cancel(&withdrawn.message_id).await?;
            let status = app
                .task(&withdrawn.message_id)
                .await?
                .map_or_else(|| "no record".to_owned(), |r| r.status.to_string());
            writeln!(
                out,
                "\nwithdrawn by its author: p{} {} -> {outcome:?} (state now {status}; it will not run)",
                withdrawn.priority, withdrawn.task_id
            )?;
            Some((withdrawn.clone(), outcome))
        }
        _ => None,
    };

    // Worker: one message at a time, so the order is the broker's order.
    let worker = Worker::builder(app.clone()).concurrency(1).start().await?;
    let drained = wait_until_drained(&app, Duration::from_secs(30)).await;
    worker.stop().await;
    drained?;

    let order = services.order.lock().unwrap_or_else(PoisonError::into_inner).clone();
    writeln!(
        out,
        "\nrun order (lower priority number first; retries come back after their backoff):"
    )?;
    for (n, ran) in order.iter().enumerate() {
        let outcome = ran.error.as_deref().unwrap_or("ok");
        writeln!(
            out,
            "  {:>2}. p{} {:<5} {:<15} attempt {}  {outcome}",
            n + 1,
            ran.priority,
            ran.task_id,
            ran.actor,
            ran.attempt
        )?;
    }

    let states = if services.tracking {
        let states = publish_records(&app, run_start, &submitted).await?;
        print_states(out, &states, &submitted, run_start)?;
        let counts = app.task_counts(&TaskFilter::new().queue("publish")).await?;
        let per_status: Vec<String> = counts.by_status.iter().map(|(s, n)| format!("{s} {n}")).collect();
        writeln!(
            out,
            "all publish tasks the state backend keeps (this and earlier runs, 7 days): {}",
            per_status.join(", ")
        )?;
        Some(states)
    } else {
        writeln!(out, "\ntask states: skipped (no state backend)")?;
        None
    };

    let reviews = match &pool {
        Some(pool) => read_reviews(pool, run_id).await?,
        None => services.reviews.lock().unwrap_or_else(PoisonError::into_inner).clone(),
    };
    writeln!(out, "\nmanual review ({} rows):", reviews.len())?;
    for r in &reviews {
        writeln!(
            out,
            "  {:<5} {:<15} retries {}/{}  {}",
            r.task_id,
            r.actor,
            r.retries,
            r.max_retries.map_or_else(|| "-".to_owned(), |m| m.to_string()),
            r.error
        )?;
    }
    writeln!(out, "\ndone in {:.1?}", started.elapsed())?;
    Ok(Summary {
        submitted,
        cancelled,
        order,
        reviews,
        states,
    })
}

/// The records of this run's publish messages, read a page at a time (pages are newest first),
/// ordered by priority, then by when they were sent.
async fn publish_records(app: &App, since: u64, submitted: &[Submitted]) -> Result<Vec<TaskRecord>, BoxError> {
    let ours: HashMap<&str, i32> = submitted.iter().map(|s| (s.message_id.as_str(), s.priority)).collect();
    let mut query = TaskQuery::new(TaskFilter::new().queue("publish").since(since)).limit(20);
    let mut records = Vec::new();
    loop {
        let page = app.tasks(&query).await?;
        // Another process may share the backend: keep the messages this run sent.
        records.extend(
            page.tasks
                .into_iter()
                .filter(|r| ours.contains_key(r.message_id.as_str())),
        );
        match page.next {
            Some(next) => query = query.after(next),
            None => break,
        }
    }
    records.sort_by_key(|r| (ours.get(r.message_id.as_str()).copied(), r.enqueued_at));
    Ok(records)
}

/// Prints the task table: label, actor, priority, status, attempts, times from the first send,
/// progress and the last error.
fn print_states(
    out: &mut dyn Write,
    states: &[TaskRecord],
    submitted: &[Submitted],
    run_start: u64,
) -> std::io::Result<()> {
    let by_id: HashMap<&str, &Submitted> = submitted.iter().map(|s| (s.message_id.as_str(), s)).collect();
    writeln!(out, "\ntask states (the library's records; times from the first send):")?;
    writeln!(
        out,
        "  {:<5} {:<15} {:>4} {:<9} {:>8} {:>8} {:>8} {:>9}  {:<10} last error",
        "task", "actor", "prio", "status", "attempts", "queued", "started", "finished", "progress"
    )?;
    let at = |t: Option<u64>| t.map_or_else(|| "-".to_owned(), |t| format!("+{}ms", t.saturating_sub(run_start)));
    for r in states {
        let sent = by_id.get(r.message_id.as_str());
        let progress = match &r.progress {
            Some(p) => format!("{}/{}", p["published"], p["of"]),
            None => "-".to_owned(),
        };
        let error = match (&r.error_type, &r.error) {
            (Some(kind), Some(text)) => format!("{kind}: {text}"),
            (None, Some(text)) => text.clone(),
            _ => String::new(),
        };
        writeln!(
            out,
            "  {:<5} {:<15} {:>4} {:<9} {:>8} {:>8} {:>8} {:>9}  {:<10} {}",
            sent.map_or("?", |s| s.task_id.as_str()),
            r.actor,
            sent.map_or_else(|| "?".to_owned(), |s| s.priority.to_string()),
            r.status.as_str(),
            r.attempts,
            at(Some(r.enqueued_at)),
            at(r.started_at),
            at(r.finished_at),
            progress,
            error.lines().next().unwrap_or("")
        )?;
    }
    Ok(())
}

async fn read_reviews(pool: &SqlitePool, run_id: i64) -> Result<Vec<ReviewRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT message_id, actor, task_id, error, retries, max_retries FROM manual_review
         WHERE run_id = ?1 ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ReviewRow {
                message_id: r.try_get(0)?,
                actor: r.try_get(1)?,
                task_id: r.try_get(2)?,
                error: r.try_get(3)?,
                retries: u64::try_from(r.try_get::<i64, _>(4)?).unwrap_or(0),
                max_retries: r.try_get::<Option<i64>, _>(5)?.and_then(|m| u64::try_from(m).ok()),
            })
        })
        .collect()
}

/// Waits until no message of [`QUEUES`] is ready, delayed or in flight ([`App::join`]).
async fn wait_until_drained(app: &App, timeout: Duration) -> Result<(), BoxError> {
    let deadline = Instant::now() + timeout;
    // Messages only flow forward through QUEUES (publish hands failures to manual_review), so once each queue is
    // joined in that order, all are drained. Failures are expected: no fail-fast.
    for queue in QUEUES {
        let left = deadline.saturating_duration_since(Instant::now());
        app.join_with(queue, left, JoinOptions::new().fail_fast(false)).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = <Args as clap::Parser>::parse();
    let summary = run(args, &mut std::io::stdout()).await?;
    if summary.order.is_empty() {
        return Err("nothing ran".into());
    }
    Ok(())
}
