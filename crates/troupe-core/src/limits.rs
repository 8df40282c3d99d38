//! Rate limiters and barriers on a [`StateBackend`]: Dramatiq's `ConcurrentRateLimiter`,
//! `BucketRateLimiter`, `WindowRateLimiter` and `Barrier`, with the same keys and counter
//! semantics, so on Redis a Python worker and a Troupe worker sharing a key limit each other.
//!
//! ```no_run
//! # async fn run(state: std::sync::Arc<dyn troupe_core::StateBackend>) -> Result<(), troupe_core::ActorError> {
//! use std::time::Duration;
//! use troupe_core::limits::{ConcurrentRateLimiter, WhenLimited};
//!
//! let mutex = ConcurrentRateLimiter::new(state, "image-api", 1);
//! // Wait up to 5 s for the slot; if it is still taken, fail with `RateLimitExceeded` so
//! // `Retries` retries the message with its backoff.
//! let _slot = mutex.acquire(WhenLimited::Wait(Duration::from_secs(5))).await?;
//! // ... call the API; the slot is released when `_slot` drops (also on error, panic or
//! // cancellation), and a holder killed outright frees it when its lease runs out.
//! # Ok(()) }
//! ```
//!
//! Every limiter and barrier works on the state backends of memory, SQLite, Redis and
//! PostgreSQL, each update applied atomically by the backend (a Lua script, or the database's
//! own locking), never as a read-modify-write from the client.

use std::sync::Arc;
use std::time::Duration;

use crate::actor::ActorError;
use crate::error::Result;
use crate::message::now_ms;
use crate::state::StateBackend;
use crate::support::poll_until;

/// The error type name of a limit that was reached, as Dramatiq names it
/// (`dramatiq.RateLimitExceeded`): `Retries` retries it like any other failure.
pub const RATE_LIMIT_EXCEEDED: &str = "RateLimitExceeded";

/// How often a waiting acquire tries again.
const POLL: Duration = Duration::from_millis(20);

/// What an actor does when a limit is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenLimited {
    /// Wait up to this long for room, then fail as [`WhenLimited::Retry`] does.
    Wait(Duration),
    /// Fail now with a [`RATE_LIMIT_EXCEEDED`] error, so `Retries` retries the message with
    /// its backoff.
    Retry,
    /// Skip the message: it is acked and not retried.
    Skip,
}

/// The actor error for a limit still reached under `when`.
fn limited(key: &str, when: WhenLimited) -> ActorError {
    match when {
        WhenLimited::Skip => ActorError::skip(),
        WhenLimited::Wait(_) | WhenLimited::Retry => {
            ActorError::new(RATE_LIMIT_EXCEEDED, format!("the rate limit {key:?} was reached"))
        }
    }
}

/// Calls `attempt` until it succeeds or `when`'s wait is over; the limit's error otherwise.
async fn acquire_with<T, F, Fut>(key: &str, when: WhenLimited, mut attempt: F) -> std::result::Result<T, ActorError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let wait = match when {
        WhenLimited::Wait(wait) => wait,
        _ => Duration::ZERO,
    };
    poll_until(wait, POLL, None, &mut attempt)
        .await
        .map_err(ActorError::from)?
        .ok_or_else(|| limited(key, when))
}

/// At most `limit` holders of a key at once; a distributed mutex at limit 1 (Dramatiq's
/// `ConcurrentRateLimiter`).
///
/// A slot is held by a [`ConcurrentGuard`], renewed in the background while it lives and
/// released when it drops. A holder killed outright (SIGKILL) stops renewing: its slot frees
/// itself when its lease runs out (30 s by default). On Redis the slot count is Dramatiq's
/// counter under the raw key, so Python holders of the same key count too.
#[derive(Clone, Debug)]
pub struct ConcurrentRateLimiter {
    backend: Arc<dyn StateBackend>,
    key: String,
    limit: i64,
    lease: Duration,
}

impl ConcurrentRateLimiter {
    /// At most `limit` (at least 1) holders of `key` at once, with a 30 s lease.
    pub fn new(backend: Arc<dyn StateBackend>, key: impl Into<String>, limit: u32) -> Self {
        Self {
            backend,
            key: key.into(),
            limit: i64::from(limit.max(1)),
            lease: Duration::from_secs(30),
        }
    }

