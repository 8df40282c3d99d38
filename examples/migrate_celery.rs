//! A Celery workflow, moved to Troupe (`docs/migrating-from-celery.md`), on the embedded SQLite
//! broker: one file holds the queue, the results and the task states, so no server is needed.
//!
//! | Celery | here |
//! |---|---|
//! | `@app.task(autoretry_for=..., max_retries=3, retry_backoff=True)` | `#[troupe::actor(max_retries = 3, min_backoff = ..)]`, an `Err` retries |
//! | `task.apply_async(args, countdown=0.3, priority=p)` | `send_with_options(.., SendOptions::new().delay(..).priority(..))` |
//! | `AsyncResult(id).state` (PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED) | `app.task(id)`'s `status` |
//! | `AsyncResult(id).get(timeout=..)` | `sent.wait(timeout)` |
//! | `app.control.revoke(id)` before it starts | `app.cancel(id)`: the worker skips it |
//! | `chord(group(...), callback)` without the results | `group([..]).add_completion_callback(..)` |
//! | `chord(group(...), callback)` with the results | `pipeline([group([..]), callback])` |
//!
//! ```text
//! cargo run --example migrate_celery                          # ./troupe-celery.db
//! cargo run --example migrate_celery -- sqlite:///tmp/c.db    # another file
//! ```
//!
//! Afterwards `troupe --broker-url sqlite://troupe-celery.db tasks list` lists the same states
//! (the `troupe` command: `cargo run -p troupe-cli -- ...`).

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use troupe::prelude::*;
use troupe::sqlite::{SqliteBroker, SqliteResults, SqliteState};
use troupe::{TaskRecord, TaskStatus, now_ms, redact_url};

/// The error type of `run`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Celery's default queue name, kept so the routing reads the same.
pub const QUEUE: &str = "celery";

/// Celery on Redis orders priorities 0 (first) to 9 (last): Troupe's direction, so the number
/// carries over as it is.
#[must_use]
pub fn from_celery_redis_priority(priority: u8) -> i32 {
    i32::from(priority.min(9))
}

/// Celery on RabbitMQ runs the higher number first (AMQP priorities, 0 to `x-max-priority`):
/// the opposite direction, so it becomes a negative Troupe priority (clamped to -10).
#[must_use]
pub fn from_celery_rabbitmq_priority(priority: u8) -> i32 {
    -i32::from(priority.min(10))
}

/// The Celery state name of a Troupe task status, for dashboards and scripts that expect them.
#[must_use]
pub fn celery_state(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Enqueued | TaskStatus::Delayed => "PENDING",
        TaskStatus::Running => "STARTED",
        TaskStatus::Retrying => "RETRY",
        TaskStatus::Succeeded => "SUCCESS",
        TaskStatus::Failed => "FAILURE",
        TaskStatus::Cancelled => "REVOKED",
        TaskStatus::Skipped => "IGNORED",
        _ => "UNKNOWN",
    }
}

/// Publishes a post. Posts named `flaky-*` lose their connection on the first attempt and are
/// retried (Celery: `autoretry_for=(ConnectionError,)`).
#[troupe::actor(
    queue_name = "celery",
    max_retries = 3,
    min_backoff = "100ms",
    max_backoff = "1s",
    store_results = true
)]
async fn publish(post: String) -> Result<String, ActorError> {
    let attempt = journal()?.ran("publish", &post);
    if post.starts_with("flaky") && attempt == 1 {
        return Err(ActorError::new(
            "ConnectionError",
            format!("the platform dropped the connection while publishing {post}"),
        ));
    }
    Ok(format!("{post} published"))
}

/// Imports a feed that no longer exists: it fails for good (Celery: `max_retries=0`, state
/// FAILURE) and lands in the dead letters.
#[troupe::actor(queue_name = "celery", max_retries = 0)]
async fn import_feed(url: String) -> Result<(), ActorError> {
    journal()?.ran("import_feed", &url);
    Err(ActorError::new("FeedGone", format!("{url} answered 410 Gone")))
}

/// Makes a thumbnail: a member of the groups below.
#[troupe::actor(queue_name = "celery", store_results = true)]
async fn thumbnail(image: String) -> Result<String, ActorError> {
    journal()?.ran("thumbnail", &image);
    Ok(format!("{image}.thumb"))
}

/// The completion callback of a group: sent once, when every member succeeded.
#[troupe::actor(queue_name = "celery")]
async fn notify(batch: String) -> Result<(), ActorError> {
    journal()?.ran("notify", &batch);
    Ok(())
}

/// A chord's body: gets the group's results, in order, as its last argument.
#[troupe::actor(queue_name = "celery", store_results = true)]
async fn make_album(name: String, thumbnails: Vec<String>) -> Result<String, ActorError> {
    journal()?.ran("make_album", &name);
    Ok(format!("{name}: {}", thumbnails.join(", ")))
}

/// One attempt of an actor, in the order they ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ran {
    /// The actor.
    pub actor: String,
    /// Its first argument.
    pub arg: String,
    /// 1 for the first attempt.
    pub attempt: u64,
}

