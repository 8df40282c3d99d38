//! The broker statements on PostgreSQL: one `jobs` table in Troupe's schema, the server's
//! clock (`now()`), batches as arrays (`unnest`), claims with `FOR UPDATE SKIP LOCKED`, and
//! LISTEN/NOTIFY wake-ups.

use std::time::Duration;

use sqlx::postgres::{PgArguments, PgRow, Postgres};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};
use troupe_core::support::{Settle, SettleOp};
use troupe_core::{Error, Result, redact_url};
use troupe_sql::dialect::CLEANUP_BATCH;
use troupe_sql::{Claimed, DeadRow, Dialect, Job, Key, Wake, ms};

use crate::db::{self, BACKEND, PostgresOptions, Side, db_error, timed};
use crate::pooling::{Db, PoolMode, Statements};
use crate::store::PostgresStore;

/// PostgreSQL's statements for the shared SQL broker ([`crate::PostgresBroker`]). Not used
/// directly.
pub struct PostgresDialect {
    store: PostgresStore,
    /// Claims only: asynchronous commit (see [`Side::Claims`]).
    claims: Db,
    /// Acks, requeues and nacks: custom plans (see [`Side::Writer`]).
    writer: Db,
    /// How statements are built.
    sql: Statements,
    /// The schema, to qualify tables on a caller's connection.
    schema: String,
    /// The channel enqueues notify.
    channel: String,
    /// Where the LISTEN connection connects.
    listen: ListenTo,
}

