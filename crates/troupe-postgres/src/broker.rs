//! The PostgreSQL broker.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use tokio::sync::Notify;
use troupe_core::queue::{is_delay_queue, q_name, validate_queue_name};
use troupe_core::support::{BatchedAck, Batcher, Settle, SettleOp, Wakers};
use troupe_core::{
    Broker, Capabilities, Consumer, ConsumerOptions, DeadLetter, Delivery, Encoder, Error, ErrorKind, JsonEncoder,
    Message, QueueStats, Result, decode_delivery, encode_checked,
};

use crate::db::{self, BACKEND, PostgresOptions, db_error, ms};

const READY: i16 = 0;
const IN_FLIGHT: i16 = 1;
const DEAD: i16 = 2;
const DELAYED: i16 = 3;

/// Most acks, nacks and requeues written in one transaction.
const WRITE_BATCH: usize = 1000;

/// A broker on PostgreSQL: one jobs table, claims with `FOR UPDATE SKIP LOCKED`, leases, and
/// LISTEN/NOTIFY wake-ups. Cheap to clone.
#[derive(Clone)]
pub struct PostgresBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PostgresBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBroker")
            .field("options", &self.inner.options)
            .field("broker_id", &self.inner.broker_id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    pool: PgPool,
    /// Claims only: asynchronous commit (see `db::claim_pool`).
    claims: PgPool,
    options: PostgresOptions,
    encoder: Arc<dyn Encoder>,
    broker_id: String,
    consumers: AtomicU64,
    wakers: Wakers,
    writer: Batcher<Settle<Key>>,
    owners: Mutex<HashSet<String>>,
    background: OnceLock<()>,
    closed: AtomicBool,
}

type Key = (i64, i32);

