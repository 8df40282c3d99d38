//! A publish service with priorities, task states and a manual-review table, after a team that
//! moved its in-memory `PriorityQueue` of social-media posts to a durable task queue:
//!
//! * `publish_single` and `publish_batch` (queue `publish`) post to a platform; every message is
//!   sent with its own priority (`SendOptions::priority`, lower runs first, as the team's
//!   0-9 scale), which the broker itself orders by (every broker does);
//! * a `TaskStateMiddleware` keeps a `publish_task_state` table (pending, running, success,
//!   failed, with timestamps) in the broker's SQLite file;
//! * a task whose retries are exhausted is sent to `to_manual_review` (the actor option
//!   `on_retry_exhausted`), which inserts it into a `manual_review` table.
//!
//! ```text
//! cargo run --example publish_priorities                                     # ./troupe-publish.db
//! cargo run --example publish_priorities -- --broker-url sqlite:///tmp/p.db
//! cargo run --example publish_priorities -- --broker-url memory://           # no tables
//! ```
//!
//! The worker runs one message at a time so the order is easy to read. The tables are only kept
//! when the broker is SQLite; with another broker the states are skipped and the review rows
//! kept in memory.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;
use troupe::prelude::*;
use troupe::sqlite::{SqliteBroker, SqlitePool};
use troupe::{now_ms, redact_url};

/// The error type of `run`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Queues this example consumes.
pub const QUEUES: [&str; 2] = ["publish", "manual_review"];

/// Command-line flags.
#[derive(Clone, Debug, clap::Parser)]
#[command(about = "Publish service: per-message priorities, task states, manual review")]
pub struct Args {
    /// Broker URL (sqlite://PATH keeps the state and review tables; memory://, ...).
    #[arg(long, env = "TROUPE_BROKER_URL", default_value = "sqlite://troupe-publish.db")]
    pub broker_url: String,
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

/// Publishes a batch of posts; one failure fails the batch. (A retry publishes the whole batch
/// again; real code would skip the posts already out.)
#[troupe::actor(
    queue_name = "publish",
    max_retries = 1,
    min_backoff = "100ms",
    max_backoff = "1s",
    on_retry_exhausted = "to_manual_review"
)]
async fn publish_batch(batch_id: String, tasks: Vec<PublishTask>) -> Result<usize, ActorError> {
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
    }
    services()?.ran(&batch_id, "publish_batch", attempt, result.as_ref().err());
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

/// A row of the `publish_task_state` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskState {
    /// Task or batch id.
    pub task_id: String,
    /// The actor.
    pub actor: String,
    /// The message's priority.
    pub priority: i64,
    /// pending, running, success or failed.
    pub status: String,
    /// Retries so far.
    pub retries: i64,
    /// The last error.
    pub error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    /// When the first attempt started.
    pub started_at: Option<i64>,
    /// When it succeeded or failed for good.
    pub finished_at: Option<i64>,
}

/// What the actors share: the database (when the broker is SQLite) and the run's records.
#[derive(Clone, Debug)]
pub struct Services {
    run_id: i64,
    pool: Option<SqlitePool>,
    order: Arc<Mutex<Vec<Ran>>>,
    reviews: Arc<Mutex<Vec<ReviewRow>>>,
}