    /// How long a slot outlives its holder's last renewal (default 30 s, at least 1 s): the
    /// time a killed holder keeps its slot. Live holders renew every third of it.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_secs(1));
        self
    }

    /// The key.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Takes a slot if one is free now.
    ///
    /// # Errors
    /// The state backend's.
    pub async fn try_acquire(&self) -> Result<Option<ConcurrentGuard>> {
        let holder = crate::new_message_id();
        if !self
            .backend
            .acquire_slot(&self.key, &holder, self.limit, self.lease)
            .await?
        {
            return Ok(None);
        }
        Ok(Some(ConcurrentGuard::new(self, holder)))
    }

    /// Takes a slot, or does what `when` says while none is free.
    ///
    /// # Errors
    /// [`RATE_LIMIT_EXCEEDED`] (or a skip) when the limit is still reached; the state
    /// backend's errors.
    pub async fn acquire(&self, when: WhenLimited) -> std::result::Result<ConcurrentGuard, ActorError> {
        acquire_with(&self.key, when, || self.try_acquire()).await
    }
}

/// A slot of a [`ConcurrentRateLimiter`]: renewed while it lives, released when dropped (or
/// by [`release`](Self::release), which waits for the backend).
#[derive(Debug)]
pub struct ConcurrentGuard {
    backend: Arc<dyn StateBackend>,
    key: String,
    holder: String,
    lease: Duration,
    renew: Option<tokio::task::JoinHandle<()>>,
}

impl ConcurrentGuard {
    fn new(limiter: &ConcurrentRateLimiter, holder: String) -> Self {
        let backend = Arc::clone(&limiter.backend);
        let (key, lease) = (limiter.key.clone(), limiter.lease);
        let renewing = (Arc::clone(&backend), key.clone(), holder.clone());
        let renew = tokio::runtime::Handle::try_current().ok().map(|rt| {
            rt.spawn(async move {
                let (backend, key, holder) = renewing;
                loop {
                    tokio::time::sleep(lease / 3).await;
                    match backend.renew_slot(&key, &holder, lease).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(key = %key, "a rate-limit slot was lost before its release (its lease ran out)");
                            return;
                        }
                        Err(e) => tracing::warn!(key = %key, error = %e, "could not renew a rate-limit slot"),
                    }
                }
            })
        });
        Self {
            backend,
            key,
            holder,
            lease,
            renew,
        }
    }

    /// This holder's id (unique per acquire).
    #[must_use]
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Releases the slot now and waits for the backend to confirm.
    ///
    /// # Errors
    /// The state backend's (the slot then frees itself when its lease runs out).
    pub async fn release(mut self) -> Result<()> {
        if let Some(renew) = self.renew.take() {
            renew.abort();
        }
        let out = self.backend.release_slot(&self.key, &self.holder, self.lease).await;
        // Released: nothing left for Drop to do.
        self.holder.clear();
        out
    }
}

impl Drop for ConcurrentGuard {
    fn drop(&mut self) {
        if let Some(renew) = self.renew.take() {
            renew.abort();
        }
        if self.holder.is_empty() {
            return;
        }
        let (backend, key, holder, lease) = (
            Arc::clone(&self.backend),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.holder),
            self.lease,
        );
        // Without a runtime (a guard dropped after it shut down) the lease frees the slot.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = backend.release_slot(&key, &holder, lease).await {
                    tracing::warn!(key = %key, error = %e, "could not release a rate-limit slot; it frees itself when its lease runs out");
                }
            });
        }
    }
}

/// At most `limit` acquires per fixed time bucket (Dramatiq's `BucketRateLimiter`): the key
/// of a bucket is `"<key>@<bucket start in ms>"`. Nothing to release; bursts of up to twice
/// the limit are possible across a bucket's edge (use [`WindowRateLimiter`] to avoid them).
#[derive(Clone, Debug)]
pub struct BucketRateLimiter {
    backend: Arc<dyn StateBackend>,
    key: String,
    limit: i64,
    bucket: Duration,
}

impl BucketRateLimiter {
    /// At most `limit` (at least 1) acquires of `key` per `bucket` (at least 1 ms).
    pub fn new(backend: Arc<dyn StateBackend>, key: impl Into<String>, limit: u32, bucket: Duration) -> Self {
        Self {
            backend,
            key: key.into(),
            limit: i64::from(limit.max(1)),
            bucket: bucket.max(Duration::from_millis(1)),
        }
    }

    /// Counts one acquire in the current bucket if it has room.
    ///
    /// # Errors
    /// The state backend's.
    pub async fn try_acquire(&self) -> Result<bool> {
        Ok(self.try_acquire_bucket().await?.is_some())
    }

    /// Counts one acquire in the current bucket if it has room; the bucket's start (ms since
    /// the epoch) when it did.
    ///
    /// # Errors
    /// The state backend's.
    pub async fn try_acquire_bucket(&self) -> Result<Option<u64>> {
        let size = crate::message::duration_ms(self.bucket).max(1);
        let now = now_ms();
        let start = now - now % size;
        let key = format!("{}@{start}", self.key);
        // Kept for two buckets (Dramatiq keeps it one): an attempt that reaches the store late
        // (a busy database) must still find its bucket's count, not an expired key read as 0.
        let ttl = self.bucket.saturating_mul(2);
        if self.backend.add(&key, 1, ttl).await? || self.backend.incr(&key, 1, self.limit, ttl).await? {
            return Ok(Some(start));
        }
        Ok(None)
    }

