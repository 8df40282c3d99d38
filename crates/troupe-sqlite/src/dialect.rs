//! The broker statements on SQLite: one `troupe_jobs` table, times in milliseconds of the
//! client's clock, batches of keys as JSON arrays (`json_each`).

use std::time::Duration;

use sqlx::query::Query;
use sqlx::sqlite::{Sqlite, SqliteArguments, SqliteRow};
use sqlx::{Row, SqliteConnection, SqlitePool};
use troupe_core::support::{Settle, SettleOp};
use troupe_core::{Error, Result};
use troupe_sql::dialect::CLEANUP_BATCH;
use troupe_sql::{Claimed, DeadRow, Dialect, Job, Key, Store, Wake, ms};

use crate::db::{self, BACKEND, Durability, SqliteOptions, db_error, now};
use crate::store::SqliteStore;

/// SQLite's statements for the shared SQL broker ([`crate::SqliteBroker`]). Not used directly.
#[derive(Debug)]
pub struct SqliteDialect {
    store: SqliteStore,
    /// Where claims run: the main pool, or with `durability=full` one connection that commits
    /// without syncing (see [`claim_pool`]).
    claims: SqlitePool,
}

/// The pool claims run on. With `durability=full`, a connection of its own with
/// `synchronous=NORMAL`: a claim's commit then waits for no fsync. That is safe because every
/// write that matters after a claim (the ack, the nack, the retry's enqueue) commits on a FULL
/// connection, and syncing the WAL file then syncs the claim's earlier frames with it; a claim
/// lost to a power cut leaves its message ready, to be claimed again (at-least-once). With
/// `durability=normal` every connection already commits that way: claims share the pool.
fn claim_pool(pool: &SqlitePool, options: &SqliteOptions) -> SqlitePool {
    if options.durability != Durability::Full {
        return pool.clone();
    }
    let connect = (*pool.connect_options())
        .clone()
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
    db::pool_options().max_connections(1).connect_lazy_with(connect)
}

/// A list of `[id, attempt]` pairs as the JSON array the statements unpack with `json_each`.
fn pairs(keys: &[Key]) -> Result<String> {
    let pairs: Vec<[i64; 2]> = keys.iter().map(|k| [k.0, k.1]).collect();
    serde_json::to_string(&pairs).map_err(|e| Error::Encode(e.to_string()))
}

impl SqliteDialect {
    /// Runs one query on the main pool; its rows.
    async fn rows(&self, what: &str, query: Query<'_, Sqlite, SqliteArguments>) -> Result<Vec<SqliteRow>> {
        query.fetch_all(self.pool()).await.map_err(|e| db_error(what, e))
    }

    /// Runs one writing statement on the main pool, in this process's turn; how many rows it
    /// changed.
    async fn exec(&self, what: &str, query: Query<'_, Sqlite, SqliteArguments>) -> Result<u64> {
        let _turn = self.store.writes().turn().await;
        let done = query.execute(self.pool()).await.map_err(|e| db_error(what, e))?;
        Ok(done.rows_affected())
    }

    fn pool(&self) -> &SqlitePool {
        self.store.pool()
    }

    async fn insert_one(job: &Job, t: i64, conn: &mut SqliteConnection) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO troupe_jobs (queue, message_id, priority, state, available_at, enqueued_at, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(&job.message.queue_name)
        .bind(&job.message.message_id)
        .bind(job.priority)
        .bind(job.state())
        .bind(t + job.delay_ms)
        .bind(t)
        .bind(job.body.as_slice())
        .execute(conn)
        .await
        .map(|_| ())
    }
}

impl Dialect for SqliteDialect {
    type Store = SqliteStore;
    type Options = SqliteOptions;
    type Connection = SqliteConnection;

    const BACKEND: &'static str = BACKEND;
    const NAME: &'static str = "SQLite";
    const LOOK_WHEN_IDLE: bool = true;
    const WRITE_BATCH: usize = 512;

    async fn open(options: &SqliteOptions) -> Result<Self> {
        Ok(Self::from_pool(db::open(options).await?, options))
    }

    fn from_pool(pool: SqlitePool, options: &SqliteOptions) -> Self {
        Self {
            claims: claim_pool(&pool, options),
            store: SqliteStore::from_pool(pool),
        }
    }