impl Services {
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

/// Keeps `publish_task_state` up to date, one row per publish message: `pending` when enqueued
/// (again for a retry), `running` while an attempt runs, then `success` (`after_ack`) or `failed`
/// when its retries are exhausted (`after_nack`).
#[derive(Debug)]
pub struct TaskStateMiddleware {
    run_id: i64,
    pool: SqlitePool,
}

impl TaskStateMiddleware {
    async fn exec(&self, sql: &'static str, message_id: &str, text: Option<&str>) {
        let result = sqlx::query(sql)
            .bind(message_id)
            .bind(now())
            .bind(text)
            .execute(&self.pool)
            .await;
        if let Err(e) = result {
            eprintln!("task state of {message_id} not updated: {e}");
        }
    }
}

fn is_publish(message: &Message) -> bool {
    message.actor_name.starts_with("publish_")
}

#[troupe::async_trait]
impl Middleware for TaskStateMiddleware {
    async fn after_enqueue(&self, _app: &App, message: &Message, _delay: Option<Duration>) {
        if !is_publish(message) {
            return;
        }
        let result = sqlx::query(
            "INSERT INTO publish_task_state
                 (message_id, run_id, actor, task_id, priority, status, retries, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7, ?7)
             ON CONFLICT (message_id) DO UPDATE
                 SET status = 'pending', retries = excluded.retries, updated_at = excluded.updated_at",
        )
        .bind(&message.message_id)
        .bind(self.run_id)
        .bind(&message.actor_name)
        .bind(task_label(message))
        .bind(
            message
                .options
                .get("troupe_priority")
                .and_then(Value::as_i64)
                .unwrap_or(0),
        )
        .bind(i64::try_from(message.retries()).unwrap_or(i64::MAX))
        .bind(now())
        .execute(&self.pool)
        .await;
        if let Err(e) = result {
            eprintln!("task state of {} not recorded: {e}", message.message_id);
        }
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        if !is_publish(cx.message()) {
            return next.run(cx).await;
        }
        let id = cx.message().message_id.clone();
        self.exec(
            "UPDATE publish_task_state SET status = 'running', started_at = COALESCE(started_at, ?2),
             updated_at = ?2, error = COALESCE(?3, error) WHERE message_id = ?1",
            &id,
            None,
        )
        .await;
        let outcome = next.run(cx).await;
        if let Some(error) = outcome.error() {
            let error = error.to_string();
            self.exec(
                "UPDATE publish_task_state SET error = ?3, updated_at = ?2 WHERE message_id = ?1",
                &id,
                Some(&error),
            )
            .await;
        }
        outcome
    }

    async fn after_ack(&self, cx: &ProcessContext, outcome: &Outcome) {
        // A failed attempt is acked too when it is retried; its retry already set `pending`.
        if is_publish(cx.message()) && outcome.is_success() {
            self.exec(
                "UPDATE publish_task_state SET status = 'success', finished_at = ?2, updated_at = ?2,
                 error = COALESCE(?3, error) WHERE message_id = ?1",
                &cx.message().message_id,
                None,
            )
            .await;
        }
    }

    async fn after_nack(&self, cx: &ProcessContext, outcome: &Outcome) {
        if is_publish(cx.message()) {
            let error = outcome.error().map(ToString::to_string);
            self.exec(
                "UPDATE publish_task_state SET status = 'failed', finished_at = ?2, updated_at = ?2,
                 error = COALESCE(?3, error) WHERE message_id = ?1",
                &cx.message().message_id,
                error.as_deref(),
            )
            .await;
        }
    }
}

fn now() -> i64 {
    i64::try_from(now_ms()).unwrap_or(i64::MAX)
}

/// Creates the example's two tables in the broker's SQLite file.
async fn create_tables(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS publish_task_state (
            message_id TEXT PRIMARY KEY,
            run_id INTEGER NOT NULL,
            actor TEXT NOT NULL,
            task_id TEXT NOT NULL,
            priority INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'success', 'failed')),
            retries INTEGER NOT NULL,
            error TEXT,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            started_at INTEGER,
            finished_at INTEGER
        )",
    )
    .execute(pool)
    .await?;
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
    /// Every attempt, in the order it ran.
    pub order: Vec<Ran>,
    /// The manual-review rows of this run.
    pub reviews: Vec<ReviewRow>,
    /// The task states of this run (None when the broker is not SQLite).
    pub states: Option<Vec<TaskState>>,
}

