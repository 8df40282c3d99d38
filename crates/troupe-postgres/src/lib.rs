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

mod db;
#[cfg(feature = "broker")]
mod dialect;
mod hosts;
mod pooling;
mod store;
mod tasks;

pub use db::PostgresOptions;
#[cfg(feature = "broker")]
pub use dialect::PostgresDialect;
pub use hosts::TargetSessionAttrs;
pub use pooling::PoolMode;
pub use store::PostgresStore;

/// A broker on PostgreSQL: the shared SQL broker of `troupe-sql` with PostgreSQL's statements
/// (one jobs table, claims with `FOR UPDATE SKIP LOCKED`, leases, LISTEN/NOTIFY wake-ups).
/// Cheap to clone.
///
/// Opened with [`SqlBroker::connect`](troupe_sql::SqlBroker::connect)`("postgres://...")`,
/// [`open`](troupe_sql::SqlBroker::open)`(PostgresOptions)` or
/// [`from_pool`](troupe_sql::SqlBroker::from_pool); [`enqueue_in`](troupe_sql::SqlBroker::enqueue_in)
/// enqueues inside the caller's transaction:
///
/// ```no_run
/// # async fn f(broker: troupe_postgres::PostgresBroker, pool: sqlx::PgPool, message: troupe_core::Message) -> Result<(), Box<dyn std::error::Error>> {
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO emails (address) VALUES ($1)").bind("a@example.com").execute(&mut *tx).await?;
/// broker.enqueue_in(&mut tx, message, None).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[cfg(feature = "broker")]
pub type PostgresBroker = troupe_sql::SqlBroker<PostgresDialect>;

/// Results in the `results` table of Troupe's schema, keyed as Dramatiq keys them, with TTLs
/// (expired rows are deleted in batches by the broker's maintenance and by stores).
#[cfg(feature = "results")]
pub type PostgresResults = troupe_sql::SqlResults<PostgresStore>;

/// Atomic counters with TTLs in the `state` table; events in `events`; task records,
/// cancellation requests and unique keys in `tasks`, `cancels` and `unique_keys` (the
/// `TaskStore` of `StateBackend::tasks`).
#[cfg(feature = "results")]
pub type PostgresState = troupe_sql::SqlState<PostgresStore>;

/// The sqlx this crate is built on (for transactional enqueue and your own queries).
pub use sqlx;
pub use sqlx::PgPool;

/// Connects (and migrates the schema) for the results and state backends used without the
/// broker.
///
/// # Errors
/// One line naming the problem and the fix (unreachable server, missing database, privileges).
///
/// Behind a transaction pooler (`pool_mode=transaction`), build the backends with
/// [`connect`](troupe_sql::SqlResults::connect), [`PostgresStore::open`] or from the broker's
/// [`store`](troupe_sql::SqlBroker::store) instead: a bare pool does not carry the mode.
pub async fn open(options: &PostgresOptions) -> troupe_core::Result<PgPool> {
    Ok(db::open(options).await?.pool().clone())
}