impl PostgresBroker {
    /// Connects to the database a `postgres://` URL names and migrates Troupe's schema.
    ///
    /// # Errors
    /// A bad URL, an unreachable server, a missing database or missing privileges (one line).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(PostgresOptions::from_url(url)?).await
    }

    /// Connects with these options.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn open(options: PostgresOptions) -> Result<Self> {
        let pool = db::open(&options).await?;
        let claims = db::claim_pool(&options).await?;
        let writer_pool = db::writer_pool(&options).await?;
        let writer = Batcher::spawn(BACKEND, WRITE_BATCH, move |batch: Vec<Settle<Key>>| {
            let pool = writer_pool.clone();
            async move { write_batch(&pool, &batch).await }
        });
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                claims,
                options,
                encoder: Arc::new(JsonEncoder),
                broker_id: uuid::Uuid::new_v4().simple().to_string(),
                consumers: AtomicU64::new(0),
                wakers: Wakers::default(),
                writer,
                owners: Mutex::new(HashSet::new()),
                background: OnceLock::new(),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The connection pool (its `search_path` is Troupe's schema).
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The options it was opened with.
    #[must_use]
    pub fn options(&self) -> &PostgresOptions {
        &self.inner.options
    }

    /// Enqueues `message` inside the caller's transaction (or on any connection): the message
    /// exists if and only if the transaction commits, so a business write and the task it
    /// triggers stand or fall together. Workers are woken on commit.
    ///
    /// ```no_run
    /// # async fn f(broker: troupe_postgres::PostgresBroker, pool: sqlx::PgPool, message: troupe_core::Message) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = pool.begin().await?;
    /// sqlx::query("INSERT INTO emails (address) VALUES ($1)").bind("a@example.com").execute(&mut *tx).await?;
    /// broker.enqueue_in(&mut tx, message, None).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// App middleware `before_enqueue`/`after_enqueue` hooks do not run on this path.
    ///
    /// # Errors
    /// An invalid queue name, an oversized message, or a database error.
    pub async fn enqueue_in(
        &self,
        conn: &mut PgConnection,
        message: Message,
        delay: Option<Duration>,
    ) -> Result<Message> {
        let schema = self.inner.options.schema.as_str();
        self.insert(conn, &format!("{schema}.jobs"), message, delay).await
    }

    /// Enqueues `messages` on `conn` (inside the caller's transaction, if it has one) in one
    /// statement: they become visible when that transaction commits. Messages of one queue are
    /// consumed in the order given.
    ///
    /// # Errors
    /// As [`PostgresBroker::enqueue_in`].
    pub async fn enqueue_many_in(
        &self,
        conn: &mut PgConnection,
        messages: Vec<(Message, Option<Duration>)>,
    ) -> Result<Vec<Message>> {
        let schema = self.inner.options.schema.as_str();
        self.insert_many(conn, &format!("{schema}.jobs"), messages).await
    }

    async fn insert(
        &self,
        conn: &mut PgConnection,
        table: &str,
        message: Message,
        delay: Option<Duration>,
    ) -> Result<Message> {
        let mut inserted = self.insert_many(conn, table, vec![(message, delay)]).await?;
        inserted
            .pop()
            .ok_or_else(|| Error::backend(BACKEND, ErrorKind::Other, "the insert returned no message"))
    }

    /// Inserts the messages in one statement (arrays unnested in order, so ids follow the
    /// batch's order) and notifies each queue that got a ready message once.
    async fn insert_many(
        &self,
        conn: &mut PgConnection,
        table: &str,
        messages: Vec<(Message, Option<Duration>)>,
    ) -> Result<Vec<Message>> {
        self.check_open()?;
        let n = messages.len();
        let (mut queues, mut ids, mut priorities, mut states, mut delays, mut bodies) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut out = Vec::with_capacity(n);
        for (mut message, delay) in messages {
            message.queue_name = q_name(&message.queue_name).to_owned();
            validate_queue_name(&message.queue_name)?;
            message.options.shift_remove("eta");
            let body = encode_checked(
                self.inner.encoder.as_ref(),
                &message,
                self.inner.options.max_message_size,
            )?;
            let priority = message
                .options
                .get("troupe_priority")
                .and_then(serde_json::Value::as_i64)
                .and_then(|p| i32::try_from(p).ok())
                .unwrap_or(0);
            let delay_ms = delay.map_or(0, ms);
            queues.push(message.queue_name.clone());
            ids.push(message.message_id.clone());
            priorities.push(priority);
            states.push(if delay_ms > 0 { DELAYED } else { READY });
            delays.push(delay_ms);
            bodies.push(body);
            out.push(message);
        }
        if out.is_empty() {
            return Ok(out);
        }
        sqlx::query(AssertSqlSafe(format!(
            "WITH job AS (
                INSERT INTO {table} (queue, message_id, priority, state, available_at, body)
                SELECT q, m, p, s, now() + d * interval '1 millisecond', b
                FROM unnest($1::text[], $2::text[], $3::integer[], $4::smallint[], $5::bigint[], $6::bytea[])
                    WITH ORDINALITY AS batch(q, m, p, s, d, b, i)
                ORDER BY i
                RETURNING queue, state
             )
             SELECT pg_notify($7, queue) FROM (SELECT DISTINCT queue FROM job WHERE state = 0) AS ready"
        )))
        .bind(queues)
        .bind(ids)
        .bind(priorities)
        .bind(states)
        .bind(delays)
        .bind(bodies)
        .bind(self.inner.options.channel())
        .execute(conn)
        .await
        .map_err(|e| db_error("enqueue messages", e))?;
        Ok(out)
    }

    /// Writes raw bytes as a ready message of `queue`, bypassing the encoder (to test what
    /// workers do with bad input).
    ///
    /// # Errors
    /// A database error.
    pub async fn enqueue_raw(&self, queue: &str, bytes: Vec<u8>) -> Result<()> {
        sqlx::query("INSERT INTO jobs (queue, message_id, state, body) VALUES ($1, $2, 0, $3)")
            .bind(q_name(queue))
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(bytes)
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("enqueue raw bytes", e))?;
        self.inner.wakers.wake(q_name(queue));
        Ok(())
    }

    /// Runs one maintenance pass now: renews this process's leases, returns expired leases to
    /// their queues, deletes old dead letters and expired results in batches. Returns how many
    /// messages came back.
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

    fn start_background(&self) {
        if self.inner.background.set(()).is_err() {
            return;
        }
        let every = (self.inner.options.lease / 3).clamp(Duration::from_millis(50), Duration::from_secs(10));
        tokio::spawn(maintenance_loop(Arc::downgrade(&self.inner), every));
        tokio::spawn(listen_loop(Arc::downgrade(&self.inner)));
    }
}