    fn store(&self) -> &SqliteStore {
        &self.store
    }

    async fn declare(&self, queue: &str) -> Result<()> {
        self.exec(
            "declare a queue",
            sqlx::query("INSERT OR IGNORE INTO troupe_queues (name) VALUES (?1)").bind(queue),
        )
        .await?;
        Ok(())
    }

    async fn insert(&self, jobs: &[Job]) -> Result<()> {
        let t = now();
        let _turn = self.store.writes().turn().await;
        let write = async {
            let mut conn = self.pool().acquire().await?;
            // One message: one autocommit statement. More: one transaction.
            if let [job] = jobs {
                return Self::insert_one(job, t, &mut conn).await;
            }
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            for job in jobs {
                Self::insert_one(job, t, &mut tx).await?;
            }
            tx.commit().await
        };
        write.await.map_err(|e| db_error("enqueue messages", e))
    }

    async fn insert_on(&self, conn: &mut SqliteConnection, jobs: &[Job]) -> Result<()> {
        let t = now();
        for job in jobs {
            Self::insert_one(job, t, conn)
                .await
                .map_err(|e| db_error("enqueue messages", e))?;
        }
        Ok(())
    }

    async fn insert_raw(&self, queue: &str, body: Vec<u8>) -> Result<()> {
        self.exec(
            "enqueue raw bytes",
            sqlx::query(
                "INSERT INTO troupe_jobs (queue, message_id, priority, state, available_at, enqueued_at, body)
             VALUES (?1, ?2, 0, 0, ?3, ?3, ?4)",
            )
            .bind(queue)
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(now())
            .bind(body),
        )
        .await?;
        Ok(())
    }

