//! What a SQL backend supplies: its statements ([`Dialect`] for the broker, [`Store`] for
//! results, state and tasks) and the rows they exchange with the shared code.

use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use troupe_core::support::Settle;
use troupe_core::{Message, Result, TaskFilter, TaskQuery};

use crate::broker::WakeState;
use crate::settings::SqlOptions;
use crate::tasks::{TaskCountRow, TaskRow, TaskWrite};

/// Job state: delayed until `available_at`.
pub const DELAYED: i64 = 3;
/// Job state: ready to be claimed.
pub const READY: i64 = 0;
/// Job state: claimed by a consumer, under lease.
pub const IN_FLIGHT: i64 = 1;
/// Job state: dead-lettered.
pub const DEAD: i64 = 2;

/// How many rows one maintenance statement deletes at most, so none holds locks for long.
pub const CLEANUP_BATCH: u64 = 1000;

/// A delivery's settle key: the row id and the attempt that claimed it. A settle request
/// matches a row only while that attempt holds it (fencing: a late ack from a worker whose
/// lease was taken over matches nothing).
pub type Key = (i64, i64);

/// A message made ready for the jobs table: encoded, with its queue canonical, its `eta`
/// removed (delays are server-side) and its priority read.
#[derive(Debug)]
#[non_exhaustive]
pub struct Job {
    /// The message as enqueued (returned to the caller).
    pub message: Message,
    /// The encoded message.
    pub body: Vec<u8>,
    /// Claim order: lower first (see [`crate::priority_of`]).
    pub priority: i64,
    /// Delay in milliseconds (0: ready now).
    pub delay_ms: i64,
}

impl Job {
    /// The state the row starts in: [`DELAYED`] or [`READY`].
    #[must_use]
    pub fn state(&self) -> i64 {
        if self.delay_ms > 0 { DELAYED } else { READY }
    }
}

/// A row a claim returned.
#[derive(Debug)]
#[non_exhaustive]
pub struct Claimed {
    /// Row id.
    pub id: i64,
    /// The attempt now holding it (1 on the first claim).
    pub attempt: i64,
    /// Its priority.
    pub priority: i64,
    /// The encoded message.
    pub body: Vec<u8>,
}

impl Claimed {
    /// A claimed row from its columns.
    #[must_use]
    pub fn new(id: i64, attempt: i64, priority: i64, body: Vec<u8>) -> Self {
        Self {
            id,
            attempt,
            priority,
            body,
        }
    }
}

/// A dead-lettered row.
#[derive(Debug)]
#[non_exhaustive]
pub struct DeadRow {
    /// Row id.
    pub id: i64,
    /// The message as the worker last saw it.
    pub body: Vec<u8>,
    /// Why it failed.
    pub reason: Option<String>,
    /// When, in milliseconds since the epoch.
    pub failed_ms: Option<i64>,
}

impl DeadRow {
    /// A dead row from its columns.
    #[must_use]
    pub fn new(id: i64, body: Vec<u8>, reason: Option<String>, failed_ms: Option<i64>) -> Self {
        Self {
            id,
            body,
            reason,
            failed_ms,
        }
    }
}

/// Wakes the consumers of a broker from a backend's own wake-up source (PostgreSQL's
/// LISTEN). Holds the broker weakly: once it is dropped or closed, [`Wake::alive`] turns false
/// and the source should stop.
#[derive(Clone, Debug)]
pub struct Wake {
    pub(crate) state: Weak<WakeState>,
}

impl Wake {
    /// Wakes the consumers of `queue`; false once the broker is gone or closed.
    pub fn queue(&self, queue: &str) -> bool {
        match self.live() {
            Some(state) => {
                state.wakers.wake(queue);
                true
            }
            None => false,
        }
    }

    /// Whether the broker is still open.
    #[must_use]
    pub fn alive(&self) -> bool {
        self.live().is_some()
    }

    fn live(&self) -> Option<Arc<WakeState>> {
        self.state.upgrade().filter(|s| !s.is_closed())
    }
}

/// What [`Store::coordination`] reads: the live `(key, holder)` slots, and per barrier key
/// `(key, arrived, cleared)`.
pub type CoordinationRows = (Vec<(String, String)>, Vec<(String, i64, bool)>);

