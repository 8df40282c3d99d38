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

    /// Takes one of `limit` slots of `key` for `holder` (a caller-chosen unique id) for
    /// `lease`, the base of [`ConcurrentRateLimiter`](crate::limits::ConcurrentRateLimiter).
    /// Returns whether it was taken; taking a slot the holder already has renews it.
    ///
    /// Troupe's backends track each holder with its lease, so the slot of a holder that died
    /// (SIGKILL) frees itself when its lease runs out even while others keep using the key. The
    /// default, for backends without holder tracking, is Dramatiq's counter (`add` or `incr`
    /// up to `limit`), where a dead holder's slot frees only once the key goes a whole `lease`
    /// untouched.
    async fn acquire_slot(&self, key: &str, holder: &str, limit: i64, lease: Duration) -> Result<bool> {
        let _ = holder;
        if self.add(key, 1, lease).await? {
            return Ok(true);
        }
        self.incr(key, 1, limit, lease).await
    }

    /// Extends `holder`'s slot of `key` to `lease` from now. Returns whether the holder still
    /// had it (false once its lease ran out and the slot went to someone else or was freed).
    /// The default refreshes Dramatiq's counter's TTL and cannot tell.
    async fn renew_slot(&self, key: &str, holder: &str, lease: Duration) -> Result<bool> {
        let _ = holder;
        self.incr(key, 0, i64::MAX, lease).await
    }

    /// Gives back `holder`'s slot of `key` (nothing when it no longer holds one). The default
    /// decrements Dramatiq's counter, never below 0.
    async fn release_slot(&self, key: &str, holder: &str, lease: Duration) -> Result<()> {
        let _ = holder;
        self.decr(key, 1, 0, lease).await.map(|_| ())
    }

    /// The task store of this backend (task states, cancellation, unique keys), when it keeps
    /// one. Troupe's backends of memory, SQLite, Redis and PostgreSQL do; a third-party backend
    /// that does not leaves the default, and an app asked to track tasks on it says so when it
    /// is built.
    fn tasks(&self) -> Option<&dyn TaskStore> {
        None
    }
}