/// What the actors record their attempts in.
#[derive(Clone, Debug, Default)]
pub struct Journal(Arc<Mutex<Vec<Ran>>>);

impl Journal {
    /// Records an attempt of `actor` on `arg`; returns its number (1 for the first).
    fn ran(&self, actor: &str, arg: &str) -> u64 {
        let attempt = current_message().map_or(0, |m| m.retries()) + 1;
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(Ran {
            actor: actor.to_owned(),
            arg: arg.to_owned(),
            attempt,
        });
        attempt
    }

    fn entries(&self) -> Vec<Ran> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

tokio::task_local! {
    static JOURNAL: Journal;
}

fn journal() -> Result<Journal, ActorError> {
    JOURNAL
        .try_with(Clone::clone)
        .map_err(|_| ActorError::new("NoJournal", "actor called outside of a worker with ProvideJournal"))
}

/// Makes the [`Journal`] available to actors while they run.
#[derive(Debug)]
pub struct ProvideJournal(pub Journal);

#[troupe::async_trait]
impl Middleware for ProvideJournal {
    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        JOURNAL.scope(self.0.clone(), next.run(cx)).await
    }
}

/// A message this run sent, and its task record read back after the run.
#[derive(Clone, Debug)]
pub struct Tracked {
    /// What the run calls it (`urgent`, `withdrawn`, ...).
    pub label: String,
    /// Its message id (Celery's task id).
    pub message_id: String,
    /// Its record in the state backend.
    pub record: Option<TaskRecord>,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// The messages sent one by one, with their records.
    pub tracked: Vec<Tracked>,
    /// Every attempt, in the order it ran.
    pub ran: Vec<Ran>,
    /// What `App::cancel` answered for the withdrawn post.
    pub cancelled: CancelOutcome,
    /// The result of the urgent post (`AsyncResult.get()`).
    pub urgent_result: String,
    /// The chord's result: the album made from the group's thumbnails.
    pub album: Value,
    /// The records of the `notify` actor this run caused (found by actor, as Celery's
    /// "tasks of this type").
    pub notify_records: Vec<TaskRecord>,
}

impl Report {
    /// The record of the message labelled `label`.
    #[must_use]
    pub fn record(&self, label: &str) -> Option<&TaskRecord> {
        self.tracked.iter().find(|t| t.label == label)?.record.as_ref()
    }

    /// How many attempts of `actor` on `arg` ran.
    #[must_use]
    pub fn runs(&self, actor: &str, arg: &str) -> usize {
        self.ran.iter().filter(|r| r.actor == actor && r.arg == arg).count()
    }

    /// Where the first attempt of `actor` on `arg` ran in the order (0 first).
    #[must_use]
    pub fn position(&self, actor: &str, arg: &str) -> Option<usize> {
        self.ran.iter().position(|r| r.actor == actor && r.arg == arg)
    }
}