impl std::fmt::Debug for PostgresDialect {
    // No connect options: they hold the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresDialect")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// Deletes acked rows, fenced by attempt (a late ack from a worker whose lease was taken over
/// does nothing). A join with the batch, which the planner hashes (see [`Side::Writer`]).
const ACK_SQL: &str = "DELETE FROM jobs USING unnest($1::bigint[], $2::int[]) AS acked(id, attempt)
     WHERE jobs.id = acked.id AND jobs.attempt = acked.attempt AND jobs.state = 1";

/// A batch of keys as the two arrays the statements unnest.
fn arrays(keys: &[Key]) -> (Vec<i64>, Vec<i32>) {
    keys.iter()
        .map(|&(id, attempt)| (id, i32::try_from(attempt).unwrap_or(i32::MAX)))
        .unzip()
}

/// Dead letters requeued per transaction.
const REVIVE_CHUNK: usize = 1000;

/// Past this many rows, `quick_counts` estimates a count from the planner's statistics.
const QUICK_COUNT_LIMIT: i64 = 10_000;

impl PostgresDialect {
    /// The planner's estimate of the rows of `queue` in `state` (its statistics, kept current by
    /// autovacuum's ANALYZE).
    async fn estimate(&self, queue: &str, state: i16) -> Result<i64> {
        // EXPLAIN takes no parameters; a queue name is `[a-zA-Z_][a-zA-Z0-9._-]*`, quoted anyway.
        let sql = format!(
            "EXPLAIN SELECT 1 FROM jobs WHERE queue = '{}' AND state = {state}",
            queue.replace('\'', "''")
        );
        let plan: Vec<String> = timed!(self.pool(), "estimate a count", |c| self
            .sql
            .scalar(AssertSqlSafe(sql))
            .fetch_all(c))?;
        // The top node's line: "... (cost=0.42..31.45 rows=900000 width=4)".
        Ok(plan
            .first()
            .and_then(|line| line.split("rows=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|rows| rows.parse().ok())
            .unwrap_or(0))
    }
}

/// A count or limit as a SQL bigint.
fn bigint(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

impl PostgresDialect {
    /// Runs one query on the main pool; its rows.
    async fn rows(&self, what: &str, query: Query<'_, Postgres, PgArguments>) -> Result<Vec<PgRow>> {
        timed!(self.pool(), what, |c| query.fetch_all(c))
    }

    /// Runs one statement on the main pool; how many rows it changed.
    async fn exec(&self, what: &str, query: Query<'_, Postgres, PgArguments>) -> Result<u64> {
        let done = timed!(self.pool(), what, |c| query.execute(c))?;
        Ok(done.rows_affected())
    }

    fn pool(&self) -> &Db {
        self.store.db()
    }

    /// Inserts the jobs on `conn` in one statement (arrays unnested in order, so ids follow
    /// the batch's order) and notifies each queue that got a ready message once (delivered on
    /// commit).
    async fn insert_into(&self, conn: &mut PgConnection, table: &str, jobs: &[Job]) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let n = jobs.len();
        let (mut queues, mut ids, mut priorities, mut states, mut delays, mut bodies) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for job in jobs {
            queues.push(job.message.queue_name.as_str());
            ids.push(job.message.message_id.as_str());
            priorities.push(i32::try_from(job.priority).unwrap_or(0));
            states.push(i16::try_from(job.state()).unwrap_or(0));
            delays.push(job.delay_ms);
            bodies.push(job.body.as_slice());
        }
        self.sql
            .query(AssertSqlSafe(format!(
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
            .bind(&self.channel)
            .execute(conn)
            .await
            .map_err(|e| db_error("enqueue messages", e))?;
        Ok(())
    }
}

impl Dialect for PostgresDialect {
    type Store = PostgresStore;
    type Options = PostgresOptions;
    type Connection = PgConnection;

    const BACKEND: &'static str = BACKEND;
    const NAME: &'static str = "PostgreSQL";
    const LOOK_WHEN_IDLE: bool = false;
    const WRITE_BATCH: usize = 1000;

    async fn open(options: &PostgresOptions) -> Result<Self> {
        let (pool, follower) = db::open_following(options).await?;
        let follower = follower.as_deref();
        Ok(Self {
            claims: Side::Claims.open(&pool, options, follower).await?,
            writer: Side::Writer.open(&pool, options, follower).await?,
            sql: pool.statements(),
            schema: options.schema.clone(),
            channel: options.channel(),
            listen: ListenTo::checked(&pool, options).await?,
            store: PostgresStore::from_db(pool),
        })
    }

    fn from_pool(pool: PgPool, options: &PostgresOptions) -> Self {
        let pool = Db::new(pool, options.pool_mode, &options.settings());
        Self {
            claims: Side::Claims.beside(&pool, options),
            writer: Side::Writer.beside(&pool, options),
            sql: pool.statements(),
            schema: options.schema.clone(),
            channel: options.channel(),
            listen: ListenTo::unchecked(&pool, options),
            store: PostgresStore::from_db(pool),
        }
    }

    fn store(&self) -> &PostgresStore {
        &self.store
    }

    async fn declare(&self, queue: &str) -> Result<()> {
        self.exec(
            "declare a queue",
            self.sql
                .query("INSERT INTO queues (name) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(queue),
        )
        .await?;
        Ok(())
    }

    async fn insert(&self, jobs: &[Job]) -> Result<()> {
        timed!(self.pool(), "enqueue messages", |c| self.insert_into(c, "jobs", jobs))
    }

    async fn insert_on(&self, conn: &mut PgConnection, jobs: &[Job]) -> Result<()> {
        // The caller's connection may not have Troupe's search path.
        let table = format!("{}.jobs", self.schema);
        self.insert_into(conn, &table, jobs).await
    }

    async fn insert_raw(&self, queue: &str, body: Vec<u8>) -> Result<()> {
        self.exec(
            "enqueue raw bytes",
            self.sql
                .query("INSERT INTO jobs (queue, message_id, state, body) VALUES ($1, $2, 0, $3)")
                .bind(queue)
                .bind(uuid::Uuid::new_v4().to_string())
                .bind(body),
        )
        .await?;
        Ok(())
    }

    async fn look(&self, queue: &str) -> Result<(bool, bool)> {
        let row = timed!(&self.claims, "look for messages", |c| self
            .sql
            .query(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 0 AND queue = $1),
                    EXISTS (SELECT 1 FROM jobs WHERE state = 3 AND queue = $1 AND available_at <= now())",
            )
            .bind(queue)
            .fetch_one(c))?;
        let ready: bool = row.try_get(0).map_err(|e| db_error("look for messages", e))?;
        let due: bool = row.try_get(1).map_err(|e| db_error("look for messages", e))?;
        Ok((ready, due))
    }

    async fn release_due(&self, queue: &str) -> Result<()> {
        timed!(&self.claims, "release due delayed messages", |c| self
            .sql
            .query("UPDATE jobs SET state = 0 WHERE state = 3 AND queue = $1 AND available_at <= now()")
            .bind(queue)
            .execute(c))?;
        Ok(())
    }

    async fn claim(&self, queue: &str, owner: &str, lease: Duration, max: usize) -> Result<Vec<Claimed>> {
        let rows = timed!(&self.claims, "claim messages", |c| self
            .sql
            .query(
                "WITH claimed AS (
                SELECT id FROM jobs WHERE state = 0 AND queue = $1 ORDER BY priority, id LIMIT $2 FOR UPDATE SKIP LOCKED
             )
             UPDATE jobs SET state = 1, attempt = jobs.attempt + 1, lease_owner = $3,
                 lease_until = now() + $4 * interval '1 millisecond'
             FROM claimed WHERE jobs.id = claimed.id
             RETURNING jobs.id, jobs.attempt, jobs.priority, jobs.body",
            )
            .bind(queue)
            .bind(bigint(max))
            .bind(owner)
            .bind(ms(lease))
            .fetch_all(c))?;
        rows.iter()
            .map(|r| {
                let attempt: i32 = r.try_get("attempt")?;
                let priority: i32 = r.try_get("priority")?;
                Ok(Claimed::new(
                    r.try_get("id")?,
                    attempt.into(),
                    priority.into(),
                    r.try_get("body")?,
                ))
            })
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read claimed messages", e))
    }

    async fn settle(&self, batch: &[Settle<Key>]) -> Result<()> {
        let (mut acks, mut back) = (Vec::new(), Vec::new());
        for w in batch {
            match w.op {
                SettleOp::Ack => acks.push(w.key),
                SettleOp::Requeue => back.push(w.key),
                SettleOp::Nack { .. } => {}
            }
        }
        let (ack_ids, ack_attempts) = arrays(&acks);
        // The common case, acks only: one statement, no explicit transaction (one round trip).
        if acks.len() == batch.len() {
            timed!(&self.writer, "ack messages", |c| self
                .sql
                .query(ACK_SQL)
                .bind(&ack_ids)
                .bind(&ack_attempts)
                .execute(c))?;
            return Ok(());
        }
        timed!(&self.writer, "settle messages", |conn| async move {
            let mut tx = conn.begin().await.map_err(|e| db_error("begin a write", e))?;
            if !acks.is_empty() {
                self.sql
                    .query(ACK_SQL)
                    .bind(&ack_ids)
                    .bind(&ack_attempts)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_error("ack messages", e))?;
            }
            if !back.is_empty() {
                let (back_ids, back_attempts) = arrays(&back);
                self.sql
                    .query(
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
                    self.sql.query(
                    "UPDATE jobs SET state = 2, lease_owner = NULL, lease_until = NULL, reason = $3, failed_at = now(),
                     body = COALESCE($4, body) WHERE id = $1 AND attempt = $2 AND state = 1",
                )
                .bind(w.key.0)
                .bind(i32::try_from(w.key.1).unwrap_or(i32::MAX))
                .bind(reason.as_str())
                .bind(body.as_deref())
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("dead-letter a message", e))?;
                }
            }
            tx.commit().await.map_err(|e| db_error("commit settled messages", e))
        })
    }

    async fn renew(&self, owners: &[String], lease: Duration) -> Result<()> {
        self.exec(
            "renew leases",
            self.sql
                .query(
                    "UPDATE jobs SET lease_until = now() + $1 * interval '1 millisecond'
             WHERE state = 1 AND lease_owner = ANY($2)",
                )
                .bind(ms(lease))
                .bind(owners),
        )
        .await?;
        Ok(())
    }

    async fn return_expired(&self) -> Result<u64> {
        self.exec(
            "return expired leases",
            self.sql.query(
                "UPDATE jobs SET state = 0, lease_owner = NULL, lease_until = NULL
             WHERE state = 1 AND lease_until < now()",
            ),
        )
        .await
    }

    async fn return_owned(&self, owner: &str) -> Result<u64> {
        self.exec("return unacked messages", self.sql.query("UPDATE jobs SET state = 0, lease_owner = NULL, lease_until = NULL WHERE state = 1 AND lease_owner = $1")
        .bind(owner)).await
    }

    async fn expire_dead(&self, ttl: Duration) -> Result<u64> {
        self.exec(
            "expire dead letters",
            self.sql
                .query(
                    "DELETE FROM jobs WHERE id IN
             (SELECT id FROM jobs WHERE state = 2 AND failed_at < now() - $1 * interval '1 millisecond' LIMIT $2)",
                )
                .bind(ms(ttl))
                .bind(bigint(CLEANUP_BATCH)),
        )
        .await
    }

    async fn purge(&self, queue: &str) -> Result<()> {
        self.exec(
            "purge a queue",
            self.sql
                .query("DELETE FROM jobs WHERE queue = $1 AND state IN (0, 2, 3)")
                .bind(queue),
        )
        .await?;
        Ok(())
    }

    async fn counts(&self, queue: &str) -> Result<Vec<(i64, u64)>> {
        let rows = self
            .rows(
                "count messages",
                // One count per state, each on its partial index (a GROUP BY reads every row).
                self.sql
                    .query(
                        "SELECT 0::smallint, (SELECT COUNT(*) FROM jobs WHERE queue = $1 AND state = 0)
                     UNION ALL SELECT 1::smallint, (SELECT COUNT(*) FROM jobs WHERE queue = $1 AND state = 1)
                     UNION ALL SELECT 2::smallint, (SELECT COUNT(*) FROM jobs WHERE queue = $1 AND state = 2)
                     UNION ALL SELECT 3::smallint, (SELECT COUNT(*) FROM jobs WHERE queue = $1 AND state = 3)",
                    )
                    .bind(queue),
            )
            .await?;
        rows.iter()
            .map(|row| {
                let state: i16 = row.try_get(0)?;
                let count: i64 = row.try_get(1)?;
                Ok((state.into(), u64::try_from(count).unwrap_or(0)))
            })
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read stats", e))
    }

    async fn quick_counts(&self, queue: &str) -> Result<(Vec<(i64, u64)>, bool)> {
        let mut out = Vec::with_capacity(4);
        let mut approximate = false;
        for state in 0i16..4 {
            // Counting stops at the threshold: a long queue is estimated instead.
            let capped: i64 = timed!(self.pool(), "count messages", |c| self
                .sql
                .scalar("SELECT count(*) FROM (SELECT 1 FROM jobs WHERE queue = $1 AND state = $2 LIMIT $3) AS capped",)
                .bind(queue)
                .bind(state)
                .bind(QUICK_COUNT_LIMIT + 1)
                .fetch_one(c))?;
            let count = if capped > QUICK_COUNT_LIMIT {
                approximate = true;
                self.estimate(queue, state).await?.max(capped)
            } else {
                capped
            };
            out.push((i64::from(state), u64::try_from(count).unwrap_or(0)));
        }
        Ok((out, approximate))
    }

    async fn dead_rows(&self, queue: &str, limit: Option<usize>) -> Result<Vec<DeadRow>> {
        let rows = self
            .rows(
                "list dead letters",
                self.sql
                    .query(
                        "SELECT id, body, reason, (extract(epoch FROM failed_at) * 1000)::bigint AS failed_ms FROM jobs
             WHERE queue = $1 AND state = 2 ORDER BY failed_at, id LIMIT $2",
                    )
                    .bind(queue)
                    .bind(limit.map(bigint)),
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(DeadRow::new(
                    row.try_get("id")?,
                    row.try_get("body")?,
                    row.try_get("reason")?,
                    row.try_get("failed_ms")?,
                ))
            })
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read a dead letter", e))
    }

    async fn revive(&self, queue: &str, rows: &[(i64, Vec<u8>)]) -> Result<u64> {
        // One transaction per chunk, each well within the statement time-out however many
        // dead letters are requeued (a row already requeued is not matched again).
        let mut moved = 0;
        for chunk in rows.chunks(REVIVE_CHUNK) {
            moved +=
                timed!(self.pool(), "requeue dead letters", |conn| async move {
                    let mut tx = conn.begin().await.map_err(|e| db_error("begin a requeue", e))?;
                    let mut moved = 0;
                    for (id, body) in chunk {
                        moved += self.sql.query(
                        "UPDATE jobs SET state = 0, body = $2, attempt = 0, available_at = now(), reason = NULL,
                     failed_at = NULL WHERE id = $1 AND state = 2",
                    )
                    .bind(id)
                    .bind(body.as_slice())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_error("requeue a dead letter", e))?
                    .rows_affected();
                    }
                    self.sql
                        .query("SELECT pg_notify($1, $2)")
                        .bind(&self.channel)
                        .bind(queue)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| db_error("notify", e))?;
                    tx.commit().await.map_err(|e| db_error("commit the requeue", e))?;
                    Ok::<_, Error>(moved)
                })?;
        }
        Ok(moved)
    }

