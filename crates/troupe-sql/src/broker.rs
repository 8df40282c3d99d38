//! The SQL broker: job states, the writer batcher, leases, maintenance and dead letters, once
//! for every backend.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use troupe_core::queue::{is_delay_queue, q_name, validate_queue_name};
use troupe_core::support::{Batcher, Settle, Wakers};
use troupe_core::{
    Broker, Capabilities, Consumer, ConsumerOptions, DeadLetter, Encoder, Error, ErrorKind, JsonEncoder, Message,
    QueueStats, Result, Waiting, WorkerInfo, decode_delivery, encode_checked, now_ms,
};

use crate::consumer::SqlConsumer;
use crate::dialect::{CLEANUP_BATCH, DEAD, DELAYED, Dialect, IN_FLIGHT, Job, Key, READY, Store, Wake};
use crate::settings::{SqlOptions, ms};

/// A durable broker on a SQL database; the backend crates name it (`SqliteBroker`,
/// `PostgresBroker`). Cheap to clone: clones share the pools, the writer and the leases.
pub struct SqlBroker<D: Dialect> {
    pub(crate) shared: Arc<Shared<D>>,
    pub(crate) encoder: Arc<dyn Encoder>,
}

impl<D: Dialect> Clone for SqlBroker<D> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            encoder: Arc::clone(&self.encoder),
        }
    }
}

impl<D: Dialect> std::fmt::Debug for SqlBroker<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlBroker")
            .field("backend", &D::BACKEND)
            .field("options", &self.shared.options)
            .field("broker_id", &self.shared.broker_id)
            .finish_non_exhaustive()
    }
}

/// Wake-ups per queue and whether the broker was closed: what a wake-up source holds (weakly).
#[derive(Debug, Default)]
pub(crate) struct WakeState {
    pub(crate) wakers: Wakers,
    closed: AtomicBool,
}

impl WakeState {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

pub(crate) struct Shared<D: Dialect> {
    pub(crate) dialect: Arc<D>,
    pub(crate) options: D::Options,
    broker_id: String,
    consumers: AtomicU64,
    pub(crate) wake: Arc<WakeState>,
    pub(crate) writer: Batcher<Settle<Key>>,
    /// The consumers of this process whose leases maintenance renews.
    pub(crate) owners: Mutex<HashSet<String>>,
    background: OnceLock<()>,
}

impl<D: Dialect> Shared<D> {
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.wake.is_closed() {
            return Err(Error::backend(
                D::BACKEND,
                ErrorKind::Connection,
                "the broker was closed",
            ));
        }
        Ok(())
    }

    pub(crate) fn forget_owner(&self, owner: &str) {
        self.owners.lock().unwrap_or_else(PoisonError::into_inner).remove(owner);
    }
}

