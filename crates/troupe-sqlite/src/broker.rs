//! The SQLite broker.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Row, SqlitePool};
use tokio::sync::Notify;
use troupe_core::queue::{is_delay_queue, q_name, validate_queue_name};
use troupe_core::support::{BatchedAck, Batcher, Settle, SettleOp};
use troupe_core::{
    Broker, Capabilities, Consumer, ConsumerOptions, DeadLetter, Delivery, Encoder, Error, ErrorKind, JsonEncoder,
    Message, QueueStats, Result, decode_delivery, encode_checked,
};

use crate::db::{self, BACKEND, SqliteOptions, db_error, ms, now};

const READY: i64 = 0;
const IN_FLIGHT: i64 = 1;
const DEAD: i64 = 2;
const DELAYED: i64 = 3;

/// Most acks, nacks and requeues written in one transaction.
const WRITE_BATCH: usize = 512;

/// A durable broker in one SQLite file. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SqliteBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: SqlitePool,
    /// Where claims run: `pool` itself, or with `durability=full` one connection that commits
    /// without syncing (see [`claim_pool`]).
    claims: SqlitePool,
    options: SqliteOptions,
    encoder: Arc<dyn Encoder>,
    broker_id: String,
    consumers: AtomicU64,
    wake: Notify,
    writer: Batcher<Settle<Key>>,
    owners: Mutex<HashSet<String>>,
    maintenance: OnceLock<()>,
    closed: AtomicBool,
}

type Key = (i64, i64);

/// The pool claims run on. With `durability=full`, a connection of its own with
/// `synchronous=NORMAL`: a claim's commit then waits for no fsync. That is safe because every
/// write that matters after a claim (the ack, the nack, the retry's enqueue) commits on a FULL
/// connection, and syncing the WAL file then syncs the claim's earlier frames with it; a claim
/// lost to a power cut leaves its message ready, to be claimed again (at-least-once). With
/// `durability=normal` every connection already commits that way: claims share the pool.
fn claim_pool(pool: &SqlitePool, options: &SqliteOptions) -> SqlitePool {
    if options.durability != crate::Durability::Full {
        return pool.clone();
    }
    let connect = (*pool.connect_options())
        .clone()
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
    db::pool_options().max_connections(1).connect_lazy_with(connect)
}

fn writer(pool: &SqlitePool) -> Batcher<Settle<Key>> {
    let pool = pool.clone();
    Batcher::spawn(BACKEND, WRITE_BATCH, move |batch: Vec<Settle<Key>>| {
        let pool = pool.clone();
        async move { write_batch(&pool, &batch).await }
    })
}