/// Sends the Celery-style workload, runs a one-at-a-time worker until it is done, and reads
/// the task states back; prints what happened to `out`.
///
/// # Errors
/// A broker, results or state error, or work that does not finish within 30 s.
pub async fn run(url: &str, out: &mut dyn Write) -> Result<Report, BoxError> {
    let started = Instant::now();
    let run_start = now_ms();
    writeln!(out, "broker, results and task states: {}", redact_url(url))?;

    // Celery: broker_url, result_backend and a task-state store, here one SQLite file.
    let broker = SqliteBroker::connect(url).await?;
    let results = SqliteResults::from_pool(broker.pool().clone());
    let state = SqliteState::from_pool(broker.pool().clone());
    let journal = Journal::default();
    let app = App::builder(Arc::new(broker))
        .results(results.into_dyn())
        .state(state.into_dyn())
        // Every message's state from the moment it is sent, kept 7 days.
        .track_tasks(TaskTracking::default())
        .middleware(ProvideJournal(journal.clone()))
        .actor(Publish)
        .actor(ImportFeed)
        .actor(Thumbnail)
        .actor(Notify)
        .actor(MakeAlbum)
        .build()?;

    // Producer. Celery: publish.apply_async(("low-1",), priority=9), and so on.
    let mut tracked = Vec::new();
    let low = Publish
        .send_with_options(
            &app,
            "low-1".into(),
            SendOptions::new().priority(from_celery_redis_priority(9)),
        )
        .await?;
    tracked.push(("low", low.message_id().to_owned()));
    let urgent = Publish
        .send_with_options(
            &app,
            "urgent-1".into(),
            SendOptions::new().priority(from_celery_redis_priority(0)),
        )
        .await?;
    tracked.push(("urgent", urgent.message_id().to_owned()));
    // countdown=0.3 (Celery's eta=datetime is the same: delay = eta - now).
    let countdown = Publish
        .send_with_options(
            &app,
            "later-1".into(),
            SendOptions::new().delay(Duration::from_millis(300)),
        )
        .await?;
    tracked.push(("countdown", countdown.message_id().to_owned()));
    let flaky = Publish.send(&app, "flaky-1".into()).await?;
    tracked.push(("flaky", flaky.message_id().to_owned()));
    let broken = ImportFeed.send(&app, "https://example.com/gone.rss".into()).await?;
    tracked.push(("broken", broken.message_id().to_owned()));
    writeln!(
        out,
        "sent: low-1 (Celery priority 9), urgent-1 (priority 0), later-1 (countdown 0.3 s), flaky-1, a dead feed"
    )?;

    // revoke(id) before it runs: a post withdrawn while it waits for its countdown.
    let withdrawn = Publish
        .send_with_options(
            &app,
            "withdrawn-1".into(),
            SendOptions::new().delay(Duration::from_millis(200)),
        )
        .await?;
    tracked.push(("withdrawn", withdrawn.message_id().to_owned()));
    let cancelled = app.cancel(withdrawn.message_id()).await?;
    writeln!(out, "withdrawn-1 cancelled while pending: {cancelled:?}")?;

    // A group with a completion callback (a chord whose body does not need the results).
    let batch = group([
        Thumbnail.message("a.jpg".into())?,
        Thumbnail.message("b.jpg".into())?,
        Thumbnail.message("c.jpg".into())?,
    ])
    .add_completion_callback(Notify.message("holiday".into())?);
    batch.run(&app, None).await?;
    // A chord whose body gets the results: a pipeline whose first stage is a group. The body
    // is built untyped, since the group's results are appended to its arguments.
    let body = Message::new(QUEUE, "make_album", vec![json!("trip")], Map::new());
    let chord = pipeline(vec![
        Stage::from(group([
            Thumbnail.message("x.jpg".into())?,
            Thumbnail.message("y.jpg".into())?,
        ])),
        Stage::from(body),
    ])?;
    chord.run(&app, None).await?;
    writeln!(
        out,
        "sent: a group of three thumbnails with a completion callback, and a chord of two"
    )?;

    // Before any worker runs, everything is pending (Celery's PENDING).
    let before = app.task(urgent.message_id()).await?.map(|r| r.status);
    writeln!(out, "urgent-1 before the worker starts: {before:?}")?;

    // Worker: one message at a time, so the priority order is easy to see.
    let worker = Worker::builder(app.clone()).concurrency(1).start().await?;
    let done = async {
        let timeout = Duration::from_secs(30);
        let urgent_result = urgent.wait(timeout).await?;
        batch.wait(&app, timeout).await?;
        let album = chord.get_result(&app, Some(timeout)).await?;
        // Then nothing ready, delayed (the retry, the countdown) or in flight; failures are
        // expected, so no fail-fast.
        app.join_with(QUEUE, timeout, JoinOptions::new().fail_fast(false))
            .await?;
        Ok::<_, BoxError>((urgent_result, album))
    }
    .await;
    worker.stop().await;
    let (urgent_result, album) = done?;

    // Read the states back, as Celery's AsyncResult(id).state would.
    let mut report_tracked = Vec::new();
    writeln!(
        out,
        "\ntask states (Troupe status, the Celery name, attempts, last error):"
    )?;
    for (label, message_id) in tracked {
        let record = app.task(&message_id).await?;
        match &record {
            Some(r) => writeln!(
                out,
                "  {label:<10} {:<10} {:<8} attempts {}  {}",
                r.status.as_str(),
                celery_state(r.status),
                r.attempts,
                r.error_type.as_deref().unwrap_or("")
            )?,
            None => writeln!(out, "  {label:<10} no record")?,
        }
        report_tracked.push(Tracked {
            label: label.to_owned(),
            message_id,
            record,
        });
    }
    let notify_records = app
        .tasks(&TaskQuery::new(TaskFilter::new().actor("notify").since(run_start)))
        .await?
        .tasks;
    let counts = app.task_counts(&TaskFilter::new().queue(QUEUE)).await?;
    let per_status: Vec<String> = counts.by_status.iter().map(|(s, n)| format!("{s} {n}")).collect();
    writeln!(
        out,
        "queue {QUEUE}, all records kept (this and earlier runs): {}",
        per_status.join(", ")
    )?;

    let ran = journal.entries();
    writeln!(out, "\nrun order:")?;
    for (n, r) in ran.iter().enumerate() {
        writeln!(out, "  {:>2}. {} {} (attempt {})", n + 1, r.actor, r.arg, r.attempt)?;
    }
    writeln!(out, "\nurgent-1: {urgent_result}")?;
    writeln!(out, "chord: {album}")?;
    writeln!(out, "done in {:.1?}", started.elapsed())?;
    Ok(Report {
        tracked: report_tracked,
        ran,
        cancelled,
        urgent_result,
        album,
        notify_records,
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "sqlite://troupe-celery.db".to_owned());
    if let Some(extra) = args.next() {
        return Err(format!("unexpected argument {extra:?}; usage: migrate_celery [sqlite://PATH]").into());
    }
    run(&url, &mut std::io::stdout()).await?;
    Ok(())
}