    async fn purge_dead(&self, queue: &str) -> Result<u64> {
        self.exec(
            "purge dead letters",
            self.sql
                .query("DELETE FROM jobs WHERE queue = $1 AND state = 2")
                .bind(queue),
        )
        .await
    }

    async fn peek(&self, queue: &str, state: i64, offset: usize, limit: usize) -> Result<Vec<(Vec<u8>, i64)>> {
        let order = if state == 0 { "priority, id" } else { "available_at, id" };
        let sql = format!(
            "SELECT body, (extract(epoch FROM available_at) * 1000)::bigint FROM jobs WHERE queue = $1 AND state = $2 ORDER BY {order} LIMIT $3 OFFSET $4"
        );
        let rows = self
            .rows(
                "list messages",
                self.sql
                    .query(AssertSqlSafe(sql))
                    .bind(queue)
                    .bind(i16::try_from(state).unwrap_or(0))
                    .bind(bigint(limit))
                    .bind(bigint(offset)),
            )
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read a message", e))
    }

    async fn delete_dead(&self, queue: &str, ids: &[i64]) -> Result<u64> {
        self.exec(
            "delete dead letters",
            self.sql
                .query("DELETE FROM jobs WHERE queue = $1 AND state = 2 AND id = ANY($2)")
                .bind(queue)
                .bind(ids),
        )
        .await
    }