/// Sends the sample requests with their priorities, runs a one-at-a-time worker until all is
/// done, and prints the run order, the task states and the manual-review rows to `out`.
///
/// # Errors
/// A broker or database error, or processing that does not finish within 30 s.
pub async fn run(args: Args, out: &mut dyn Write) -> Result<Summary, BoxError> {
    let started = Instant::now();
    let run_id = now();
    writeln!(out, "broker: {}", redact_url(&args.broker_url))?;
    let (broker, pool): (Arc<dyn Broker>, Option<SqlitePool>) = if args.broker_url.starts_with("sqlite:") {
        let broker = SqliteBroker::connect(&args.broker_url).await?;
        let pool = broker.pool().clone();
        create_tables(&pool).await?;
        writeln!(
            out,
            "task states in table publish_task_state, failed tasks in manual_review (same file)"
        )?;
        (Arc::new(broker), Some(pool))
    } else {
        writeln!(
            out,
            "note: not an SQLite broker, so no state table (skipped) and review rows kept in memory"
        )?;
        (troupe::connect(&args.broker_url).await?, None)
    };
    let services = Services {
        run_id,
        pool: pool.clone(),
        order: Arc::default(),
        reviews: Arc::default(),
    };
    let mut builder = App::builder(broker)
        .middleware(ProvideServices(services.clone()))
        .actor(PublishSingle)
        .actor(PublishBatch)
        .actor(ToManualReview);
    if let Some(pool) = &pool {
        builder = builder.middleware(TaskStateMiddleware {
            run_id,
            pool: pool.clone(),
        });
    }
    let app = builder.build()?;

    // Producer: the API accepts requests in arrival order, each with its priority.
    writeln!(out, "\nsent (arrival order):")?;
    for (priority, request) in sample_requests() {
        let options = SendOptions::new().priority(priority);
        match request {
            Request::Single(task) => {
                writeln!(out, "  p{priority} {} publish_single ({})", task.task_id, task.title)?;
                PublishSingle.send_with_options(&app, task, options).await?;
            }
            Request::Batch(batch_id, tasks) => {
                writeln!(out, "  p{priority} {batch_id} publish_batch ({} posts)", tasks.len())?;
                PublishBatch.send_with_options(&app, batch_id, tasks, options).await?;
            }
        }
    }

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

    let (states, reviews) = match &pool {
        Some(pool) => (
            Some(read_states(pool, run_id).await?),
            read_reviews(pool, run_id).await?,
        ),
        None => (
            None,
            services.reviews.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        ),
    };
    match &states {
        Some(states) => {
            writeln!(out, "\ntask states (publish_task_state, times from the first send):")?;
            writeln!(
                out,
                "  {:<5} {:<15} {:>4} {:<8} {:>7} {:>8} {:>8} {:>9}  last error",
                "task", "actor", "prio", "status", "retries", "queued", "started", "finished"
            )?;
            let at = |t: Option<i64>| t.map_or_else(|| "-".to_owned(), |t| format!("+{}ms", t - run_id));
            for s in states {
                writeln!(
                    out,
                    "  {:<5} {:<15} {:>4} {:<8} {:>7} {:>8} {:>8} {:>9}  {}",
                    s.task_id,
                    s.actor,
                    s.priority,
                    s.status,
                    s.retries,
                    at(Some(s.created_at)),
                    at(s.started_at),
                    at(s.finished_at),
                    s.error.as_deref().unwrap_or("")
                )?;
            }
        }
        None => writeln!(out, "\ntask states: skipped (needs the SQLite broker)")?,
    }
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
    Ok(Summary { order, reviews, states })
}

async fn read_states(pool: &SqlitePool, run_id: i64) -> Result<Vec<TaskState>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT task_id, actor, priority, status, retries, error, created_at, started_at, finished_at
         FROM publish_task_state WHERE run_id = ?1 ORDER BY priority, created_at",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(TaskState {
                task_id: r.try_get(0)?,
                actor: r.try_get(1)?,
                priority: r.try_get(2)?,
                status: r.try_get(3)?,
                retries: r.try_get(4)?,
                error: r.try_get(5)?,
                created_at: r.try_get(6)?,
                started_at: r.try_get(7)?,
                finished_at: r.try_get(8)?,
            })
        })
        .collect()
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
