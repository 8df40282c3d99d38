//! Moving off a hand-written PostgreSQL job table (`docs/migrating-from-a-postgres-table-queue.md`):
//! the jobs still waiting in the old `legacy_jobs` table become Troupe messages in one
//! transaction, which also marks the rows moved, so every job is in exactly one of the two
//! places whatever happens; then a Troupe worker runs them.
//!
//! 1. Creates an old-style `legacy_jobs` table (status column, `run_at`, attempts, a lock owner)
//!    in a schema of its own and fills it: pending jobs, one due later, one left `running` by a
//!    stopped worker, finished and failed ones, and one whose task type has no actor yet.
//! 2. Drains it once and rolls back, to show that nothing of a failed drain remains.
//! 3. Drains it for real: in one transaction on the application's own connection, reads the
//!    pending and running rows `FOR UPDATE`, enqueues one message per row with
//!    `PostgresBroker::enqueue_many_in` (priority, remaining attempts and the delay until
//!    `run_at` carried over), and marks the rows `moved` with the message id and the
//!    transaction id. Other connections see neither the messages nor the marks until it
//!    commits.
//! 4. Runs a worker (task states tracked) until the queues are drained and prints what ran.
//!
//! ```text
//! cargo run -p troupe --features broker-postgres,results-postgres --example migrate_pg_table
//! TROUPE_POSTGRES_URL=postgres://USER:PASSWORD@HOST/DB cargo run -p troupe --all-features --example migrate_pg_table -- --keep
//! ```
//!
//! The schemas it creates (`legacy_<n>` and `troupe_<n>`) are dropped at the end, unless
//! `--keep` is given; then `troupe --broker-url 'postgres://...?schema=troupe_<n>' tasks list`
//! shows the task states.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use troupe::postgres::sqlx::postgres::PgPoolOptions;
use troupe::postgres::sqlx::{self, AssertSqlSafe, PgPool, Row};
use troupe::postgres::{PostgresBroker, PostgresOptions, PostgresState};
use troupe::prelude::*;
use troupe::{TaskRecord, now_ms, option_keys, redact_url};

/// The error type of `run`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The database used when `TROUPE_POSTGRES_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The queues of the actors.
pub const QUEUES: [&str; 2] = ["email_processing", "ocr"];

/// `TROUPE_POSTGRES_URL`, else [`DEFAULT_DATABASE_URL`].
#[must_use]
pub fn database_url() -> String {
    std::env::var("TROUPE_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned())
}

/// The payload of a legacy `process_email` job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Email {
    /// Whose mailbox.
    pub user_id: String,
    /// From.
    pub sender: String,
    /// Subject.
    pub subject: String,
}

/// The payload of a legacy `ocr_document` job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Document {
    /// The file to read.
    pub file_path: String,
}

/// The old `process_email` task type, now an actor of the same name.
#[troupe::actor(queue_name = "email_processing", max_retries = 3)]
async fn process_email(email: Email) -> Result<(), ActorError> {
    journal()?.ran("process_email", &email.subject);
    Ok(())
}

/// The old `ocr_document` task type, now an actor of the same name.
#[troupe::actor(queue_name = "ocr", max_retries = 3)]
async fn ocr_document(document: Document) -> Result<(), ActorError> {
    journal()?.ran("ocr_document", &document.file_path);
    Ok(())
}

/// The message for a legacy row, or why the row stays in the table: the task type names the
/// actor and the payload is its one argument; the row's priority and remaining attempts
/// carry over.
fn legacy_message(task_type: &str, payload: &str, priority: i32, attempts_left: u64) -> Result<Message, String> {
    fn parse<T: serde::de::DeserializeOwned>(payload: &str) -> Result<T, String> {
        serde_json::from_str(payload).map_err(|e| format!("payload does not fit: {e}"))
    }
    let message = match task_type {
        "process_email" => ProcessEmail.message(parse(payload)?),
        "ocr_document" => OcrDocument.message(parse(payload)?),
        other => return Err(format!("no actor for task type {other:?} yet")),
    }
    .map_err(|e| e.to_string())?;
    Ok(message
        .with_priority(priority)
        .with_option(option_keys::MAX_RETRIES, attempts_left.saturating_sub(1)))
}

/// One run of an actor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ran {
    /// The actor.
    pub actor: String,
    /// What it worked on (the subject or the file).
    pub subject: String,
    /// The message id.
    pub message_id: String,
    /// When it ran, ms since the epoch.
    pub at_ms: u64,
}

/// What the actors record their runs in.
#[derive(Clone, Debug, Default)]
pub struct Journal(Arc<Mutex<Vec<Ran>>>);