/// LISTEN for enqueue notifications and wake the consumers of that queue. Notifications are
/// hints only: consumers also poll.
async fn listen_loop(weak: Weak<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (options, channel) = {
            let Some(inner) = weak.upgrade() else { return };
            if inner.closed.load(Ordering::Relaxed) {
                return;
            }
            (inner.options.clone(), inner.options.channel())
        };
        let listener = async {
            let connect = options.connect_options()?;
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(connect)
                .await
                .map_err(|e| db_error("connect the listener", e))?;
            let mut listener = PgListener::connect_with(&pool)
                .await
                .map_err(|e| db_error("listen", e))?;
            listener.listen(&channel).await.map_err(|e| db_error("listen", e))?;
            Ok::<_, Error>(listener)
        }
        .await;
        match listener {
            Ok(mut listener) => {
                backoff = Duration::from_millis(100);
                loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) => {
                            let Some(inner) = weak.upgrade() else { return };
                            inner.wakers.wake(n.payload());
                        }
                        // Connection lost: sqlx reconnects on the next call; LISTEN again.
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "LISTEN failed; consumers poll meanwhile");
                            break;
                        }
                    }
                    if weak.upgrade().is_none_or(|i| i.closed.load(Ordering::Relaxed)) {
                        return;
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "LISTEN failed; consumers poll meanwhile"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
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
        let cleanup = ticks.is_multiple_of((60_000 / u64::try_from(ms(every)).unwrap_or(1).max(1)).max(1));
        if let Err(e) = maintain(&inner, cleanup).await {
            tracing::warn!(error = %e, "PostgreSQL maintenance failed; retrying at the next tick");
        }
    }
}

async fn maintain(inner: &Inner, cleanup: bool) -> Result<u64> {
    let owners: Vec<String> = inner
        .owners
        .lock()
        .map(|o| o.iter().cloned().collect())
        .unwrap_or_default();
    if !owners.is_empty() {
        sqlx::query(
            "UPDATE jobs SET lease_until = now() + $1 * interval '1 millisecond'
             WHERE state = 1 AND lease_owner = ANY($2)",
        )
        .bind(ms(inner.options.lease))
        .bind(&owners)
        .execute(&inner.pool)
        .await
        .map_err(|e| db_error("renew leases", e))?;
    }
    let back = sqlx::query(
        "UPDATE jobs SET state = 0, lease_owner = NULL, lease_until = NULL
         WHERE state = 1 AND lease_until < now()",
    )
    .execute(&inner.pool)
    .await
    .map_err(|e| db_error("return expired leases", e))?
    .rows_affected();
    if back > 0 {
        tracing::warn!(
            messages = back,
            "returned messages whose worker stopped renewing its lease (killed?)"
        );
        inner.wakers.wake_all();
    }
    if cleanup {
        // Short statements, so no long lock is held and autovacuum keeps up.
        loop {
            let gone = sqlx::query(
                "DELETE FROM jobs WHERE id IN
                 (SELECT id FROM jobs WHERE state = 2 AND failed_at < now() - $1 * interval '1 millisecond' LIMIT 1000)",
            )
            .bind(ms(inner.options.dead_letter_ttl))
            .execute(&inner.pool)
            .await
            .map_err(|e| db_error("expire dead letters", e))?
            .rows_affected();
            if gone < 1000 {
                break;
            }
        }
        loop {
            let gone = sqlx::query(
                "DELETE FROM results WHERE key IN (SELECT key FROM results WHERE expires_at <= now() LIMIT 1000)",
            )
            .execute(&inner.pool)
            .await
            .map_err(|e| db_error("expire results", e))?
            .rows_affected();
            if gone < 1000 {
                break;
            }
        }
    }
    Ok(back)
}

