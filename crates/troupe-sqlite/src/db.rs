//! Connection settings, pragmas, migrations and error mapping shared by the broker and the
//! backends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Executor, Row};
use troupe_core::{Error, ErrorKind};
use troupe_sql::{SqlOptions, parse_query};

pub(crate) const BACKEND: &str = "sqlite";

/// The schema version this crate writes; older files are migrated on connect.
pub(crate) const SCHEMA_VERSION: i64 = 4;

/// How SQLite syncs to disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// `synchronous=NORMAL` with WAL (default): nothing committed is lost if the process is
    /// killed; the last commits may be lost on power loss or an OS crash.
    #[default]
    Normal,
    /// `synchronous=FULL`: every enqueue, ack and nack is synced to disk before it returns.
    /// Claims commit without waiting for a sync: the next synced commit carries them to disk,
    /// and a claim lost to a power cut only leaves its message ready to be claimed again.
    Full,
}

/// Settings of an SQLite database used by Troupe.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// The database file.
    pub path: PathBuf,
    /// How long a worker's claim on a message lasts without renewal; a killed worker's
    /// messages return to their queue after this (default 30 s).
    pub lease: Duration,
    /// How often idle consumers look for new messages written by other processes (default
    /// 50 ms; messages enqueued in the same process wake them at once).
    pub poll_interval: Duration,
    /// How long dead letters are kept (default 7 days).
    pub dead_letter_ttl: Duration,
    /// How long a writer waits for the database lock before giving up (default 30 s): the
    /// lock held by another process, or by a transaction run on the pool. This process's own
    /// writes take turns and never wait here for one another.
    pub busy_timeout: Duration,
    /// Sync mode.
    pub durability: Durability,
    /// Largest accepted message (default 1 MiB).
    pub max_message_size: usize,
    /// Connections in the pool (default 4).
    pub max_connections: u32,
}

impl SqliteOptions {
    /// Defaults for the file at `path`.
    #[must_use]
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(50),
            dead_letter_ttl: Duration::from_secs(7 * 24 * 3600),
            busy_timeout: Duration::from_secs(30),
            durability: Durability::Normal,
            max_message_size: troupe_core::DEFAULT_MAX_MESSAGE_SIZE,
            max_connections: 4,
        }
    }

    /// Parses `sqlite://PATH`, `sqlite:PATH` or `sqlite:///ABS/PATH`, with optional query
    /// settings `lease`, `poll_interval`, `dead_letter_ttl`, `busy_timeout` (durations such as
    /// `30s`), `durability` (`normal`/`full`), `max_message_size` (bytes) and
    /// `max_connections`.
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad part.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| {
                Error::Config(format!(
                    "{:?} is not an SQLite URL; use sqlite://PATH, e.g. sqlite://troupe.db",
                    troupe_core::redact_url(url)
                ))
            })?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err(Error::Config(format!(
                "the SQLite URL {url:?} has no file path; use sqlite://PATH, e.g. sqlite://troupe.db"
            )));
        }
        let mut options = Self::new(path);
        let mut common = options.common();
        parse_query("SQLite", query, &mut common, &["busy_timeout", "durability"], |s| {
            match s.key {
                "busy_timeout" => options.busy_timeout = s.duration()?,
                "durability" => {
                    options.durability = match s.value {
                        "normal" => Durability::Normal,
                        "full" => Durability::Full,
                        _ => return Err(s.bad("use normal or full")),
                    }
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        options.set_common(common);
        Ok(options)
    }

    /// Sets the durability.
    #[must_use]
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }
}

troupe_sql::impl_sql_options!(SqliteOptions);

impl FromStr for SqliteOptions {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::from_url(s)
    }
}