impl SqliteBroker {
    /// Opens the database a `sqlite://PATH` URL names (see [`SqliteOptions::from_url`]).
    ///
    /// # Errors
    /// A bad URL, or a file that cannot be opened or is not a Troupe database.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(SqliteOptions::from_url(url)?).await
    }

    /// Opens the database with these options.
    ///
    /// # Errors
    /// A file that cannot be opened or is not a Troupe database.
    pub async fn open(options: SqliteOptions) -> Result<Self> {
        let pool = db::open(&options).await?;
        Ok(Self::from_pool(pool, options))
    }

    /// A broker on an already opened pool (from [`crate::open`]).
    #[must_use]
    pub fn from_pool(pool: SqlitePool, options: SqliteOptions) -> Self {
        let writer = writer(&pool);
        Self {
            inner: Arc::new(Inner {
                claims: claim_pool(&pool, &options),
                pool,
                options,
                encoder: Arc::new(JsonEncoder),
                broker_id: uuid::Uuid::new_v4().simple().to_string(),
                consumers: AtomicU64::new(0),
                wake: Notify::new(),
                writer,
                owners: Mutex::new(HashSet::new()),
                maintenance: OnceLock::new(),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// The same broker writing messages with another encoder.
    #[must_use]
    pub fn with_encoder(self, encoder: Arc<dyn Encoder>) -> Self {
        let inner = &self.inner;
        let writer = writer(&inner.pool);
        Self {
            inner: Arc::new(Inner {
                pool: inner.pool.clone(),
                claims: inner.claims.clone(),
                options: inner.options.clone(),
                encoder,
                broker_id: inner.broker_id.clone(),
                consumers: AtomicU64::new(0),
                wake: Notify::new(),
                writer,
                owners: Mutex::new(HashSet::new()),
                maintenance: OnceLock::new(),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// The connection pool (share it with [`crate::SqliteResults`] and [`crate::SqliteState`]).
    #[must_use]
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// The options it was opened with.
    #[must_use]
    pub fn options(&self) -> &SqliteOptions {
        &self.inner.options
    }

    /// Writes raw bytes as a ready message of `queue`, bypassing the encoder (to test what
    /// workers do with bad input).
    ///
    /// # Errors
    /// A database error.
    pub async fn enqueue_raw(&self, queue: &str, bytes: Vec<u8>) -> Result<()> {
        let t = now();
        sqlx::query(
            "INSERT INTO troupe_jobs (queue, message_id, priority, state, available_at, enqueued_at, body)
             VALUES (?1, ?2, 0, 0, ?3, ?3, ?4)",
        )
        .bind(q_name(queue))
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(t)
        .bind(bytes)
        .execute(&self.inner.pool)
        .await
        .map_err(|e| db_error("enqueue raw bytes", e))?;
        self.inner.wake.notify_waiters();
        Ok(())
    }

    /// Runs one maintenance pass now: renews this process's leases, returns expired leases to
    /// their queues and drops dead letters past their TTL. Returns how many messages came back.
    ///
    /// # Errors
    /// A database error.
    pub async fn maintain(&self) -> Result<u64> {
        maintain(&self.inner, true).await
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(Error::backend(BACKEND, ErrorKind::Connection, "the broker was closed"));
        }
        Ok(())
    }

    fn start_maintenance(&self) {
        if self.inner.maintenance.set(()).is_err() {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let every = (self.inner.options.lease / 3).clamp(Duration::from_millis(50), Duration::from_secs(10));
        tokio::spawn(maintenance_loop(weak, every));
    }
}

async fn maintenance_loop(weak: Weak<Inner>, every: Duration) {
    let mut ticks: u64 = 0;
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::Relaxed) {
            return;
        }
        ticks += 1;
        let expire_dead = ticks.is_multiple_of((60_000 / u64::try_from(ms(every)).unwrap_or(1).max(1)).max(1));
        if let Err(e) = maintain(&inner, expire_dead).await {
            tracing::warn!(error = %e, "SQLite maintenance failed; retrying at the next tick");
        }
    }
}

async fn maintain(inner: &Inner, expire_dead: bool) -> Result<u64> {
    let t = now();
    let owners: Vec<String> = inner
        .owners
        .lock()
        .map(|o| o.iter().cloned().collect())
        .unwrap_or_default();
    if !owners.is_empty() {
        let list = serde_json::to_string(&owners).map_err(|e| Error::Encode(e.to_string()))?;
        sqlx::query(
            "UPDATE troupe_jobs SET lease_until = ?1
             WHERE state = 1 AND lease_owner IN (SELECT value FROM json_each(?2))",
        )
        .bind(t + ms(inner.options.lease))
        .bind(list)
        .execute(&inner.pool)
        .await
        .map_err(|e| db_error("renew leases", e))?;
    }
    let back = sqlx::query(
        "UPDATE troupe_jobs SET state = 0, lease_owner = NULL, lease_until = NULL
         WHERE state = 1 AND lease_until < ?1",
    )
    .bind(t)
    .execute(&inner.pool)
    .await
    .map_err(|e| db_error("return expired leases", e))?
    .rows_affected();
    if back > 0 {
        tracing::warn!(
            messages = back,
            "returned messages whose worker stopped renewing its lease (killed?)"
        );
        inner.wake.notify_waiters();
    }
    if expire_dead {
        let cutoff = t - ms(inner.options.dead_letter_ttl);
        loop {
            let gone = sqlx::query(
                "DELETE FROM troupe_jobs WHERE id IN
                 (SELECT id FROM troupe_jobs WHERE state = 2 AND failed_at < ?1 LIMIT 1000)",
            )
            .bind(cutoff)
            .execute(&inner.pool)
            .await
            .map_err(|e| db_error("expire dead letters", e))?
            .rows_affected();
            if gone < 1000 {
                break;
            }
        }
    }
    Ok(back)
}

async fn write_batch(pool: &SqlitePool, batch: &[Settle<Key>]) -> Result<()> {
    // Acks and requeues go in one statement each (a JSON array of [id, attempt] pairs): one
    // round trip to SQLite's thread for the whole batch. Nacks, rare, go one by one.
    let mut acks = Vec::new();
    let mut requeues = Vec::new();
    for w in batch {
        match w.op {
            SettleOp::Ack => acks.push([w.key.0, w.key.1]),
            SettleOp::Requeue => requeues.push([w.key.0, w.key.1]),
            SettleOp::Nack { .. } => {}
        }
    }
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| db_error("begin a write", e))?;
    if !acks.is_empty() {
        sqlx::query(
            "DELETE FROM troupe_jobs WHERE state = 1 AND (id, attempt) IN
             (SELECT value ->> 0, value ->> 1 FROM json_each(?1))",
        )
        .bind(serde_json::to_string(&acks).map_err(|e| Error::Encode(e.to_string()))?)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("ack messages", e))?;
    }
    if !requeues.is_empty() {
        sqlx::query(
            "UPDATE troupe_jobs SET state = 0, lease_owner = NULL, lease_until = NULL
             WHERE state = 1 AND (id, attempt) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?1))",
        )
        .bind(serde_json::to_string(&requeues).map_err(|e| Error::Encode(e.to_string()))?)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("requeue messages", e))?;
    }
    let t = now();
    for w in batch {
        if let SettleOp::Nack { body, reason } = &w.op {
            sqlx::query(
                "UPDATE troupe_jobs SET state = 2, lease_owner = NULL, lease_until = NULL,
                 reason = ?3, failed_at = ?4, body = COALESCE(?5, body)
                 WHERE id = ?1 AND attempt = ?2 AND state = 1",
            )
            .bind(w.key.0)
            .bind(w.key.1)
            .bind(reason.as_str())
            .bind(t)
            .bind(body.as_deref())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("dead-letter a message", e))?;
        }
    }
    tx.commit().await.map_err(|e| db_error("commit settled messages", e))
}

