//! The embedded SQLite backend of Troupe: a durable broker, results and state, all in one
//! database file (WAL mode), with no server to run.
//!
//! ```no_run
//! # async fn run() -> troupe_core::Result<()> {
//! let broker = troupe_sqlite::SqliteBroker::connect("sqlite://troupe.db").await?;
//! let results = troupe_sqlite::SqliteResults::from_pool(broker.pool().clone());
//! # Ok(()) }
//! ```
//!
//! Every queue lives in one `troupe_jobs` table. Workers claim ready rows in batches (lowest
//! `troupe_priority` first, FIFO within a priority), holding a lease they renew; rows whose
//! lease ran out (their worker was killed) go back to ready without counting as a retry.
//! Delays are server-side (`available_at`). Acks, nacks and requeues are written in batches,
//! fenced by the claim's attempt number so a late ack never removes a newer attempt.

mod db;
#[cfg(feature = "broker")]
mod dialect;
mod store;
mod tasks;

pub use db::{Durability, SqliteOptions};
#[cfg(feature = "broker")]
pub use dialect::SqliteDialect;
pub use store::SqliteStore;

/// A durable broker in one SQLite file: the shared SQL broker of `troupe-sql` with SQLite's
/// statements. Cheap to clone.
///
/// Opened with [`SqlBroker::connect`](troupe_sql::SqlBroker::connect)`("sqlite://PATH")`,
/// [`open`](troupe_sql::SqlBroker::open)`(SqliteOptions)` or
/// [`from_pool`](troupe_sql::SqlBroker::from_pool); messages can also be enqueued inside a
/// caller's transaction with [`enqueue_in`](troupe_sql::SqlBroker::enqueue_in).
#[cfg(feature = "broker")]
pub type SqliteBroker = troupe_sql::SqlBroker<SqliteDialect>;

/// Results in the `troupe_results` table, keyed as Dramatiq keys them, with TTLs.
#[cfg(feature = "results")]
pub type SqliteResults = troupe_sql::SqlResults<SqliteStore>;

/// Atomic counters with TTLs in the `troupe_state` table; events in `troupe_events`; task
/// records, cancellation requests and unique keys in `troupe_tasks`, `troupe_cancels` and
/// `troupe_unique` (the `TaskStore` of `StateBackend::tasks`).
#[cfg(feature = "results")]
pub type SqliteState = troupe_sql::SqlState<SqliteStore>;

/// The sqlx this crate is built on, so applications can query the same database (their own
/// tables next to Troupe's) without matching versions by hand.
pub use sqlx;
/// Re-exported so callers can share one pool between the broker and the backends.
pub use sqlx::SqlitePool;

/// Opens (creating and migrating if needed) a Troupe SQLite database and returns its pool, for
/// the results and state backends used without the broker.
///
/// # Errors
/// A one-line error naming the path and the fix when the file cannot be opened, is not an
/// SQLite database, or belongs to something other than Troupe.
pub async fn open(options: &SqliteOptions) -> troupe_core::Result<SqlitePool> {
    db::open(options).await
}