impl Journal {
    fn ran(&self, actor: &str, subject: &str) {
        let message_id = current_message().map(|m| m.message_id).unwrap_or_default();
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(Ran {
            actor: actor.to_owned(),
            subject: subject.to_owned(),
            message_id,
            at_ms: now_ms(),
        });
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

/// A row of `legacy_jobs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegacyRow {
    /// Its id.
    pub id: i64,
    /// The task type.
    pub task_type: String,
    /// `pending`, `running`, `done`, `failed`, or `moved` once drained.
    pub status: String,
    /// Its priority (lower first, as Troupe's).
    pub priority: i32,
    /// When it was due, ms since the epoch.
    pub run_at_ms: i64,
    /// The Troupe message it became.
    pub moved_to: Option<String>,
    /// The id of the transaction that moved it.
    pub moved_txid: Option<i64>,
}

/// What one drain did.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    /// The drain's transaction id (`txid_current()`).
    pub txid: i64,
    /// Rows turned into messages: (row id, message id).
    pub moved: Vec<(i64, String)>,
    /// Rows left in the table, with why.
    pub left: Vec<(i64, String)>,
    /// Messages (ready or delayed) another connection saw in Troupe's queues while the drain's
    /// transaction was open.
    pub visible_before_commit: u64,
}

/// Messages in Troupe's queues and rows marked moved, at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Ready and delayed messages.
    pub messages: u64,
    /// Rows whose status is `moved`.
    pub moved_rows: i64,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// The legacy table before the drains.
    pub before: Vec<LegacyRow>,
    /// The drain that was rolled back.
    pub rolled_back_drain: Drain,
    /// What was left after it.
    pub after_rollback: Snapshot,
    /// The drain that committed.
    pub drain: Drain,
    /// The legacy table after the worker ran.
    pub rows: Vec<LegacyRow>,
    /// Every actor run, in order.
    pub ran: Vec<Ran>,
    /// The task record of each moved message, in the order of `drain.moved`.
    pub records: Vec<Option<TaskRecord>>,
}

/// Command-line flags.
#[derive(Clone, Debug)]
pub struct Args {
    /// The database (a `?schema=` setting is ignored: the run makes schemas of its own).
    pub database_url: String,
    /// Keep the schemas instead of dropping them at the end.
    pub keep: bool,
}

/// Creates the legacy schema and table, and fills it as an old worker pool left it.
async fn create_legacy_table(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {schema}.legacy_jobs (
             id           bigserial PRIMARY KEY,
             task_type    text NOT NULL,
             payload      jsonb NOT NULL,
             status       text NOT NULL DEFAULT 'pending',  -- pending, running, done, failed
             priority     integer NOT NULL DEFAULT 0,       -- lower first
             attempts     integer NOT NULL DEFAULT 0,
             max_attempts integer NOT NULL DEFAULT 3,
             run_at       timestamptz NOT NULL DEFAULT now(),
             locked_by    text,
             locked_at    timestamptz,
             last_error   text,
             created_at   timestamptz NOT NULL DEFAULT now()
         );
         CREATE INDEX ON {schema}.legacy_jobs (priority, id) WHERE status = 'pending';
         INSERT INTO {schema}.legacy_jobs (task_type, payload, status, priority, attempts, run_at, locked_by, locked_at, last_error) VALUES
             ('process_email', '{{\"user_id\": \"u1\", \"sender\": \"a@example.com\", \"subject\": \"invoice 17\"}}', 'pending', 0, 0, now(), NULL, NULL, NULL),
             ('ocr_document', '{{\"file_path\": \"/scans/contract.pdf\"}}', 'running', 0, 1, now() - interval '5 minutes', 'old-worker-2', now() - interval '4 minutes', NULL),
             ('process_email', '{{\"user_id\": \"u2\", \"sender\": \"b@example.com\", \"subject\": \"welcome\"}}', 'done', 0, 1, now() - interval '1 hour', NULL, NULL, NULL),
             ('ocr_document', '{{\"file_path\": \"/scans/blurry.png\"}}', 'failed', 0, 3, now() - interval '1 hour', NULL, NULL, 'unreadable after 3 attempts'),
             ('ocr_document', '{{\"file_path\": \"/scans/later.pdf\"}}', 'pending', 0, 0, now() + interval '600 milliseconds', NULL, NULL, NULL),
             ('rebuild_search_index', '{{\"index\": \"mail\"}}', 'pending', 0, 0, now(), NULL, NULL, NULL),
             ('process_email', '{{\"user_id\": \"u3\", \"sender\": \"c@example.com\", \"subject\": \"URGENT: password reset\"}}', 'pending', -5, 0, now(), NULL, NULL, NULL);"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// Every row of the table; `moved` when the drain's columns exist.
async fn read_rows(pool: &PgPool, schema: &str, moved: bool) -> Result<Vec<LegacyRow>, sqlx::Error> {
    let moved_columns = if moved {
        "moved_to, moved_txid"
    } else {
        "NULL::text, NULL::bigint"
    };
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT id, task_type, status, priority, (EXTRACT(EPOCH FROM run_at) * 1000)::bigint, {moved_columns}
         FROM {schema}.legacy_jobs ORDER BY id"
    )))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(LegacyRow {
                id: r.try_get(0)?,
                task_type: r.try_get(1)?,
                status: r.try_get(2)?,
                priority: r.try_get(3)?,
                run_at_ms: r.try_get(4)?,
                moved_to: r.try_get(5)?,
                moved_txid: r.try_get(6)?,
            })
        })
        .collect()
}

