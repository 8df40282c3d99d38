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

#[cfg(feature = "broker")]
mod broker;
mod db;
#[cfg(feature = "results")]
mod results;
#[cfg(feature = "results")]
mod state;

#[cfg(feature = "broker")]
pub use broker::SqliteBroker;
pub use db::{Durability, SqliteOptions};
#[cfg(feature = "results")]
pub use results::SqliteResults;
#[cfg(feature = "results")]
pub use state::SqliteState;

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
