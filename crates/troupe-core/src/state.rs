//! State backends: small atomic counters with TTLs, the base of rate limiters, barriers and
//! task-status tracking (Dramatiq's rate-limiter backends).

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::tasks::TaskStore;

/// What [`StateBackend::arrive`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Arrival {
    /// The party had not arrived before: it was counted now.
    pub counted: bool,
    /// The barrier is cleared: every party arrived (or, as in Dramatiq, the barrier expired or
    /// never existed).
    pub cleared: bool,
    /// This party's arrival is the one that cleared the barrier (now, or before when this is a
    /// repeat): the one party that sends what waits for the barrier.
    pub clearer: bool,
}

impl Arrival {
    /// An arrival that was `counted` (or not), found the barrier `cleared` (or not), and is (or
    /// is not) its `clearer`.
    #[must_use]
    pub fn new(counted: bool, cleared: bool, clearer: bool) -> Self {
        Self {
            counted,
            cleared,
            clearer,
        }
    }
}

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

    /// Party `party` arrives at the barrier `key` (made by `add(key, parties, ttl)`), counted at
    /// most once however often it arrives, with `outcome` kept for [`arrivals`](Self::arrivals):
    /// Dramatiq's barrier step (`decr(key, 1, minimum 1)`; when that fails the barrier is
    /// cleared and `"<key>@events"` notified) made idempotent per party, so a party redelivered
    /// after a crash is not counted twice. A duplicate arrival counts nothing and reports
    /// whether the barrier is cleared (its `@events` key exists) and whether this party is the
    /// one that cleared it (kept with the arrivals). Parties that arrive the plain
    /// Dramatiq way (a Python worker's `decr`) share the count.
    ///
    /// # Errors
    /// The default: [`Error::Config`], for backends that keep no barriers of parties (Troupe's
    /// memory, SQLite, Redis and PostgreSQL backends do).
    async fn arrive(&self, key: &str, party: &str, outcome: &str, ttl: Duration) -> Result<Arrival> {
        let _ = (key, party, outcome, ttl);
        Err(Error::Config(format!(
            "{self:?} keeps no group barriers: use the memory, SQLite, Redis or PostgreSQL state backend"
        )))
    }

    /// The `(party, outcome)` of every [`arrive`](Self::arrive) at barrier `key` still kept.
    ///
    /// # Errors
    /// As [`arrive`](Self::arrive).
    async fn arrivals(&self, key: &str) -> Result<Vec<(String, String)>> {
        let _ = key;
        Err(Error::Config(format!(
            "{self:?} keeps no group barriers: use the memory, SQLite, Redis or PostgreSQL state backend"
        )))
    }

    /// The concurrent rate limiters with live holders and the group barriers with arrivals
    /// (at most `limit` of each, by key), for inspection (the dashboard). The default knows
    /// none.
    async fn coordination(&self, limit: usize) -> Result<Coordination> {
        let _ = limit;
        Ok(Coordination::default())
    }

    /// The task store of this backend (task states, cancellation, unique keys), when it keeps
    /// one. Troupe's backends of memory, SQLite, Redis and PostgreSQL do; a third-party backend
    /// that does not leaves the default, and an app asked to track tasks on it says so when it
    /// is built.
    fn tasks(&self) -> Option<&dyn TaskStore> {
        None
    }
}

/// What [`StateBackend::coordination`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Coordination {
    /// Concurrent rate limiters: each key with its live holders, by key.
    pub slots: Vec<SlotKey>,
    /// Group barriers: each key with its arrivals, by key.
    pub barriers: Vec<BarrierKey>,
}

/// A concurrent rate limiter's key and its live holders.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotKey {
    /// The limiter's key.
    pub key: String,
    /// Who holds its slots (the holders' ids), sorted.
    pub holders: Vec<String>,
}

impl SlotKey {
    /// A key and its holders (sorted here).
    #[must_use]
    pub fn new(key: impl Into<String>, mut holders: Vec<String>) -> Self {
        holders.sort();
        Self {
            key: key.into(),
            holders,
        }
    }
}

/// A group barrier's key and how far it got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BarrierKey {
    /// The barrier's key.
    pub key: String,
    /// Parties that arrived (each counted once).
    pub arrived: u64,
    /// Whether it cleared (every party arrived).
    pub cleared: bool,
}

impl BarrierKey {
    /// A barrier's state.
    #[must_use]
    pub fn new(key: impl Into<String>, arrived: u64, cleared: bool) -> Self {
        Self {
            key: key.into(),
            arrived,
            cleared,
        }
    }
}