/// Moves the pending and running rows of `schema.legacy_jobs` into Troupe messages in one
/// transaction on the application's pool, and commits it (or, with `commit` false, rolls it
/// back at the last moment, as a crash would).
async fn drain(pool: &PgPool, broker: &PostgresBroker, schema: &str, commit: bool) -> Result<Drain, BoxError> {
    let mut tx = pool.begin().await?;
    // The old workers are stopped; the columns that link each row to its message.
    sqlx::query(AssertSqlSafe(format!(
        "ALTER TABLE {schema}.legacy_jobs
             ADD COLUMN IF NOT EXISTS moved_to text,
             ADD COLUMN IF NOT EXISTS moved_txid bigint"
    )))
    .execute(&mut *tx)
    .await?;
    // `running` rows were interrupted when their worker stopped: they move too (at least once).
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT id, task_type, payload::text, priority, GREATEST(max_attempts - attempts, 1),
                GREATEST(0, (EXTRACT(EPOCH FROM run_at - now()) * 1000)::bigint)
         FROM {schema}.legacy_jobs
         WHERE status IN ('pending', 'running')
         ORDER BY priority, id
         FOR UPDATE"
    )))
    .fetch_all(&mut *tx)
    .await?;
    let mut batch = Vec::new();
    let mut ids = Vec::new();
    let mut left = Vec::new();
    for row in &rows {
        let id: i64 = row.try_get(0)?;
        let task_type: String = row.try_get(1)?;
        let payload: String = row.try_get(2)?;
        let priority: i32 = row.try_get(3)?;
        let attempts_left: i32 = row.try_get(4)?;
        let delay_ms: i64 = row.try_get(5)?;
        let attempts_left = u64::try_from(attempts_left).unwrap_or(1);
        match legacy_message(&task_type, &payload, priority, attempts_left) {
            Ok(message) => {
                let delay = (delay_ms > 0).then(|| Duration::from_millis(delay_ms.unsigned_abs()));
                batch.push((message, delay));
                ids.push(id);
            }
            Err(reason) => left.push((id, reason)),
        }
    }
    // On the application's connection, inside its transaction: the messages exist if and only
    // if it commits.
    let enqueued = broker.enqueue_many_in(&mut tx, batch).await?;
    let message_ids: Vec<String> = enqueued.iter().map(|m| m.message_id.clone()).collect();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {schema}.legacy_jobs AS j
         SET status = 'moved', moved_to = u.message_id, moved_txid = txid_current()
         FROM unnest($1::bigint[], $2::text[]) AS u(id, message_id)
         WHERE j.id = u.id"
    )))
    .bind(ids.clone())
    .bind(message_ids.clone())
    .execute(&mut *tx)
    .await?;
    let txid: i64 = sqlx::query_scalar("SELECT txid_current()").fetch_one(&mut *tx).await?;
    let visible_before_commit = queued(broker).await?;
    if commit {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(Drain {
        txid,
        moved: ids.into_iter().zip(message_ids).collect(),
        left,
        visible_before_commit,
    })
}

/// Ready and delayed messages in Troupe's queues, as any other connection sees them.
async fn queued(broker: &PostgresBroker) -> Result<u64, BoxError> {
    let mut n = 0;
    for queue in QUEUES {
        let stats = broker.stats(queue).await?;
        n += stats.ready + stats.delayed;
    }
    Ok(n)
}