#[async_trait]
impl Broker for SqliteBroker {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::native_delays()
    }

    fn encoder(&self) -> Arc<dyn Encoder> {
        Arc::clone(&self.inner.encoder)
    }

    async fn declare_queue(&self, queue: &str) -> Result<()> {
        self.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        sqlx::query("INSERT OR IGNORE INTO troupe_queues (name) VALUES (?1)")
            .bind(canonical)
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("declare a queue", e))?;
        Ok(())
    }

    async fn enqueue(&self, message: Message, delay: Option<Duration>) -> Result<Message> {
        self.check_open()?;
        let job = Job::new(&self.inner, message, delay)?;
        job.insert(now(), &self.inner.pool)
            .await
            .map_err(|e| db_error("enqueue a message", e))?;
        if job.state == READY {
            self.inner.wake.notify_waiters();
        }
        Ok(job.message)
    }

    async fn enqueue_many(&self, messages: Vec<(Message, Option<Duration>)>) -> Result<Vec<Message>> {
        self.check_open()?;
        let jobs = messages
            .into_iter()
            .map(|(message, delay)| Job::new(&self.inner, message, delay))
            .collect::<Result<Vec<_>>>()?;
        let write = async {
            let mut tx = self.inner.pool.begin().await?;
            let t = now();
            for job in &jobs {
                job.insert(t, &mut *tx).await?;
            }
            tx.commit().await
        };
        write.await.map_err(|e| db_error("enqueue messages", e))?;
        if jobs.iter().any(|job| job.state == READY) {
            self.inner.wake.notify_waiters();
        }
        Ok(jobs.into_iter().map(|job| job.message).collect())
    }

    async fn consume(&self, queue: &str, _options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        self.check_open()?;
        if is_delay_queue(queue) {
            return Err(Error::Config(format!(
                "the SQLite broker delays messages in place; consume {:?}, not {queue:?}",
                q_name(queue)
            )));
        }
        validate_queue_name(queue)?;
        let n = self.inner.consumers.fetch_add(1, Ordering::Relaxed);
        let owner = format!("{}-{n}", self.inner.broker_id);
        if let Ok(mut owners) = self.inner.owners.lock() {
            owners.insert(owner.clone());
        }
        self.start_maintenance();
        Ok(Box::new(SqliteConsumer {
            broker: self.clone(),
            queue: queue.to_owned(),
            owner,
            busy: false,
            last_promote: None,
        }))
    }

    async fn purge(&self, queue: &str) -> Result<()> {
        self.check_open()?;
        sqlx::query("DELETE FROM troupe_jobs WHERE queue = ?1 AND state IN (0, 2, 3)")
            .bind(q_name(queue))
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("purge a queue", e))?;
        Ok(())
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats> {
        self.check_open()?;
        let rows = sqlx::query("SELECT state, COUNT(*) FROM troupe_jobs WHERE queue = ?1 GROUP BY state")
            .bind(q_name(queue))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| db_error("count messages", e))?;
        let (mut ready, mut delayed, mut in_flight, mut dead) = (0, 0, 0, 0);
        for row in rows {
            let state: i64 = row.try_get(0).map_err(|e| db_error("read stats", e))?;
            let count: i64 = row.try_get(1).map_err(|e| db_error("read stats", e))?;
            let count = u64::try_from(count).unwrap_or(0);
            match state {
                READY => ready = count,
                DELAYED => delayed = count,
                IN_FLIGHT => in_flight = count,
                DEAD => dead = count,
                _ => {}
            }
        }
        Ok(QueueStats::new(ready, delayed, in_flight, dead))
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        self.check_open()?;
        let rows = sqlx::query(
            "SELECT id, message_id, body, reason, failed_at FROM troupe_jobs
             WHERE queue = ?1 AND state = 2 ORDER BY failed_at, id LIMIT ?2",
        )
        .bind(q_name(queue))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(|e| db_error("list dead letters", e))?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.try_get("id").map_err(|e| db_error("read a dead letter", e))?;
                let body: Vec<u8> = row.try_get("body").map_err(|e| db_error("read a dead letter", e))?;
                let reason: Option<String> = row.try_get("reason").map_err(|e| db_error("read a dead letter", e))?;
                let failed_at: Option<i64> = row
                    .try_get("failed_at")
                    .map_err(|e| db_error("read a dead letter", e))?;
                let message = decode_delivery(self.inner.encoder.as_ref(), &body, usize::MAX);
                let key = message
                    .as_ref()
                    .map_or_else(|_| format!("row-{id}"), |m| m.message_id.clone());
                Ok(DeadLetter::new(
                    key,
                    message,
                    reason.unwrap_or_default(),
                    u64::try_from(failed_at.unwrap_or(0)).unwrap_or(0),
                ))
            })
            .collect()
    }

    async fn requeue_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        self.check_open()?;
        let rows =
            sqlx::query("SELECT id, body FROM troupe_jobs WHERE queue = ?1 AND state = 2 ORDER BY failed_at, id")
                .bind(q_name(queue))
                .fetch_all(&self.inner.pool)
                .await
                .map_err(|e| db_error("list dead letters", e))?;
        let mut tx = self
            .inner
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db_error("begin a requeue", e))?;
        let mut moved = 0;
        let t = now();
        for row in rows {
            let id: i64 = row.try_get("id").map_err(|e| db_error("read a dead letter", e))?;
            let body: Vec<u8> = row.try_get("body").map_err(|e| db_error("read a dead letter", e))?;
            let Ok(mut message) = self.inner.encoder.decode(&body) else {
                continue;
            };
            if !ids.is_empty()
                && !ids
                    .iter()
                    .any(|i| *i == message.message_id || *i == format!("row-{id}"))
            {
                continue;
            }
            message.options.insert("retries".into(), 0.into());
            message.options.shift_remove("eta");
            let body = self.inner.encoder.encode(&message)?;
            moved += sqlx::query(
                "UPDATE troupe_jobs SET state = 0, body = ?2, attempt = 0, available_at = ?3, reason = NULL,
                 failed_at = NULL WHERE id = ?1 AND state = 2",
            )
            .bind(id)
            .bind(body)
            .bind(t)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("requeue a dead letter", e))?
            .rows_affected();
        }
        tx.commit().await.map_err(|e| db_error("commit the requeue", e))?;
        if moved > 0 {
            self.inner.wake.notify_waiters();
        }
        Ok(moved)
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<u64> {
        self.check_open()?;
        Ok(sqlx::query("DELETE FROM troupe_jobs WHERE queue = ?1 AND state = 2")
            .bind(q_name(queue))
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("purge dead letters", e))?
            .rows_affected())
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.wake.notify_waiters();
        self.inner.claims.close().await;
        self.inner.pool.close().await;
        Ok(())
    }
}