/// Results, state and task statements of a SQL backend, over one connection pool.
///
/// Every statement is atomic under concurrency (one statement, or one transaction holding the
/// database's lock), keyed as Dramatiq keys results, with TTLs.
pub trait Store: Clone + Debug + Send + Sync + 'static {
    /// The backend's connection pool.
    type Pool: Clone + Debug + Send + Sync + 'static;

    /// The backend's name in errors ("sqlite", "postgres").
    const BACKEND: &'static str;

    /// Statements over `pool`.
    fn from_pool(pool: Self::Pool) -> Self;

    /// The pool.
    fn pool(&self) -> &Self::Pool;

    /// Opens (and migrates) the database a URL names; statements over it, with the URL's
    /// settings.
    fn open_url(url: &str) -> impl Future<Output = Result<Self>> + Send;

    /// The live (unexpired) result stored under `key`.
    fn read_result(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;

    /// Stores (or replaces) a result for `ttl`.
    fn write_result(&self, key: &str, value: Vec<u8>, ttl: Duration) -> impl Future<Output = Result<()>> + Send;

    /// Deletes at most [`CLEANUP_BATCH`] expired results; returns how many.
    fn expire_results(&self) -> impl Future<Output = Result<u64>> + Send;

    /// Sets `key` to `value` unless it holds a live value; whether it was set.
    fn add(&self, key: &str, value: i64, ttl: Duration) -> impl Future<Output = Result<bool>> + Send;

    /// Adds `amount` to the live value of `key` (0 when missing or expired) when the sum stays
    /// within `[min, max]`; whether it did. Concurrent calls never pass the bounds.
    fn bounded(
        &self,
        key: &str,
        amount: i64,
        min: i64,
        max: i64,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Adds `amount` to `key` when the live values of `keys` summed plus `amount` stay at or
    /// under `max`; whether it did. Concurrent calls on one window are serialised.
    fn incr_and_sum(
        &self,
        key: &str,
        keys: &[String],
        amount: i64,
        max: i64,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// The live value of `key`.
    fn counter(&self, key: &str) -> impl Future<Output = Result<Option<i64>>> + Send;

    /// Whether the event `key` is live.
    fn event_seen(&self, key: &str) -> impl Future<Output = Result<bool>> + Send;

    /// Records the event `key` for `ttl`.
    fn write_event(&self, key: &str, ttl: Duration) -> impl Future<Output = Result<()>> + Send;

    /// Applies task writes in order, several in one transaction, each one upsert: it creates
    /// the record when there is none or it expired (replacing every column), and otherwise
    /// applies only when the record is not cancelled and the write's version is at least the
    /// record's. Each applied write keeps the record for `retention` from now. Whether each
    /// applied.
    fn record_tasks(
        &self,
        writes: &[TaskWrite<'_>],
        retention: Duration,
    ) -> impl Future<Output = Result<Vec<bool>>> + Send;

    /// Stores `progress` (JSON text) in a live record, with `updated_at` = `at`, for
    /// `retention` from now; whether there was one.
    fn set_progress(
        &self,
        message_id: &str,
        progress: &str,
        at: i64,
        retention: Duration,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// The live record of `message_id`.
    fn task(&self, message_id: &str) -> impl Future<Output = Result<Option<TaskRow>>> + Send;

    /// The live records of a page: the query's filter, after its cursor, newest first
    /// (`enqueued_at`, then `message_id`, descending), at most its page size.
    fn tasks(&self, query: &TaskQuery) -> impl Future<Output = Result<Vec<TaskRow>>> + Send;

    /// Live records per status, actor and queue, among those `scope` selects (every field it
    /// sets applies; the shared code sets only its actor and queue).
    fn task_counts(&self, scope: &TaskFilter) -> impl Future<Output = Result<Vec<TaskCountRow>>> + Send;

    /// Records in `status` among those of `scope`'s actor and queue, counted on an index
    /// (records expired since the last sweep included).
    fn task_status_count(&self, status: &str, scope: &TaskFilter) -> impl Future<Output = Result<i64>> + Send;

    /// Deletes the record of `message_id`; whether it was live.
    fn delete_task(&self, message_id: &str) -> impl Future<Output = Result<bool>> + Send;

    /// Deletes up to `limit` expired records (oldest expiry first, through the expiry index),
    /// and up to as many expired cancellation requests and unique keys; how many records.
    fn expire_tasks(&self, limit: i64) -> impl Future<Output = Result<u64>> + Send;

    /// In one atomic step: the live record's status before, and when it was enqueued, delayed
    /// or retrying, the record cancelled (`finished_at` = `updated_at` = `at`, no eta, kept
    /// for `retention` from now). `None` when there is no live record.
    fn mark_cancelled(
        &self,
        message_id: &str,
        at: i64,
        retention: Duration,
    ) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Records (or replaces) a cancellation request in `mode` (`"pending"`, `"abort"`) for
    /// `ttl`.
    fn request_cancel(&self, message_id: &str, mode: &str, ttl: Duration) -> impl Future<Output = Result<()>> + Send;

    /// The live cancellation requests among `message_ids`: (message id, mode).
    fn cancels(&self, message_ids: &[String]) -> impl Future<Output = Result<Vec<(String, String)>>> + Send;

    /// Party `party` arrives at barrier `key` with `outcome` (see `StateBackend::arrive`), in one
    /// transaction under the database's lock: (counted, cleared, clearer). The clearing party is
    /// kept as the arrival of the empty party, its id as the outcome.
    fn arrive(
        &self,
        key: &str,
        party: &str,
        outcome: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<(bool, bool, bool)>> + Send;

    /// For inspection, at most `limit` of each: the live `(key, holder)` slots, and per barrier
    /// key its live arrivals and whether it cleared (`(key, arrived, cleared)`), by key.
    fn coordination(&self, limit: usize) -> impl Future<Output = Result<CoordinationRows>> + Send;

    /// The live `(party, outcome)` arrivals at barrier `key` (not the clearer's record).
    fn arrivals(&self, key: &str) -> impl Future<Output = Result<Vec<(String, String)>>> + Send;

    /// Takes one of `limit` slots of `key` for `holder` until `lease` from now (dropping the
    /// key's expired holders first), or renews the holder's; whether it holds one. Atomic
    /// under the database's lock.
    fn acquire_slot(
        &self,
        key: &str,
        holder: &str,
        limit: i64,
        lease: Duration,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Extends a live slot to `lease` from now; whether the holder still had it.
    fn renew_slot(&self, key: &str, holder: &str, lease: Duration) -> impl Future<Output = Result<bool>> + Send;

    /// Deletes a holder's slot.
    fn release_slot(&self, key: &str, holder: &str) -> impl Future<Output = Result<()>> + Send;

    /// In one atomic step: takes `key` for `message_id` for `ttl` unless another message
    /// holds it live; returns the holder after the step (`message_id` when it took the key).
    fn claim_unique(&self, key: &str, message_id: &str, ttl: Duration) -> impl Future<Output = Result<String>> + Send;

    /// Deletes `key` if `message_id` holds it.
    fn release_unique(&self, key: &str, message_id: &str) -> impl Future<Output = Result<()>> + Send;
}

/// The broker statements of a SQL backend: one jobs table whose rows move between the states
/// [`DELAYED`], [`READY`], [`IN_FLIGHT`] and [`DEAD`]. The shared [`SqlBroker`](crate::SqlBroker)
/// decides when each runs; a dialect only says how, on which of its pools, and with which
/// clock (the client's on SQLite, the server's `now()` on PostgreSQL).
pub trait Dialect: Debug + Send + Sync + Sized + 'static {
    /// The results and state statements over the same database.
    type Store: Store;
    /// The backend's options ([`SqlOptions`]).
    type Options: SqlOptions;
    /// A connection of the backend's driver, for enqueueing inside a caller's transaction.
    type Connection: Send;

    /// The backend's name in errors ("sqlite", "postgres").
    const BACKEND: &'static str;
    /// The backend's name in sentences ("SQLite", "PostgreSQL").
    const NAME: &'static str;
    /// Whether an idle consumer reads before it claims. On SQLite a claim takes the database's
    /// write lock even when it finds nothing; on PostgreSQL a claim that finds nothing locks
    /// nothing, so a woken consumer claims at once.
    const LOOK_WHEN_IDLE: bool;
    /// Most settle requests written in one batch.
    const WRITE_BATCH: usize;

    /// Connects to (and migrates) the database the options name.
    fn open(options: &Self::Options) -> impl Future<Output = Result<Self>> + Send;

    /// Statements over an already opened main pool.
    fn from_pool(pool: <Self::Store as Store>::Pool, options: &Self::Options) -> Self;

    /// Results and state statements over the main pool (used to expire results).
    fn store(&self) -> &Self::Store;

    /// Records a queue's name.
    fn declare(&self, queue: &str) -> impl Future<Output = Result<()>> + Send;

    /// Inserts the jobs atomically (all or none), in order.
    fn insert(&self, jobs: &[Job]) -> impl Future<Output = Result<()>> + Send;

    /// Inserts the jobs on a caller's connection (inside its transaction, if it has one).
    fn insert_on(&self, conn: &mut Self::Connection, jobs: &[Job]) -> impl Future<Output = Result<()>> + Send;

    /// Inserts raw bytes as a ready message (bad-input tests).
    fn insert_raw(&self, queue: &str, body: Vec<u8>) -> impl Future<Output = Result<()>> + Send;

    /// Whether `queue` has ready rows, and delayed rows now due.
    fn look(&self, queue: &str) -> impl Future<Output = Result<(bool, bool)>> + Send;

    /// Makes `queue`'s due delayed rows ready.
    fn release_due(&self, queue: &str) -> impl Future<Output = Result<()>> + Send;

    /// Claims at most `max` ready rows of `queue` (lowest priority, then oldest, first) for
    /// `owner`, leased for `lease`, incrementing their attempt.
    fn claim(
        &self,
        queue: &str,
        owner: &str,
        lease: Duration,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Claimed>>> + Send;

    /// Writes a batch of acks (delete), requeues (back to ready) and nacks (dead, with the
    /// reason and the body as last seen), each fenced by its key, in one transaction.
    fn settle(&self, batch: &[Settle<Key>]) -> impl Future<Output = Result<()>> + Send;

    /// Extends the leases of these owners' rows.
    fn renew(&self, owners: &[String], lease: Duration) -> impl Future<Output = Result<()>> + Send;

    /// Returns rows whose lease ran out to ready (not a retry); how many.
    fn return_expired(&self) -> impl Future<Output = Result<u64>> + Send;

    /// Returns one owner's rows to ready; how many.
    fn return_owned(&self, owner: &str) -> impl Future<Output = Result<u64>> + Send;

    /// Deletes at most [`CLEANUP_BATCH`] dead letters older than `ttl`; how many.
    fn expire_dead(&self, ttl: Duration) -> impl Future<Output = Result<u64>> + Send;

    /// Deletes a queue's ready, delayed and dead rows.
    fn purge(&self, queue: &str) -> impl Future<Output = Result<()>> + Send;

    /// Rows of a queue per state.
    fn counts(&self, queue: &str) -> impl Future<Output = Result<Vec<(i64, u64)>>> + Send;

    /// Per-state counts for a quick display: `counts`, unless the backend estimates big ones
    /// (the flag says whether any count is an estimate).
    fn quick_counts(&self, queue: &str) -> impl Future<Output = Result<(Vec<(i64, u64)>, bool)>> + Send {
        async move { Ok((self.counts(queue).await?, false)) }
    }

    /// A queue's dead letters, oldest failure first (all of them without a limit).
    fn dead_rows(&self, queue: &str, limit: Option<usize>) -> impl Future<Output = Result<Vec<DeadRow>>> + Send;

    /// Makes these dead rows of `queue` ready again with new bodies and attempt 0, in one
    /// transaction; how many moved.
    fn revive(&self, queue: &str, rows: &[(i64, Vec<u8>)]) -> impl Future<Output = Result<u64>> + Send;

    /// Deletes a queue's dead letters; how many.
    fn purge_dead(&self, queue: &str) -> impl Future<Output = Result<u64>> + Send;

    /// The bodies of up to `limit` rows of `queue` in `state` (ready: in claim order; delayed:
    /// by due time), after the first `offset`, each with its due time (ms since the epoch).
    fn peek(
        &self,
        queue: &str,
        state: i64,
        offset: usize,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(Vec<u8>, i64)>>> + Send;

    /// Deletes these dead rows of `queue`; how many.
    fn delete_dead(&self, queue: &str, ids: &[i64]) -> impl Future<Output = Result<u64>> + Send;

    /// The declared queues, sorted.
    fn queues(&self) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// Stores a worker's latest heartbeat (`info`, JSON) until `expires_ms`.
    fn beat(&self, id: &str, info: &str, expires_ms: i64) -> impl Future<Output = Result<()>> + Send;

    /// Deletes a worker's heartbeat.
    fn forget_worker(&self, id: &str) -> impl Future<Output = Result<()>> + Send;

    /// The heartbeats that expire after `now_ms` (JSON); expired ones are deleted.
    fn workers(&self, now_ms: i64) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// The backend's own wake-up source, started with the first consumer: a task that calls
    /// [`Wake::queue`] when the server says a queue got messages, until the broker is gone.
    /// `None` where the server has none (consumers then poll, and are woken at once by
    /// enqueues in the same process).
    fn listen(&self, wake: Wake) -> Option<impl Future<Output = ()> + Send + 'static>;

    /// Closes the pools.
    fn close(&self) -> impl Future<Output = ()> + Send;
}