/// Deletes acked rows, fenced by attempt (a late ack from a worker whose lease was taken over
/// does nothing). A join with the batch, which the planner hashes (see `db::writer_pool`).
const ACK_SQL: &str = "DELETE FROM jobs USING unnest($1::bigint[], $2::int[]) AS acked(id, attempt)
     WHERE jobs.id = acked.id AND jobs.attempt = acked.attempt AND jobs.state = 1";

async fn write_batch(pool: &PgPool, batch: &[Settle<Key>]) -> Result<()> {
    let (mut ack_ids, mut ack_attempts, mut back_ids, mut back_attempts) = (vec![], vec![], vec![], vec![]);
    for w in batch {
        match w.op {
            SettleOp::Ack => {
                ack_ids.push(w.key.0);
                ack_attempts.push(w.key.1);
            }
            SettleOp::Requeue => {
                back_ids.push(w.key.0);
                back_attempts.push(w.key.1);
            }
            SettleOp::Nack { .. } => {}
        }
    }
    // The common case, acks only: one statement, no explicit transaction (one round trip).
    if back_ids.is_empty() && ack_ids.len() == batch.len() {
        sqlx::query(ACK_SQL)
            .bind(&ack_ids)
            .bind(&ack_attempts)
            .execute(pool)
            .await
            .map_err(|e| db_error("ack messages", e))?;
        return Ok(());
    }
    let mut tx = pool.begin().await.map_err(|e| db_error("begin a write", e))?;
    if !ack_ids.is_empty() {
        // Fenced by attempt: a late ack from a worker whose lease was taken over does nothing.
        sqlx::query(ACK_SQL)
            .bind(&ack_ids)
            .bind(&ack_attempts)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("ack messages", e))?;
    }
    if !back_ids.is_empty() {
        sqlx::query(
            "UPDATE jobs SET state = 0, lease_owner = NULL, lease_until = NULL
             FROM unnest($1::bigint[], $2::int[]) AS settled(id, attempt)
             WHERE jobs.id = settled.id AND jobs.attempt = settled.attempt AND jobs.state = 1",
        )
        .bind(&back_ids)
        .bind(&back_attempts)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("requeue messages", e))?;
    }
    for w in batch {
        if let SettleOp::Nack { body, reason } = &w.op {
            sqlx::query(
                "UPDATE jobs SET state = 2, lease_owner = NULL, lease_until = NULL, reason = $3, failed_at = now(),
                 body = COALESCE($4, body) WHERE id = $1 AND attempt = $2 AND state = 1",
            )
            .bind(w.key.0)
            .bind(w.key.1)
            .bind(reason.as_str())
            .bind(body.as_deref())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("dead-letter a message", e))?;
        }
    }
    tx.commit().await.map_err(|e| db_error("commit settled messages", e))
}