#[derive(Debug)]
struct SqliteConsumer {
    broker: SqliteBroker,
    queue: String,
    owner: String,
    /// The last claim filled its batch: claim again without checking first.
    busy: bool,
    last_promote: Option<std::time::Instant>,
}

impl SqliteConsumer {
    async fn claim(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let inner = &self.broker.inner;
        let t = now();
        let promote = self
            .last_promote
            .is_none_or(|at| at.elapsed() >= inner.options.poll_interval);
        if promote || !self.busy {
            // A read first, so idle consumers do not take the write lock for nothing.
            let row = sqlx::query(
                "SELECT EXISTS (SELECT 1 FROM troupe_jobs WHERE state = 0 AND queue = ?1),
                        EXISTS (SELECT 1 FROM troupe_jobs WHERE state = 3 AND queue = ?1 AND available_at <= ?2)",
            )
            .bind(&self.queue)
            .bind(t)
            .fetch_one(&inner.pool)
            .await
            .map_err(|e| db_error("look for messages", e))?;
            let ready: bool = row.try_get(0).map_err(|e| db_error("look for messages", e))?;
            let due: bool = row.try_get(1).map_err(|e| db_error("look for messages", e))?;
            self.last_promote = Some(std::time::Instant::now());
            if due {
                sqlx::query("UPDATE troupe_jobs SET state = 0 WHERE state = 3 AND queue = ?1 AND available_at <= ?2")
                    .bind(&self.queue)
                    .bind(t)
                    .execute(&inner.pool)
                    .await
                    .map_err(|e| db_error("release due delayed messages", e))?;
            }
            if !ready && !due {
                self.busy = false;
                return Ok(Vec::new());
            }
        }
        let rows = sqlx::query(
            "UPDATE troupe_jobs SET state = 1, attempt = attempt + 1, lease_owner = ?1, lease_until = ?2
             WHERE id IN (SELECT id FROM troupe_jobs WHERE state = 0 AND queue = ?3 ORDER BY priority, id LIMIT ?4)
             RETURNING id, attempt, priority, body",
        )
        .bind(&self.owner)
        .bind(t + ms(inner.options.lease))
        .bind(&self.queue)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&inner.claims)
        .await
        .map_err(|e| db_error("claim messages", e))?;
        let mut claimed: Vec<(i64, i64, i64, Vec<u8>)> = rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get("priority")?,
                    r.try_get("id")?,
                    r.try_get("attempt")?,
                    r.try_get("body")?,
                ))
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(|e| db_error("read claimed messages", e))?;
        claimed.sort_by_key(|(priority, id, _, _)| (*priority, *id));
        self.busy = claimed.len() == max;
        Ok(claimed
            .into_iter()
            .map(|(_, id, attempt, body)| {
                let message = decode_delivery(inner.encoder.as_ref(), &body, inner.options.max_message_size);
                let handle = BatchedAck::new(inner.writer.clone(), (id, attempt), Arc::clone(&inner.encoder));
                Delivery::new(self.queue.clone(), message, attempt > 1, Box::new(handle))
            })
            .collect())
    }
}