    async fn queues(&self) -> Result<Vec<String>> {
        let rows = self
            .rows("list queues", self.sql.query("SELECT name FROM queues ORDER BY name"))
            .await?;
        rows.iter()
            .map(|row| row.try_get(0))
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read a queue name", e))
    }

    async fn beat(&self, id: &str, info: &str, expires_ms: i64) -> Result<()> {
        self.exec(
            "store a worker heartbeat",
            self.sql
                .query(
                    "INSERT INTO workers (id, info, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET info = excluded.info, expires_at = excluded.expires_at",
                )
                .bind(id)
                .bind(info)
                .bind(expires_ms),
        )
        .await
        .map(|_| ())
    }

    async fn forget_worker(&self, id: &str) -> Result<()> {
        self.exec(
            "delete a worker heartbeat",
            self.sql.query("DELETE FROM workers WHERE id = $1").bind(id),
        )
        .await
        .map(|_| ())
    }

    async fn workers(&self, now_ms: i64) -> Result<Vec<String>> {
        self.exec(
            "delete expired worker heartbeats",
            self.sql
                .query("DELETE FROM workers WHERE expires_at <= $1")
                .bind(now_ms),
        )
        .await?;
        let rows = self
            .rows(
                "list workers",
                self.sql
                    .query("SELECT info FROM workers WHERE expires_at > $1 ORDER BY id")
                    .bind(now_ms),
            )
            .await?;
        rows.iter()
            .map(|row| row.try_get(0))
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read a worker heartbeat", e))
    }

