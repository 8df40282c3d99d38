//! State backends: small atomic counters with TTLs, the base of rate limiters, barriers and
//! task-status tracking (Dramatiq's rate-limiter backends).

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::tasks::TaskStore;

/// Atomic counter operations with TTLs. Every call either applies entirely or not at all.
#[async_trait]
pub trait StateBackend: Send + Sync + fmt::Debug + 'static {
    /// Sets `key` to `value` only if it does not exist. Returns whether it was set.
    async fn add(&self, key: &str, value: i64, ttl: Duration) -> Result<bool>;

    /// Adds `amount` unless the result would exceed `maximum`. Returns whether it changed.
    /// A missing key counts as 0.
    async fn incr(&self, key: &str, amount: i64, maximum: i64, ttl: Duration) -> Result<bool>;

    /// Subtracts `amount` unless the result would go below `minimum`. Returns whether it
    /// changed. A missing key counts as 0.
    async fn decr(&self, key: &str, amount: i64, minimum: i64, ttl: Duration) -> Result<bool>;

    /// Adds `amount` to `key` unless `amount` plus the sum of `keys` (which includes `key`)
    /// would exceed `maximum`. Returns whether it changed.
    async fn incr_and_sum(&self, key: &str, keys: &[String], amount: i64, maximum: i64, ttl: Duration) -> Result<bool>;

    /// The current value of `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<i64>>;

    /// Waits up to `timeout` for a notification on `key`. Returns whether one came.
    async fn wait(&self, key: &str, timeout: Duration) -> Result<bool>;

    /// Notifies every present and future waiter on `key` for `ttl`.
    async fn notify(&self, key: &str, ttl: Duration) -> Result<()>;

    /// The task store of this backend (task states, cancellation, unique keys), when it keeps
    /// one. Troupe's backends of memory, SQLite, Redis and PostgreSQL do; a third-party backend
    /// that does not leaves the default, and an app asked to track tasks on it says so when it
    /// is built.
    fn tasks(&self) -> Option<&dyn TaskStore> {
        None
    }
}