#[async_trait]
impl Consumer for SqliteConsumer {
    async fn fetch(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        self.broker.check_open()?;
        let deadline = tokio::time::Instant::now() + timeout;
        let inner = Arc::clone(&self.broker.inner);
        loop {
            let notified = inner.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = self.claim(max.max(1)).await?;
            if !got.is_empty() {
                return Ok(got);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let nap = inner.options.poll_interval.min(deadline - now);
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(nap) => {}
            }
        }
    }

    async fn close(self: Box<Self>) -> Result<()> {
        if let Ok(mut owners) = self.broker.inner.owners.lock() {
            owners.remove(&self.owner);
        }
        if self.broker.inner.closed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let back = sqlx::query(
            "UPDATE troupe_jobs SET state = 0, lease_owner = NULL, lease_until = NULL
             WHERE state = 1 AND lease_owner = ?1",
        )
        .bind(&self.owner)
        .execute(&self.broker.inner.pool)
        .await
        .map_err(|e| db_error("return unacked messages", e))?
        .rows_affected();
        if back > 0 {
            self.broker.inner.wake.notify_waiters();
        }
        Ok(())
    }
}

impl Drop for SqliteConsumer {
    fn drop(&mut self) {
        // Stop renewing this consumer's leases: whatever it still holds returns to the queue
        // when the lease runs out, as if its process had died.
        if let Ok(mut owners) = self.broker.inner.owners.lock() {
            owners.remove(&self.owner);
        }
    }
}

/// A message made ready for the jobs table.
struct Job {
    message: Message,
    body: Vec<u8>,
    priority: i64,
    state: i64,
    delay: i64,
}

impl Job {
    fn new(inner: &Inner, mut message: Message, delay: Option<Duration>) -> Result<Self> {
        message.queue_name = q_name(&message.queue_name).to_owned();
        message.options.shift_remove("eta");
        let body = encode_checked(inner.encoder.as_ref(), &message, inner.options.max_message_size)?;
        let priority = message
            .options
            .get("troupe_priority")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0);
        let delay = delay.map_or(0, ms);
        let state = if delay > 0 { DELAYED } else { READY };
        Ok(Self {
            message,
            body,
            priority,
            state,
            delay,
        })
    }

    async fn insert<'e>(&self, t: i64, executor: impl sqlx::SqliteExecutor<'e>) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO troupe_jobs (queue, message_id, priority, state, available_at, enqueued_at, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(&self.message.queue_name)
        .bind(&self.message.message_id)
        .bind(self.priority)
        .bind(self.state)
        .bind(t + self.delay)
        .bind(t)
        .bind(self.body.as_slice())
        .execute(executor)
        .await
        .map(|_| ())
    }
}
