//! Troupe's PostgreSQL backend: a fast, crash-safe broker and results and state backends.
//!
//! - One `jobs` table in Troupe's schema (default `troupe`), migrated on connect (idempotent,
//!   serialised by an advisory lock so many workers may start at once).
//! - Claims in batches with `FOR UPDATE SKIP LOCKED`, lower `troupe_priority` first, FIFO within
//!   a priority; delays server-side (`available_at`).
//! - `LISTEN/NOTIFY` wakes idle workers within milliseconds; polling is the fallback.
//! - Leases renewed by live workers; a killed worker's messages come back after the lease
//!   (default 30 s), fenced by attempt so a late ack never deletes a newer attempt.
//! - [`PostgresBroker::enqueue_in`]: enqueue inside the caller's transaction.
//!
//! ```no_run
//! # async fn run() -> troupe_core::Result<()> {
//! let broker = troupe_postgres::PostgresBroker::connect("postgres://postgres@127.0.0.1/test").await?;
//! let results = troupe_postgres::PostgresResults::from_pool(broker.pool().clone());
//! # Ok(()) }
//! ```

#[cfg(feature = "broker")]
mod broker;
mod db;
#[cfg(feature = "results")]
mod results;
#[cfg(feature = "results")]
mod state;

#[cfg(feature = "broker")]
pub use broker::PostgresBroker;
pub use db::PostgresOptions;
#[cfg(feature = "results")]
pub use results::PostgresResults;
#[cfg(feature = "results")]
pub use state::PostgresState;

/// The sqlx this crate is built on (for transactional enqueue and your own queries).
pub use sqlx;
pub use sqlx::PgPool;

/// Connects (and migrates the schema) for the results and state backends used without the
/// broker.
///
/// # Errors
/// One line naming the problem and the fix (unreachable server, missing database, privileges).
pub async fn open(options: &PostgresOptions) -> troupe_core::Result<PgPool> {
    db::open(options).await
}