#[async_trait]
impl Broker for PostgresBroker {
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
        sqlx::query("INSERT INTO queues (name) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(canonical)
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("declare a queue", e))?;
        Ok(())
    }

    async fn enqueue(&self, message: Message, delay: Option<Duration>) -> Result<Message> {
        let mut enqueued = self.enqueue_many(vec![(message, delay)]).await?;
        enqueued
            .pop()
            .ok_or_else(|| Error::backend(BACKEND, ErrorKind::Other, "enqueue returned no message"))
    }

    async fn enqueue_many(&self, messages: Vec<(Message, Option<Duration>)>) -> Result<Vec<Message>> {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(|e| db_error("enqueue messages", e))?;
        let ready: std::collections::HashSet<String> = messages
            .iter()
            .filter(|(_, delay)| delay.is_none_or(|d| d.is_zero()))
            .map(|(message, _)| q_name(&message.queue_name).to_owned())
            .collect();
        let enqueued = self.insert_many(&mut conn, "jobs", messages).await?;
        for queue in &ready {
            self.inner.wakers.wake(queue);
        }
        Ok(enqueued)
    }

    async fn consume(&self, queue: &str, _options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        self.check_open()?;
        if is_delay_queue(queue) {
            return Err(Error::Config(format!(
                "the PostgreSQL broker delays messages in place; consume {:?}, not {queue:?}",
                q_name(queue)
            )));
        }
        validate_queue_name(queue)?;
        let n = self.inner.consumers.fetch_add(1, Ordering::Relaxed);
        let owner = format!("{}-{n}", self.inner.broker_id);
        if let Ok(mut owners) = self.inner.owners.lock() {
            owners.insert(owner.clone());
        }
        self.start_background();
        Ok(Box::new(PostgresConsumer {
            broker: self.clone(),
            queue: queue.to_owned(),
            waker: self.inner.wakers.get(queue),
            owner,
            last_promote: None,
        }))
    }

    async fn purge(&self, queue: &str) -> Result<()> {
        self.check_open()?;
        sqlx::query("DELETE FROM jobs WHERE queue = $1 AND state IN (0, 2, 3)")
            .bind(q_name(queue))
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("purge a queue", e))?;
        Ok(())
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats> {
        self.check_open()?;
        let rows = sqlx::query("SELECT state, COUNT(*) FROM jobs WHERE queue = $1 GROUP BY state")
            .bind(q_name(queue))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| db_error("count messages", e))?;
        let (mut ready, mut delayed, mut in_flight, mut dead) = (0, 0, 0, 0);
        for row in rows {
            let state: i16 = row.try_get(0).map_err(|e| db_error("read stats", e))?;
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
            "SELECT id, body, reason, (extract(epoch FROM failed_at) * 1000)::bigint AS failed_ms FROM jobs
             WHERE queue = $1 AND state = 2 ORDER BY failed_at, id LIMIT $2",
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
                let failed: Option<i64> = row
                    .try_get("failed_ms")
                    .map_err(|e| db_error("read a dead letter", e))?;
                let message = decode_delivery(self.inner.encoder.as_ref(), &body, usize::MAX);
                let key = message
                    .as_ref()
                    .map_or_else(|_| format!("row-{id}"), |m| m.message_id.clone());
                Ok(DeadLetter::new(
                    key,
                    message,
                    reason.unwrap_or_default(),
                    u64::try_from(failed.unwrap_or(0)).unwrap_or(0),
                ))
            })
            .collect()
    }

    async fn requeue_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        self.check_open()?;
        let rows = sqlx::query("SELECT id, body FROM jobs WHERE queue = $1 AND state = 2 ORDER BY failed_at, id")
            .bind(q_name(queue))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| db_error("list dead letters", e))?;
        let mut tx = self
            .inner
            .pool
            .begin()
            .await
            .map_err(|e| db_error("begin a requeue", e))?;
        let mut moved = 0;
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
                "UPDATE jobs SET state = 0, body = $2, attempt = 0, available_at = now(), reason = NULL,
                 failed_at = NULL WHERE id = $1 AND state = 2",
            )
            .bind(id)
            .bind(body)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("requeue a dead letter", e))?
            .rows_affected();
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(self.inner.options.channel())
            .bind(q_name(queue))
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("notify", e))?;
        tx.commit().await.map_err(|e| db_error("commit the requeue", e))?;
        self.inner.wakers.wake(q_name(queue));
        Ok(moved)
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<u64> {
        self.check_open()?;
        Ok(sqlx::query("DELETE FROM jobs WHERE queue = $1 AND state = 2")
            .bind(q_name(queue))
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("purge dead letters", e))?
            .rows_affected())
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.wakers.wake_all();
        self.inner.pool.close().await;
        self.inner.claims.close().await;
        Ok(())
    }
}