    async fn look(&self, queue: &str) -> Result<(bool, bool)> {
        // A read, so idle consumers never take the write lock.
        let row = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM troupe_jobs WHERE state = 0 AND queue = ?1),
                    EXISTS (SELECT 1 FROM troupe_jobs WHERE state = 3 AND queue = ?1 AND available_at <= ?2)",
        )
        .bind(queue)
        .bind(now())
        .fetch_one(self.pool())
        .await
        .map_err(|e| db_error("look for messages", e))?;
        let ready: bool = row.try_get(0).map_err(|e| db_error("look for messages", e))?;
        let due: bool = row.try_get(1).map_err(|e| db_error("look for messages", e))?;
        Ok((ready, due))
    }

    async fn release_due(&self, queue: &str) -> Result<()> {
        self.exec(
            "release due delayed messages",
            sqlx::query("UPDATE troupe_jobs SET state = 0 WHERE state = 3 AND queue = ?1 AND available_at <= ?2")
                .bind(queue)
                .bind(now()),
        )
        .await?;
        Ok(())
    }

    async fn claim(&self, queue: &str, owner: &str, lease: Duration, max: usize) -> Result<Vec<Claimed>> {
        let _turn = self.store.writes().turn().await;
        let rows = sqlx::query(
            "UPDATE troupe_jobs SET state = 1, attempt = attempt + 1, lease_owner = ?1, lease_until = ?2
             WHERE id IN (SELECT id FROM troupe_jobs WHERE state = 0 AND queue = ?3 ORDER BY priority, id LIMIT ?4)
             RETURNING id, attempt, priority, body",
        )
        .bind(owner)
        .bind(now() + ms(lease))
        .bind(queue)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&self.claims)
        .await
        .map_err(|e| db_error("claim messages", e))?;
        rows.iter()
            .map(|r| {
                Ok(Claimed::new(
                    r.try_get("id")?,
                    r.try_get("attempt")?,
                    r.try_get("priority")?,
                    r.try_get("body")?,
                ))
            })
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read claimed messages", e))
    }

    async fn settle(&self, batch: &[Settle<Key>]) -> Result<()> {
        // Acks and requeues go in one statement each (a JSON array of [id, attempt] pairs): one
        // round trip to SQLite's thread for the whole batch. Nacks, rare, go one by one.
        let mut acks = Vec::new();
        let mut requeues = Vec::new();
        for w in batch {
            match w.op {
                SettleOp::Ack => acks.push(w.key),
                SettleOp::Requeue => requeues.push(w.key),
                SettleOp::Nack { .. } => {}
            }
        }
        let _turn = self.store.writes().turn().await;
        let mut tx = self
            .pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db_error("begin a write", e))?;
        if !acks.is_empty() {
            sqlx::query(
                "DELETE FROM troupe_jobs WHERE state = 1 AND (id, attempt) IN
                 (SELECT value ->> 0, value ->> 1 FROM json_each(?1))",
            )
            .bind(pairs(&acks)?)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("ack messages", e))?;
        }
        if !requeues.is_empty() {
            sqlx::query(
                "UPDATE troupe_jobs SET state = 0, lease_owner = NULL, lease_until = NULL
                 WHERE state = 1 AND (id, attempt) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?1))",
            )
            .bind(pairs(&requeues)?)
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

    async fn renew(&self, owners: &[String], lease: Duration) -> Result<()> {
        let list = serde_json::to_string(owners).map_err(|e| Error::Encode(e.to_string()))?;
        self.exec(
            "renew leases",
            sqlx::query(
                "UPDATE troupe_jobs SET lease_until = ?1
             WHERE state = 1 AND lease_owner IN (SELECT value FROM json_each(?2))",
            )
            .bind(now() + ms(lease))
            .bind(list),
        )
        .await?;
        Ok(())
    }

    async fn return_expired(&self) -> Result<u64> {
        self.exec(
            "return expired leases",
            sqlx::query(
                "UPDATE troupe_jobs SET state = 0, lease_owner = NULL, lease_until = NULL
             WHERE state = 1 AND lease_until < ?1",
            )
            .bind(now()),
        )
        .await
    }

    async fn return_owned(&self, owner: &str) -> Result<u64> {
        self.exec(
            "return unacked messages",
            sqlx::query(
                "UPDATE troupe_jobs SET state = 0, lease_owner = NULL, lease_until = NULL
             WHERE state = 1 AND lease_owner = ?1",
            )
            .bind(owner),
        )
        .await
    }

    async fn expire_dead(&self, ttl: Duration) -> Result<u64> {
        self.exec(
            "expire dead letters",
            sqlx::query(
                "DELETE FROM troupe_jobs WHERE id IN
             (SELECT id FROM troupe_jobs WHERE state = 2 AND failed_at < ?1 LIMIT ?2)",
            )
            .bind(now() - ms(ttl))
            .bind(i64::try_from(CLEANUP_BATCH).unwrap_or(i64::MAX)),
        )
        .await
    }

    async fn purge(&self, queue: &str) -> Result<()> {
        self.exec(
            "purge a queue",
            sqlx::query("DELETE FROM troupe_jobs WHERE queue = ?1 AND state IN (0, 2, 3)").bind(queue),
        )
        .await?;
        Ok(())
    }

    async fn counts(&self, queue: &str) -> Result<Vec<(i64, u64)>> {
        let rows = self
            .rows(
                "count messages",
                // One count per state, each on its partial index (a GROUP BY reads every row).
                sqlx::query(
                    "SELECT 0, (SELECT COUNT(*) FROM troupe_jobs WHERE queue = ?1 AND state = 0)
                     UNION ALL SELECT 1, (SELECT COUNT(*) FROM troupe_jobs WHERE queue = ?1 AND state = 1)
                     UNION ALL SELECT 2, (SELECT COUNT(*) FROM troupe_jobs WHERE queue = ?1 AND state = 2)
                     UNION ALL SELECT 3, (SELECT COUNT(*) FROM troupe_jobs WHERE queue = ?1 AND state = 3)",
                )
                .bind(queue),
            )
            .await?;
        rows.iter()
            .map(|row| {
                let state: i64 = row.try_get(0)?;
                let count: i64 = row.try_get(1)?;
                Ok((state, u64::try_from(count).unwrap_or(0)))
            })
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read stats", e))
    }

    async fn dead_rows(&self, queue: &str, limit: Option<usize>) -> Result<Vec<DeadRow>> {
        let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let rows = self
            .rows(
                "list dead letters",
                sqlx::query(
                    "SELECT id, body, reason, failed_at FROM troupe_jobs
             WHERE queue = ?1 AND state = 2 ORDER BY failed_at, id LIMIT ?2",
                )
                .bind(queue)
                .bind(limit),
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(DeadRow::new(
                    row.try_get("id")?,
                    row.try_get("body")?,
                    row.try_get("reason")?,
                    row.try_get("failed_at")?,
                ))
            })
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read a dead letter", e))
    }

    async fn revive(&self, _queue: &str, rows: &[(i64, Vec<u8>)]) -> Result<u64> {
        let _turn = self.store.writes().turn().await;
        let mut tx = self
            .pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db_error("begin a requeue", e))?;
        let t = now();
        let mut moved = 0;
        for (id, body) in rows {
            moved += sqlx::query(
                "UPDATE troupe_jobs SET state = 0, body = ?2, attempt = 0, available_at = ?3, reason = NULL,
                 failed_at = NULL WHERE id = ?1 AND state = 2",
            )
            .bind(id)
            .bind(body.as_slice())
            .bind(t)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("requeue a dead letter", e))?
            .rows_affected();
        }
        tx.commit().await.map_err(|e| db_error("commit the requeue", e))?;
        Ok(moved)
    }

    async fn purge_dead(&self, queue: &str) -> Result<u64> {
        self.exec(
            "purge dead letters",
            sqlx::query("DELETE FROM troupe_jobs WHERE queue = ?1 AND state = 2").bind(queue),
        )
        .await
    }

    async fn peek(&self, queue: &str, state: i64, offset: usize, limit: usize) -> Result<Vec<(Vec<u8>, i64)>> {
        let order = if state == 0 { "priority, id" } else { "available_at, id" };
        let sql = format!(
            "SELECT body, available_at FROM troupe_jobs WHERE queue = ?1 AND state = ?2 ORDER BY {order} LIMIT ?3 OFFSET ?4"
        );
        let rows = self
            .rows(
                "list messages",
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(queue)
                    .bind(state)
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .bind(i64::try_from(offset).unwrap_or(i64::MAX)),
            )
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read a message", e))
    }

    async fn delete_dead(&self, queue: &str, ids: &[i64]) -> Result<u64> {
        let ids = serde_json::to_string(ids).map_err(|e| Error::Encode(e.to_string()))?;
        self.exec(
            "delete dead letters",
            sqlx::query(
                "DELETE FROM troupe_jobs WHERE queue = ?1 AND state = 2 AND id IN (SELECT value FROM json_each(?2))",
            )
            .bind(queue)
            .bind(ids),
        )
        .await
    }

    async fn queues(&self) -> Result<Vec<String>> {
        let rows = self
            .rows(
                "list queues",
                sqlx::query("SELECT name FROM troupe_queues ORDER BY name"),
            )
            .await?;
        rows.iter()
            .map(|row| row.try_get(0))
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read a queue name", e))
    }

    async fn beat(&self, id: &str, info: &str, expires_ms: i64) -> Result<()> {
        self.exec(
            "store a worker heartbeat",
            sqlx::query(
                "INSERT INTO troupe_workers (id, info, expires_at) VALUES (?1, ?2, ?3)
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
            sqlx::query("DELETE FROM troupe_workers WHERE id = ?1").bind(id),
        )
        .await
        .map(|_| ())
    }

    async fn workers(&self, now_ms: i64) -> Result<Vec<String>> {
        self.exec(
            "delete expired worker heartbeats",
            sqlx::query("DELETE FROM troupe_workers WHERE expires_at <= ?1").bind(now_ms),
        )
        .await?;
        let rows = self
            .rows(
                "list workers",
                sqlx::query("SELECT info FROM troupe_workers WHERE expires_at > ?1 ORDER BY id").bind(now_ms),
            )
            .await?;
        rows.iter()
            .map(|row| row.try_get(0))
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read a worker heartbeat", e))
    }

    fn listen(&self, _wake: Wake) -> Option<impl Future<Output = ()> + Send + 'static> {
        // No server to announce other processes' messages: consumers poll.
        None::<std::future::Ready<()>>
    }

    async fn close(&self) {
        self.claims.close().await;
        self.pool().close().await;
    }
}