    fn listen(&self, wake: Wake) -> Option<impl Future<Output = ()> + Send + 'static> {
        if matches!(self.listen, ListenTo::Nowhere) {
            return None;
        }
        Some(listen_loop(self.listen.clone(), self.channel.clone(), wake))
    }

    async fn close(&self) {
        self.pool().pool().close().await;
        self.claims.pool().close().await;
        self.writer.pool().close().await;
    }
}

/// Where the LISTEN connection connects.
#[derive(Clone)]
enum ListenTo {
    /// The main pool's server: the pool's connect options, taken on each connect (they follow
    /// the server in use when the URL names several).
    Main(PgPool),
    /// The server itself, beside a transaction pooler (`listen_url`).
    Direct(Box<PgConnectOptions>),
    /// Nowhere: behind a transaction pooler without `listen_url`, idle consumers poll.
    Nowhere,
}

/// How long the check of `listen_url` waits for its notification.
const LISTEN_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

impl ListenTo {
    /// Where to LISTEN under `options`, without checking.
    fn unchecked(main: &Db, options: &PostgresOptions) -> Self {
        match (options.pool_mode, options.listen_connect_options()) {
            (PoolMode::Session, _) => Self::Main(main.pool().clone()),
            (_, Ok(Some(direct))) => Self::Direct(Box::new(direct)),
            _ => Self::Nowhere,
        }
    }

    /// Where to LISTEN under `options`. Behind a transaction pooler, a `listen_url` is checked
    /// now: a notification sent through the pooler must arrive over it, or opening fails
    /// (wake-ups would otherwise be lost without a word); without one, a warning says that
    /// idle consumers poll.
    async fn checked(main: &Db, options: &PostgresOptions) -> Result<Self> {
        let to = Self::unchecked(main, options);
        match &to {
            Self::Main(_) => {}
            Self::Nowhere => tracing::warn!(
                poll_interval_ms = u64::try_from(options.poll_interval.as_millis()).unwrap_or(u64::MAX),
                "PostgreSQL behind a transaction pooler (pool_mode=transaction) without listen_url: idle consumers find new messages by polling; add listen_url=<the server's own URL, percent-encoded> for wake-ups within milliseconds"
            ),
            Self::Direct(direct) => check_listen_url(main, direct, options).await?,
        }
        Ok(to)
    }