impl<D: Dialect> SqlBroker<D> {
    /// Opens the database a URL names (the backend's URL form and settings).
    ///
    /// # Errors
    /// A bad URL, or a database that cannot be opened, reached or migrated (one line naming
    /// the cause and the fix).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(D::Options::parse_url(url)?).await
    }

    /// Opens the database with these options.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn open(options: D::Options) -> Result<Self> {
        let dialect = D::open(&options).await?;
        Ok(Self::with_dialect(dialect, options))
    }

    /// A broker on an already opened pool (from the backend crate's `open`); its other pools,
    /// if it needs any, connect on first use.
    #[must_use]
    pub fn from_pool(pool: <D::Store as Store>::Pool, options: D::Options) -> Self {
        let dialect = D::from_pool(pool, &options);
        Self::with_dialect(dialect, options)
    }

    fn with_dialect(dialect: D, options: D::Options) -> Self {
        let dialect = Arc::new(dialect);
        let for_writer = Arc::clone(&dialect);
        let writer = Batcher::spawn(D::BACKEND, D::WRITE_BATCH, move |batch: Vec<Settle<Key>>| {
            let dialect = Arc::clone(&for_writer);
            async move { dialect.settle(&batch).await }
        });
        Self {
            shared: Arc::new(Shared {
                dialect,
                options,
                broker_id: uuid::Uuid::new_v4().simple().to_string(),
                consumers: AtomicU64::new(0),
                wake: Arc::default(),
                writer,
                owners: Mutex::new(HashSet::new()),
                background: OnceLock::new(),
            }),
            encoder: Arc::new(JsonEncoder),
        }
    }

    /// The same broker (same pools, writer and leases) encoding and decoding messages with
    /// another encoder. Messages already queued keep the encoding they were written with.
    #[must_use]
    pub fn with_encoder(self, encoder: Arc<dyn Encoder>) -> Self {
        Self {
            shared: self.shared,
            encoder,
        }
    }

    /// This broker as a shared trait object.
    #[must_use]
    pub fn into_dyn(self) -> Arc<dyn Broker> {
        Arc::new(self)
    }

    /// The main connection pool (share it with the results and state backends, or run your
    /// own queries on the same database).
    #[must_use]
    pub fn pool(&self) -> &<D::Store as Store>::Pool {
        self.shared.dialect.store().pool()
    }

    /// The results and state statements over the main pool, with the broker's settings (for
    /// `SqlResults::from_store` and `SqlState::from_store`).
    #[must_use]
    pub fn store(&self) -> &D::Store {
        self.shared.dialect.store()
    }

    /// The options it was opened with.
    #[must_use]
    pub fn options(&self) -> &D::Options {
        &self.shared.options
    }

    /// Enqueues `message` on `conn`, inside the caller's transaction if it has one: the
    /// message exists if and only if that transaction commits, so a business write and the
    /// task it triggers stand or fall together. Consumers see it at their next poll (or, on
    /// PostgreSQL, when the commit's notification arrives).
    ///
    /// App middleware `before_enqueue`/`after_enqueue` hooks do not run on this path.
    ///
    /// # Errors
    /// An invalid queue name, an oversized message, or a database error.
    pub async fn enqueue_in(
        &self,
        conn: &mut D::Connection,
        message: Message,
        delay: Option<Duration>,
    ) -> Result<Message> {
        let mut enqueued = self.enqueue_many_in(conn, vec![(message, delay)]).await?;
        enqueued
            .pop()
            .ok_or_else(|| Error::backend(D::BACKEND, ErrorKind::Other, "the insert returned no message"))
    }

    /// Enqueues `messages` on `conn` (inside the caller's transaction, if it has one) in one
    /// statement or transaction: they become visible when it commits. Messages of one queue
    /// are consumed in the order given.
    ///
    /// # Errors
    /// As [`enqueue_in`](Self::enqueue_in).
    pub async fn enqueue_many_in(
        &self,
        conn: &mut D::Connection,
        messages: Vec<(Message, Option<Duration>)>,
    ) -> Result<Vec<Message>> {
        self.shared.check_open()?;
        let jobs = self.jobs(messages)?;
        self.shared.dialect.insert_on(conn, &jobs).await?;
        Ok(jobs.into_iter().map(|job| job.message).collect())
    }

    /// Writes raw bytes as a ready message of `queue`, bypassing the encoder (to test what
    /// workers do with bad input).
    ///
    /// # Errors
    /// A database error.
    pub async fn enqueue_raw(&self, queue: &str, bytes: Vec<u8>) -> Result<()> {
        self.shared.check_open()?;
        let queue = q_name(queue);
        self.shared.dialect.insert_raw(queue, bytes).await?;
        self.shared.wake.wakers.wake(queue);
        Ok(())
    }

    /// Runs one maintenance pass now: renews this process's leases, returns expired leases to
    /// their queues, and deletes dead letters past their TTL and expired results in batches.
    /// Returns how many messages came back.
    ///
    /// # Errors
    /// A database error.
    pub async fn maintain(&self) -> Result<u64> {
        maintain(&self.shared, true).await
    }

    fn jobs(&self, messages: Vec<(Message, Option<Duration>)>) -> Result<Vec<Job>> {
        let max = self.shared.options.common().max_message_size;
        messages
            .into_iter()
            .map(|(mut message, delay)| {
                message.queue_name = q_name(&message.queue_name).to_owned();
                validate_queue_name(&message.queue_name)?;
                message.clear_eta();
                let body = encode_checked(self.encoder.as_ref(), &message, max)?;
                Ok(Job {
                    priority: crate::priority_of(&message),
                    delay_ms: delay.map_or(0, ms),
                    message,
                    body,
                })
            })
            .collect()
    }

    fn start_background(&self) {
        if self.shared.background.set(()).is_err() {
            return;
        }
        let every = (self.shared.options.common().lease / 3).clamp(Duration::from_millis(50), Duration::from_secs(10));
        tokio::spawn(maintenance_loop(Arc::downgrade(&self.shared), every));
        let wake = Wake {
            state: Arc::downgrade(&self.shared.wake),
        };
        if let Some(source) = self.shared.dialect.listen(wake) {
            tokio::spawn(source);
        }
    }
}