/// Maps an sqlx error to a Troupe error with `what` as context.
pub(crate) fn db_error(what: &str, e: sqlx::Error) -> Error {
    let kind = match &e {
        sqlx::Error::PoolTimedOut => ErrorKind::Timeout,
        sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => ErrorKind::Connection,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // SQLITE_BUSY, SQLITE_LOCKED and their extended codes: another writer holds the lock.
            Some(code) if matches!(code.parse::<i32>().map(|c| c & 0xff), Ok(5 | 6)) => ErrorKind::Timeout,
            // SQLITE_FULL: the disk is full. Freed space makes the same write succeed, so it is
            // retried like a busy lock (a worker requeues rather than dead-letters).
            Some(code) if matches!(code.parse::<i32>().map(|c| c & 0xff), Ok(13)) => ErrorKind::Timeout,
            _ => ErrorKind::Other,
        },
        sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => ErrorKind::Serialization,
        sqlx::Error::RowNotFound => ErrorKind::NotFound,
        _ => ErrorKind::Other,
    };
    let message = format!("{what}: {e}");
    Error::backend_with_source(BACKEND, kind, message, e)
}

const MIGRATIONS: &[&str] = &[
    // 1: every queue in one jobs table, results, state and events.
    "CREATE TABLE IF NOT EXISTS troupe_queues (
        name TEXT PRIMARY KEY
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS troupe_jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        message_id TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        state INTEGER NOT NULL,
        available_at INTEGER NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until INTEGER,
        reason TEXT,
        failed_at INTEGER,
        enqueued_at INTEGER NOT NULL,
        body BLOB NOT NULL
    );
    CREATE INDEX IF NOT EXISTS troupe_jobs_ready ON troupe_jobs (queue, priority, id) WHERE state = 0;
    CREATE INDEX IF NOT EXISTS troupe_jobs_delayed ON troupe_jobs (queue, available_at) WHERE state = 3;
    CREATE INDEX IF NOT EXISTS troupe_jobs_leased ON troupe_jobs (lease_until) WHERE state = 1;
    CREATE INDEX IF NOT EXISTS troupe_jobs_owner ON troupe_jobs (lease_owner) WHERE state = 1;
    CREATE INDEX IF NOT EXISTS troupe_jobs_dead ON troupe_jobs (queue, failed_at) WHERE state = 2;
    CREATE TABLE IF NOT EXISTS troupe_results (
        key TEXT PRIMARY KEY,
        value BLOB NOT NULL,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS troupe_state (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS troupe_events (
        key TEXT PRIMARY KEY,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;",
    // 2: task records (a rowid table: arguments, errors and progress may be large), their
    // cancellation requests and unique keys. Pages are newest first within a status and an
    // actor or a queue, an actor, a queue, a status, or everything; expiry goes by its index.
    "CREATE TABLE IF NOT EXISTS troupe_tasks (
        message_id TEXT NOT NULL PRIMARY KEY,
        actor TEXT NOT NULL,
        queue TEXT NOT NULL,
        status TEXT NOT NULL,
        version INTEGER NOT NULL,
        enqueued_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        updated_at INTEGER NOT NULL,
        eta INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        error_type TEXT,
        error TEXT,
        worker TEXT,
        progress TEXT,
        args TEXT,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS troupe_tasks_status_actor ON troupe_tasks (status, actor, enqueued_at, message_id);
    CREATE INDEX IF NOT EXISTS troupe_tasks_status_queue ON troupe_tasks (status, queue, enqueued_at, message_id);
    CREATE INDEX IF NOT EXISTS troupe_tasks_status ON troupe_tasks (status, enqueued_at, message_id);
    CREATE INDEX IF NOT EXISTS troupe_tasks_actor ON troupe_tasks (actor, enqueued_at, message_id);
    CREATE INDEX IF NOT EXISTS troupe_tasks_queue ON troupe_tasks (queue, enqueued_at, message_id);
    CREATE INDEX IF NOT EXISTS troupe_tasks_enqueued ON troupe_tasks (enqueued_at, message_id);
    CREATE INDEX IF NOT EXISTS troupe_tasks_expiry ON troupe_tasks (expires_at);
    CREATE TABLE IF NOT EXISTS troupe_cancels (
        message_id TEXT PRIMARY KEY,
        mode TEXT NOT NULL,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS troupe_cancels_expiry ON troupe_cancels (expires_at);
    CREATE TABLE IF NOT EXISTS troupe_unique (
        key TEXT PRIMARY KEY,
        message_id TEXT NOT NULL,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS troupe_unique_expiry ON troupe_unique (expires_at);",
    // 3: the holders of concurrent rate-limit slots, each with its lease's end, and the parties
    // that arrived at group barriers, with their outcomes.
    "CREATE TABLE IF NOT EXISTS troupe_slots (
        key TEXT NOT NULL,
        holder TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (key, holder)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS troupe_arrivals (
        key TEXT NOT NULL,
        party TEXT NOT NULL,
        outcome TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (key, party)
    ) WITHOUT ROWID;",
    // 4: live workers' latest heartbeats (JSON), for `troupe workers` and the dashboard.
    "CREATE TABLE IF NOT EXISTS troupe_workers (
        id TEXT PRIMARY KEY,
        info TEXT NOT NULL,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;",
];

/// Pool settings shared by every pool of this crate: sqlx's default pings a connection (a
/// round trip to its SQLite thread) before each acquire; here only connections idle for a
/// while are pinged.
///
/// A connection still inside a transaction when it is next acquired is closed instead: when a
/// `COMMIT` fails on a full disk (`SQLITE_FULL`) SQLite may already have rolled the
/// transaction back, so sqlx's `ROLLBACK` fails too and its transaction depth stays at 1, and
/// every later `BEGIN IMMEDIATE` on that connection would fail ("begin_with at non-zero
/// transaction depth") long after the disk has space again. The pool pings a released
/// connection, which runs its pending rollback, so the depth read here is settled.
pub(crate) fn pool_options() -> SqlitePoolOptions {
    SqlitePoolOptions::new()
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if sqlx::Connection::is_in_transaction(conn) {
                    tracing::warn!("closing an SQLite connection left inside a failed transaction (a full disk?)");
                    return Ok(false);
                }
                if meta.idle_for >= Duration::from_secs(5) {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// Opens (creating if needed) the database, checks it is Troupe's, and migrates it.
pub(crate) async fn open(options: &SqliteOptions) -> Result<SqlitePool, Error> {
    let path = options.path.as_path();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && !p.is_dir()) {
        {
            return Err(Error::Config(format!(
                "cannot open the SQLite database {}: the directory {} does not exist; create it or use another path",
                path.display(),
                parent.display()
            )));
        }
    }
    let connect = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match options.durability {
            Durability::Normal => SqliteSynchronous::Normal,
            Durability::Full => SqliteSynchronous::Full,
        })
        .busy_timeout(options.busy_timeout)
        .foreign_keys(false);
    let pool = pool_options()
        .max_connections(options.max_connections.max(1))
        .min_connections(1)
        .connect_with(connect)
        .await
        .map_err(|e| open_error(path, e))?;
    migrate(&pool, path).await?;
    Ok(pool)
}

fn open_error(path: &Path, e: sqlx::Error) -> Error {
    let text = e.to_string();
    let hint = if text.contains("not a database") {
        "the file is not an SQLite database; point Troupe at a new or Troupe-owned file"
    } else if text.contains("unable to open") || text.contains("readonly") || text.contains("permission") {
        "check that the path is writable"
    } else {
        "check the path"
    };
    Error::backend_with_source(
        BACKEND,
        ErrorKind::Config,
        format!("cannot open the SQLite database {}: {text}; {hint}", path.display()),
        e,
    )
}

async fn migrate(pool: &SqlitePool, path: &Path) -> Result<(), Error> {
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| open_error(path, e))?;
    let tables: Vec<String> =
        sqlx::query("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| open_error(path, e))?
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .collect();
    let has_meta = tables.iter().any(|t| t == "troupe_meta");
    if !has_meta && !tables.is_empty() {
        return Err(Error::Config(format!(
            "{} is an SQLite database but not a Troupe one (it has tables {} and no troupe_meta); use a separate file for Troupe",
            path.display(),
            tables.join(", ")
        )));
    }
    tx.execute("CREATE TABLE IF NOT EXISTS troupe_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
        .await
        .map_err(|e| db_error("create troupe_meta", e))?;
    let version: i64 = sqlx::query("SELECT value FROM troupe_meta WHERE key = 'schema_version'")
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| db_error("read the schema version", e))?
        .and_then(|r| r.try_get::<String, _>(0).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if version > SCHEMA_VERSION {
        return Err(Error::Config(format!(
            "{} was written by a newer Troupe (schema {version}, this one knows {SCHEMA_VERSION}); upgrade troupe-sqlite",
            path.display()
        )));
    }
    for (i, migration) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        sqlx::raw_sql(*migration)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(&format!("migration {}", i + 1), e))?;
    }
    sqlx::query("INSERT INTO troupe_meta (key, value) VALUES ('schema_version', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        .bind(SCHEMA_VERSION.to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("write the schema version", e))?;
    tx.commit().await.map_err(|e| db_error("commit the migrations", e))?;
    Ok(())
}

/// The queue this process's writers to one database file take turns in.
///
/// SQLite lets one writer in at a time, and a connection that finds the write lock taken
/// sleeps in SQLite's busy handler between tries (1, 2, 5, 10, 15, 20, 25 ms, then more), so
/// writers racing for the lock waited tens of milliseconds for a lock that was free again after
/// one. Measured beside a draining backlog (`troupe-bench --fairness-backlog 400000
/// --fairness-in-process`, `durability=full`): a single send's p99 was 56 ms and the backlog
/// drained at 20,000/s; with turns, 7 ms and 55,000/s. Every write of this crate (the
/// broker's, the results and state backends', the task store's, whichever pool it runs on)
/// first takes a turn here, shared by every pool of the process on the same file, in FIFO
/// order; only other processes' writers, and transactions a user runs on the pool, still meet
/// the busy handler. Reads never take a turn (WAL lets them run beside the writer).
#[derive(Clone, Debug)]
pub(crate) struct Writes(Arc<tokio::sync::Mutex<()>>);

impl Writes {
    /// The turn queue of the database file `pool` opens.
    pub(crate) fn of(pool: &SqlitePool) -> Self {
        static FILES: LazyLock<Mutex<HashMap<PathBuf, Weak<tokio::sync::Mutex<()>>>>> =
            LazyLock::new(|| Mutex::new(HashMap::new()));
        let options = pool.connect_options();
        let file = options.get_filename();
        let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
        let mut files = FILES.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(turns) = files.get(&file).and_then(Weak::upgrade) {
            return Self(turns);
        }
        files.retain(|_, turns| turns.strong_count() > 0);
        let turns = Arc::new(tokio::sync::Mutex::new(()));
        files.insert(file, Arc::downgrade(&turns));
        Self(turns)
    }

    /// Waits for this process's turn to write (FIFO: tokio's mutex is fair).
    pub(crate) async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.0.lock().await
    }
}

/// Milliseconds since the epoch as SQLite's INTEGER.
pub(crate) fn now() -> i64 {
    i64::try_from(troupe_core::now_ms()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let o = SqliteOptions::from_url("sqlite://data/troupe.db?lease=5s&durability=full").unwrap();
        assert_eq!(o.path, PathBuf::from("data/troupe.db"));
        assert_eq!(o.lease, Duration::from_secs(5));
        assert_eq!(o.durability, Durability::Full);
        assert_eq!(
            SqliteOptions::from_url("sqlite:///tmp/x.db").unwrap().path,
            PathBuf::from("/tmp/x.db")
        );
        assert_eq!(
            SqliteOptions::from_url("sqlite:x.db").unwrap().path,
            PathBuf::from("x.db")
        );
        let e = SqliteOptions::from_url("sqlite://x.db?lease=soon")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lease"), "{e}");
        let e = SqliteOptions::from_url("sqlite://x.db?nope=1").unwrap_err().to_string();
        assert!(e.contains("unknown setting `nope`"), "{e}");
        assert!(SqliteOptions::from_url("sqlite://").is_err());
        assert!(SqliteOptions::from_url("redis://x").is_err());
        // Found by the broker_urls fuzz target: another scheme's URL was echoed with its password.
        let e = SqliteOptions::from_url("rediss://user:hunter2hunter2@redis.example:6380")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an SQLite URL") && !e.contains("hunter2"), "{e}");
    }
}