    /// The connect options of the LISTEN connection now.
    fn connect_options(&self) -> Option<PgConnectOptions> {
        match self {
            Self::Main(pool) => Some((*pool.connect_options()).clone()),
            Self::Direct(direct) => Some((**direct).clone()),
            Self::Nowhere => None,
        }
    }
}

/// Checks that a notification sent over `main` (through the pooler) arrives over `direct`:
/// `listen_url` names the same server, directly.
async fn check_listen_url(main: &Db, direct: &PgConnectOptions, options: &PostgresOptions) -> Result<()> {
    let url = options.listen_url.as_deref().map(redact_url).unwrap_or_default();
    let channel = format!("troupe_check_{}", uuid::Uuid::new_v4().simple());
    let check = async {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.connect_timeout)
            .connect_lazy_with(direct.clone());
        let mut listener = PgListener::connect_with(&pool).await.map_err(|e| e.to_string())?;
        listener.listen(&channel).await.map_err(|e| e.to_string())?;
        notify(main, &channel).await.map_err(|e| e.to_string())?;
        let heard = tokio::time::timeout(LISTEN_CHECK_TIMEOUT, listener.recv()).await;
        drop(listener);
        pool.close().await;
        match heard {
            Ok(Ok(n)) if n.channel() == channel => Ok(()),
            Ok(Ok(_)) => Err("another notification arrived instead".to_owned()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "a notification sent through the pooler did not arrive over it in {} s",
                LISTEN_CHECK_TIMEOUT.as_secs()
            )),
        }
    };
    check.await.map_err(|e| {
        Error::Config(format!(
            "cannot use listen_url {url} for LISTEN beside the transaction pooler: {e}; it must name the same PostgreSQL server directly (not the pooler)"
        ))
    })
}

/// Sends a notification on `channel` over `db`.
async fn notify(db: &Db, channel: &str) -> Result<()> {
    timed!(db, "send a notification", |c| db
        .statements()
        .query("SELECT pg_notify($1, 'check')")
        .bind(channel)
        .execute(c))?;
    Ok(())
}

/// How long the LISTEN connection may hear nothing before it is probed.
const LISTEN_PROBE_AFTER: Duration = Duration::from_secs(30);

/// LISTENs for enqueue notifications and wakes that queue's consumers, reconnecting with
/// backoff, until the broker is gone. Notifications are hints only: consumers also poll.
async fn listen_loop(to: ListenTo, channel: String, wake: Wake) {
    let mut backoff = Duration::from_millis(100);
    while wake.alive() {
        let listener = async {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                // The listener's connection goes back to this pool when a silent link is
                // abandoned; sqlx's own ping there has no time-out.
                .after_release(|conn, _| {
                    Box::pin(async move {
                        tokio::time::timeout(db::PING_TIMEOUT, conn.ping())
                            .await
                            .map_err(|_| sqlx::Error::PoolTimedOut)??;
                        Ok(true)
                    })
                })
                .connect_with(
                    to.connect_options()
                        .ok_or_else(|| Error::Config("nowhere to LISTEN".into()))?,
                )
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
                    let Ok(received) = tokio::time::timeout(LISTEN_PROBE_AFTER, listener.try_recv()).await else {
                        // Nothing heard for a while: a link that went silent is replaced.
                        let probe =
                            tokio::time::timeout(db::PING_TIMEOUT, sqlx::query("SELECT 1").execute(&mut listener));
                        if matches!(probe.await, Ok(Ok(_))) {
                            if wake.alive() {
                                continue;
                            }
                            return;
                        }
                        tracing::debug!("the LISTEN connection went silent; reconnecting (consumers poll meanwhile)");
                        break;
                    };
                    match received {
                        Ok(Some(n)) => {
                            if !wake.queue(n.payload()) {
                                return;
                            }
                        }
                        // Connection lost: sqlx reconnects on the next call; LISTEN again.
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "LISTEN failed; consumers poll meanwhile");
                            break;
                        }
                    }
                    if !wake.alive() {
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