#[derive(Debug)]
struct PostgresConsumer {
    broker: PostgresBroker,
    queue: String,
    waker: Arc<Notify>,
    owner: String,
    last_promote: Option<std::time::Instant>,
}

impl PostgresConsumer {
    async fn claim(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let inner = Arc::clone(&self.broker.inner);
        let promote = self
            .last_promote
            .is_none_or(|at| at.elapsed() >= inner.options.poll_interval);
        // The look-first query (and the release of due delayed rows) runs once per poll
        // interval. In between, a woken consumer claims at once: a claim that finds nothing
        // locks nothing and writes nothing, and skipping the look saves a round trip on
        // every pick-up.
        if promote {
            let row = sqlx::query(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 0 AND queue = $1),
                        EXISTS (SELECT 1 FROM jobs WHERE state = 3 AND queue = $1 AND available_at <= now())",
            )
            .bind(&self.queue)
            .fetch_one(&inner.claims)
            .await
            .map_err(|e| db_error("look for messages", e))?;
            let ready: bool = row.try_get(0).map_err(|e| db_error("look for messages", e))?;
            let due: bool = row.try_get(1).map_err(|e| db_error("look for messages", e))?;
            self.last_promote = Some(std::time::Instant::now());
            if due {
                sqlx::query("UPDATE jobs SET state = 0 WHERE state = 3 AND queue = $1 AND available_at <= now()")
                    .bind(&self.queue)
                    .execute(&inner.claims)
                    .await
                    .map_err(|e| db_error("release due delayed messages", e))?;
            }
            if !ready && !due {
                return Ok(Vec::new());
            }
        }
        let rows = sqlx::query(
            "WITH claimed AS (
                SELECT id FROM jobs WHERE state = 0 AND queue = $1 ORDER BY priority, id LIMIT $2 FOR UPDATE SKIP LOCKED
             )
             UPDATE jobs SET state = 1, attempt = jobs.attempt + 1, lease_owner = $3,
                 lease_until = now() + $4 * interval '1 millisecond'
             FROM claimed WHERE jobs.id = claimed.id
             RETURNING jobs.id, jobs.attempt, jobs.priority, jobs.body",
        )
        .bind(&self.queue)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .bind(&self.owner)
        .bind(ms(inner.options.lease))
        .fetch_all(&inner.claims)
        .await
        .map_err(|e| db_error("claim messages", e))?;
        let mut claimed: Vec<(i32, i64, i32, Vec<u8>)> = rows
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
impl Consumer for PostgresConsumer {
    async fn fetch(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        self.broker.check_open()?;
        let deadline = tokio::time::Instant::now() + timeout;
        let waker = Arc::clone(&self.waker);
        let poll = self.broker.inner.options.poll_interval;
        loop {
            let notified = waker.notified();
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
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(poll.min(deadline - now)) => {}
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
            "UPDATE jobs SET state = 0, lease_owner = NULL, lease_until = NULL WHERE state = 1 AND lease_owner = $1",
        )
        .bind(&self.owner)
        .execute(&self.broker.inner.pool)
        .await
        .map_err(|e| db_error("return unacked messages", e))?
        .rows_affected();
        if back > 0 {
            self.waker.notify_waiters();
        }
        Ok(())
    }
}

impl Drop for PostgresConsumer {
    fn drop(&mut self) {
        // Stop renewing this consumer's leases: what it holds returns when they run out, as if
        // its process had died.
        if let Ok(mut owners) = self.broker.inner.owners.lock() {
            owners.remove(&self.owner);
        }
    }
}