    /// Counts one acquire, or does what `when` says while the bucket is full; the start (ms
    /// since the epoch) of the bucket it counted in.
    ///
    /// # Errors
    /// As [`ConcurrentRateLimiter::acquire`].
    pub async fn acquire(&self, when: WhenLimited) -> std::result::Result<u64, ActorError> {
        acquire_with(&self.key, when, || self.try_acquire_bucket()).await
    }
}

/// At most `limit` acquires in any sliding window of whole seconds (Dramatiq's
/// `WindowRateLimiter`): one counter per second, `"<key>@<unix seconds>"`, summed over the
/// window.
#[derive(Clone, Debug)]
pub struct WindowRateLimiter {
    backend: Arc<dyn StateBackend>,
    key: String,
    limit: i64,
    window: u64,
}

impl WindowRateLimiter {
    /// At most `limit` (at least 1) acquires of `key` per `window`, rounded up to whole
    /// seconds (at least 1).
    pub fn new(backend: Arc<dyn StateBackend>, key: impl Into<String>, limit: u32, window: Duration) -> Self {
        let secs = window.as_secs() + u64::from(window.subsec_nanos() > 0);
        Self {
            backend,
            key: key.into(),
            limit: i64::from(limit.max(1)),
            window: secs.max(1),
        }
    }

    /// Counts one acquire if the window has room.
    ///
    /// # Errors
    /// The state backend's.
    pub async fn try_acquire(&self) -> Result<bool> {
        let now = now_ms() / 1000;
        let keys: Vec<String> = (0..self.window)
            .map(|i| format!("{}@{}", self.key, now.saturating_sub(i)))
            .collect();
        // Kept a second longer than the window (Dramatiq keeps them the window): an attempt that
        // reaches the store late must still find every second it sums.
        self.backend
            .incr_and_sum(&keys[0], &keys, 1, self.limit, Duration::from_secs(self.window + 1))
            .await
    }

    /// Counts one acquire, or does what `when` says while the window is full.
    ///
    /// # Errors
    /// As [`ConcurrentRateLimiter::acquire`].
    pub async fn acquire(&self, when: WhenLimited) -> std::result::Result<(), ActorError> {
        acquire_with(&self.key, when, || async {
            Ok(self.try_acquire().await?.then_some(()))
        })
        .await
    }
}

/// A barrier of a number of parties (Dramatiq's `Barrier`): a counter under the raw key,
/// decremented by each arrival, with `"<key>@events"` notified when the last party arrives.
/// It is the base of group completion callbacks.
#[derive(Clone, Debug)]
pub struct Barrier {
    backend: Arc<dyn StateBackend>,
    key: String,
    ttl: Duration,
}

impl Barrier {
    /// The barrier at `key`, kept 15 minutes (Dramatiq's default; see [`ttl`](Self::ttl)).
    pub fn new(backend: Arc<dyn StateBackend>, key: impl Into<String>) -> Self {
        Self {
            backend,
            key: key.into(),
            ttl: Duration::from_secs(15 * 60),
        }
    }

    /// How long the barrier lives after its last change. A barrier that expires before every
    /// party arrived counts as cleared, as in Dramatiq.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// The key.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Creates the barrier for `parties` (at least 1). Returns false when it already exists
    /// (it is left as it is).
    ///
    /// # Errors
    /// The state backend's.
    pub async fn create(&self, parties: u32) -> Result<bool> {
        self.backend.add(&self.key, i64::from(parties.max(1)), self.ttl).await
    }

    /// One party arrives without waiting. Returns true when it was the last one (the barrier
    /// is then cleared and its waiters woken).
    ///
    /// # Errors
    /// The state backend's.
    pub async fn arrive(&self) -> Result<bool> {
        if self.backend.decr(&self.key, 1, 1, self.ttl).await? {
            return Ok(false);
        }
        self.backend.notify(&self.events(), self.ttl).await?;
        Ok(true)
    }

    /// One party arrives and waits up to `timeout` for the others. Returns whether the barrier
    /// cleared in time.
    ///
    /// # Errors
    /// The state backend's.
    pub async fn wait(&self, timeout: Duration) -> Result<bool> {
        if self.arrive().await? {
            return Ok(true);
        }
        self.backend.wait(&self.events(), timeout).await
    }

    fn events(&self) -> String {
        format!("{}@events", self.key)
    }
}