async fn maintenance_loop<D: Dialect>(weak: Weak<Shared<D>>, every: Duration) {
    let cleanup_every = (60_000 / u64::try_from(ms(every)).unwrap_or(1).max(1)).max(1);
    let mut ticks: u64 = 0;
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.wake.is_closed() {
            return;
        }
        ticks += 1;
        if let Err(e) = maintain(&shared, ticks.is_multiple_of(cleanup_every)).await {
            tracing::warn!(error = %e, backend = D::BACKEND, "maintenance failed; retrying at the next tick");
        }
    }
}

async fn maintain<D: Dialect>(shared: &Shared<D>, cleanup: bool) -> Result<u64> {
    let common = shared.options.common();
    let owners: Vec<String> = shared
        .owners
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .cloned()
        .collect();
    if !owners.is_empty() {
        shared.dialect.renew(&owners, common.lease).await?;
    }
    let back = shared.dialect.return_expired().await?;
    if back > 0 {
        tracing::warn!(
            messages = back,
            "returned messages whose worker stopped renewing its lease (killed?)"
        );
        shared.wake.wakers.wake_all();
    }
    if cleanup {
        // Short statements, so none holds locks for long.
        while shared.dialect.expire_dead(common.dead_letter_ttl).await? >= CLEANUP_BATCH {}
        while shared.dialect.store().expire_results().await? >= CLEANUP_BATCH {}
        let batch = i64::try_from(CLEANUP_BATCH).unwrap_or(i64::MAX);
        while shared.dialect.store().expire_tasks(batch).await? >= CLEANUP_BATCH {}
    }
    Ok(back)
}