/// Builds the legacy table, drains it (once rolled back, once for real), runs a worker until
/// the moved jobs are done, and prints each step to `out`.
///
/// # Errors
/// A database or broker error (PostgreSQL not reachable, say), or jobs that do not finish
/// within 30 s.
pub async fn run(args: Args, out: &mut dyn Write) -> Result<Report, BoxError> {
    let suffix = format!("{}_{}", std::process::id(), now_ms() % 1_000_000_000);
    let legacy = format!("legacy_{suffix}");
    let options = PostgresOptions::from_url(&args.database_url)?.schema(format!("troupe_{suffix}"));
    writeln!(
        out,
        "database {}: legacy table {legacy}.legacy_jobs, Troupe's tables in schema {}",
        redact_url(&options.url),
        options.schema
    )?;
    // The broker (first: it says in one line why a server cannot be used), and the
    // application's own pool, whose search path knows nothing of Troupe.
    let broker = PostgresBroker::open(options.clone()).await?;
    let pool = PgPoolOptions::new().max_connections(4).connect(&options.url).await?;
    let result = migrate(&pool, &broker, &legacy, out).await;
    broker.close().await?;
    if args.keep {
        writeln!(out, "kept schemas {legacy} and {}", options.schema)?;
    } else {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {legacy} CASCADE; DROP SCHEMA IF EXISTS {} CASCADE",
            options.schema
        )))
        .execute(&pool)
        .await?;
    }
    pool.close().await;
    result
}

async fn migrate(
    pool: &PgPool,
    broker: &PostgresBroker,
    legacy: &str,
    out: &mut dyn Write,
) -> Result<Report, BoxError> {
    create_legacy_table(pool, legacy).await?;
    let before = read_rows(pool, legacy, false).await?;
    writeln!(out, "\nlegacy_jobs before:")?;
    for r in &before {
        writeln!(
            out,
            "  #{} {:<20} {:<8} priority {}",
            r.id, r.task_type, r.status, r.priority
        )?;
    }

    let rolled_back_drain = drain(pool, broker, legacy, false).await?;
    let moved_rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {legacy}.legacy_jobs WHERE status = 'moved'"
    )))
    .fetch_one(pool)
    .await?;
    let after_rollback = Snapshot {
        messages: queued(broker).await?,
        moved_rows,
    };
    writeln!(
        out,
        "\na drain of {} rows rolled back: {} messages in Troupe's queues, {} rows marked moved",
        rolled_back_drain.moved.len(),
        after_rollback.messages,
        after_rollback.moved_rows
    )?;

    let drain = drain(pool, broker, legacy, true).await?;
    writeln!(
        out,
        "drained in transaction {}: {} rows moved (others saw {} messages before the commit), {} left:",
        drain.txid,
        drain.moved.len(),
        drain.visible_before_commit,
        drain.left.len()
    )?;
    for (id, reason) in &drain.left {
        writeln!(out, "  #{id} stays: {reason}")?;
    }

    // The new workers: Troupe's, with task states (the records start when a worker takes a
    // message, since `enqueue_in` runs no app middleware).
    let journal = Journal::default();
    let app = App::builder(Arc::new(broker.clone()))
        .state(PostgresState::from_pool(broker.pool().clone()).into_dyn())
        .track_tasks(TaskTracking::default())
        .middleware(ProvideJournal(journal.clone()))
        .actor(ProcessEmail)
        .actor(OcrDocument)
        .build()?;
    let worker = Worker::builder(app.clone()).concurrency(1).start().await?;
    let joined = async {
        for queue in QUEUES {
            app.join(queue, Duration::from_secs(30)).await?;
        }
        Ok::<_, BoxError>(())
    }
    .await;
    worker.stop().await;
    joined?;

    let ran = journal.entries();
    writeln!(
        out,
        "\nran (one worker, one message at a time; within a queue, by priority):"
    )?;
    for r in &ran {
        writeln!(out, "  {:<14} {:<24} message {}", r.actor, r.subject, r.message_id)?;
    }
    let mut records = Vec::new();
    for (_, message_id) in &drain.moved {
        records.push(app.task(message_id).await?);
    }
    let rows = read_rows(pool, legacy, true).await?;
    writeln!(out, "\nlegacy_jobs after:")?;
    for r in &rows {
        let state = r
            .moved_to
            .as_ref()
            .and_then(|id| {
                drain
                    .moved
                    .iter()
                    .position(|(_, m)| m == id)
                    .and_then(|i| records[i].as_ref())
            })
            .map_or_else(String::new, |rec| format!(" (task state: {})", rec.status));
        writeln!(
            out,
            "  #{} {:<20} {:<8} {}{state}",
            r.id,
            r.task_type,
            r.status,
            r.moved_to.as_deref().unwrap_or("")
        )?;
    }
    Ok(Report {
        before,
        rolled_back_drain,
        after_rollback,
        drain,
        rows,
        ran,
        records,
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = Args {
        database_url: database_url(),
        keep: false,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--keep" => args.keep = true,
            "--database-url" => args.database_url = argv.next().ok_or("--database-url needs a URL")?,
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: migrate_pg_table [--database-url URL] [--keep]"
                )
                .into());
            }
        }
    }
    run(args, &mut std::io::stdout()).await?;
    Ok(())
}