#[async_trait]
impl<D: Dialect> Broker for SqlBroker<D> {
    fn backend(&self) -> &'static str {
        D::BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::native_delays()
    }

    fn encoder(&self) -> Arc<dyn Encoder> {
        Arc::clone(&self.encoder)
    }

    async fn declare_queue(&self, queue: &str) -> Result<()> {
        self.shared.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        self.shared.dialect.declare(canonical).await
    }

    async fn enqueue(&self, message: Message, delay: Option<Duration>) -> Result<Message> {
        let mut enqueued = self.enqueue_many(vec![(message, delay)]).await?;
        enqueued
            .pop()
            .ok_or_else(|| Error::backend(D::BACKEND, ErrorKind::Other, "enqueue returned no message"))
    }

    async fn enqueue_many(&self, messages: Vec<(Message, Option<Duration>)>) -> Result<Vec<Message>> {
        self.shared.check_open()?;
        let jobs = self.jobs(messages)?;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        self.shared.dialect.insert(&jobs).await?;
        let ready: HashSet<&str> = jobs
            .iter()
            .filter(|job| job.state() == READY)
            .map(|job| job.message.queue_name.as_str())
            .collect();
        for queue in ready {
            self.shared.wake.wakers.wake(queue);
        }
        Ok(jobs.into_iter().map(|job| job.message).collect())
    }

    async fn consume(&self, queue: &str, _options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        self.shared.check_open()?;
        if is_delay_queue(queue) {
            return Err(Error::Config(format!(
                "the {} broker delays messages in place; consume {:?}, not {queue:?}",
                D::NAME,
                q_name(queue)
            )));
        }
        validate_queue_name(queue)?;
        let n = self.shared.consumers.fetch_add(1, Ordering::Relaxed);
        let owner = format!("{}-{n}", self.shared.broker_id);
        self.shared
            .owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(owner.clone());
        self.start_background();
        Ok(Box::new(SqlConsumer::new(self.clone(), queue, owner)))
    }

    async fn purge(&self, queue: &str) -> Result<()> {
        self.shared.check_open()?;
        self.shared.dialect.purge(q_name(queue)).await
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats> {
        self.shared.check_open()?;
        let counts = self.shared.dialect.counts(q_name(queue)).await?;
        Ok(queue_stats(&counts, false))
    }

    async fn quick_stats(&self, queue: &str) -> Result<QueueStats> {
        self.shared.check_open()?;
        let (counts, approximate) = self.shared.dialect.quick_counts(q_name(queue)).await?;
        Ok(queue_stats(&counts, approximate))
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        self.shared.check_open()?;
        let rows = self.shared.dialect.dead_rows(q_name(queue), Some(limit)).await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let message = decode_delivery(self.encoder.as_ref(), &row.body, usize::MAX);
                let key = message
                    .as_ref()
                    .map_or_else(|_| format!("row-{}", row.id), |m| m.message_id.clone());
                let failed_at = u64::try_from(row.failed_ms.unwrap_or(0)).unwrap_or(0);
                DeadLetter::new(key, message, row.reason.unwrap_or_default(), failed_at)
            })
            .collect())
    }

    async fn requeue_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        self.shared.check_open()?;
        let queue = q_name(queue);
        let mut revived = Vec::new();
        for row in self.shared.dialect.dead_rows(queue, None).await? {
            let Ok(mut message) = self.encoder.decode(&row.body) else {
                continue;
            };
            let row_key = format!("row-{}", row.id);
            if !ids.is_empty() && !ids.iter().any(|i| *i == message.message_id || *i == row_key) {
                continue;
            }
            message.set_retries(0);
            message.clear_eta();
            revived.push((row.id, self.encoder.encode(&message)?));
        }
        if revived.is_empty() {
            return Ok(0);
        }
        let moved = self.shared.dialect.revive(queue, &revived).await?;
        if moved > 0 {
            self.shared.wake.wakers.wake(queue);
        }
        Ok(moved)
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<u64> {
        self.shared.check_open()?;
        self.shared.dialect.purge_dead(q_name(queue)).await
    }

    async fn peek(&self, queue: &str, which: Waiting, offset: usize, limit: usize) -> Result<Vec<Message>> {
        self.shared.check_open()?;
        let state = if which == Waiting::Delayed { DELAYED } else { READY };
        let rows = self.shared.dialect.peek(q_name(queue), state, offset, limit).await?;
        Ok(rows
            .iter()
            .filter_map(|(body, due)| {
                let mut message = self.encoder.decode(body).ok()?;
                // A delayed row's eta is its due time (the body carries none: the database
                // delays it).
                if which == Waiting::Delayed && message.eta().is_none() {
                    message.set_eta(u64::try_from(*due).unwrap_or(0));
                }
                Some(message)
            })
            .collect())
    }

    async fn delete_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        self.shared.check_open()?;
        if ids.is_empty() {
            return Ok(0);
        }
        let queue = q_name(queue);
        let mut rows = Vec::new();
        for row in self.shared.dialect.dead_rows(queue, None).await? {
            let row_key = format!("row-{}", row.id);
            let matches = ids.contains(&row_key)
                || self
                    .encoder
                    .decode(&row.body)
                    .is_ok_and(|m| ids.contains(&m.message_id));
            if matches {
                rows.push(row.id);
            }
        }
        if rows.is_empty() {
            return Ok(0);
        }
        self.shared.dialect.delete_dead(queue, &rows).await
    }

    async fn queue_names(&self) -> Result<Vec<String>> {
        self.shared.check_open()?;
        self.shared.dialect.queues().await
    }

    async fn beat(&self, worker: &WorkerInfo) -> Result<()> {
        self.shared.check_open()?;
        let info = serde_json::to_string(worker).map_err(|e| Error::Encode(e.to_string()))?;
        let expires = i64::try_from(worker.expires_at).unwrap_or(i64::MAX);
        self.shared.dialect.beat(&worker.id, &info, expires).await
    }

    async fn forget_worker(&self, id: &str) -> Result<()> {
        self.shared.check_open()?;
        self.shared.dialect.forget_worker(id).await
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.shared.check_open()?;
        let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        Ok(self
            .shared
            .dialect
            .workers(now)
            .await?
            .iter()
            .filter_map(|info| serde_json::from_str(info).ok())
            .collect())
    }

    async fn close(&self) -> Result<()> {
        self.shared.wake.closed.store(true, Ordering::Relaxed);
        self.shared.wake.wakers.wake_all();
        self.shared.dialect.close().await;
        Ok(())
    }
}

/// Queue counts from per-state rows.
fn queue_stats(counts: &[(i64, u64)], approximate: bool) -> QueueStats {
    let (mut ready, mut delayed, mut in_flight, mut dead) = (0, 0, 0, 0);
    for &(state, count) in counts {
        match state {
            READY => ready = count,
            DELAYED => delayed = count,
            IN_FLIGHT => in_flight = count,
            DEAD => dead = count,
            _ => {}
        }
    }
    let mut stats = QueueStats::new(ready, delayed, in_flight, dead);
    stats.approximate = approximate;
    stats
}
