//! The results and state statements on SQLite (`troupe_results`, `troupe_state`,
//! `troupe_events`; the task store's are in `tasks.rs`). Counters change inside
//! `BEGIN IMMEDIATE` transactions, which hold the database's write lock, so concurrent updates
//! never pass their bounds.

use std::time::Duration;

use sqlx::query::Query;
use sqlx::sqlite::{Sqlite, SqliteArguments, SqliteRow};
use sqlx::{Row, SqliteConnection, SqlitePool};
use troupe_core::{Result, TaskFilter, TaskQuery};
use troupe_sql::tasks::{TaskCountRow, TaskRow, TaskWrite};
use troupe_sql::{Store, dialect::CLEANUP_BATCH, ms};

use crate::db::{BACKEND, Writes, db_error, now};
use crate::tasks;

/// SQLite's results, state and task statements, for [`crate::SqliteResults`] and
/// [`crate::SqliteState`]. Not used directly.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    writes: Writes,
}

impl SqliteStore {
    /// Runs one query on the pool; its row, if any.
    async fn row(&self, what: &str, query: Query<'_, Sqlite, SqliteArguments>) -> Result<Option<SqliteRow>> {
        query.fetch_optional(&self.pool).await.map_err(|e| db_error(what, e))
    }

    /// Runs one writing statement on the pool, in this process's turn; how many rows it
    /// changed.
    async fn exec(&self, what: &str, query: Query<'_, Sqlite, SqliteArguments>) -> Result<u64> {
        let _turn = self.writes.turn().await;
        let done = query.execute(&self.pool).await.map_err(|e| db_error(what, e))?;
        Ok(done.rows_affected())
    }

    /// This process's turn queue for writes to the database (see [`Writes`]).
    pub(crate) fn writes(&self) -> &Writes {
        &self.writes
    }

    /// Reads the live value of `key` on `conn`.
    async fn current(conn: &mut SqliteConnection, key: &str, t: i64) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT value FROM troupe_state WHERE key = ?1 AND expires_at > ?2")
            .bind(key)
            .bind(t)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| db_error("read a counter", e))?;
        row.map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| db_error("read a counter", e))
    }

    async fn set(conn: &mut SqliteConnection, key: &str, value: i64, expires_at: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO troupe_state (key, value, expires_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(value)
        .bind(expires_at)
        .execute(&mut *conn)
        .await
        .map_err(|e| db_error("write a counter", e))?;
        Ok(())
    }
}

impl Store for SqliteStore {
    type Pool = SqlitePool;

    const BACKEND: &'static str = BACKEND;

    fn from_pool(pool: SqlitePool) -> Self {
        Self {
            writes: Writes::of(&pool),
            pool,
        }
    }

    fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn open_url(url: &str) -> Result<Self> {
        Ok(Self::from_pool(
            crate::open(&crate::SqliteOptions::from_url(url)?).await?,
        ))
    }

    async fn read_result(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let row = self
            .row(
                "read a result",
                sqlx::query("SELECT value FROM troupe_results WHERE key = ?1 AND expires_at > ?2")
                    .bind(key)
                    .bind(now()),
            )
            .await?;
        row.map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| db_error("read a result", e))
    }

    async fn write_result(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<()> {
        self.exec(
            "store a result",
            sqlx::query(
                "INSERT INTO troupe_results (key, value, expires_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
            )
            .bind(key)
            .bind(value)
            .bind(now() + ms(ttl)),
        )
        .await?;
        Ok(())
    }

    async fn expire_results(&self) -> Result<u64> {
        self.exec(
            "expire results",
            sqlx::query(
                "DELETE FROM troupe_results WHERE key IN
             (SELECT key FROM troupe_results WHERE expires_at <= ?1 LIMIT ?2)",
            )
            .bind(now())
            .bind(i64::try_from(CLEANUP_BATCH).unwrap_or(i64::MAX)),
        )
        .await
    }

    async fn add(&self, key: &str, value: i64, ttl: Duration) -> Result<bool> {
        let t = now();
        let changed = self
            .exec(
                "add a counter",
                sqlx::query(
                    "INSERT INTO troupe_state (key, value, expires_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
             WHERE troupe_state.expires_at <= ?4",
                )
                .bind(key)
                .bind(value)
                .bind(t + ms(ttl))
                .bind(t),
            )
            .await?;
        Ok(changed == 1)
    }

    async fn bounded(&self, key: &str, amount: i64, min: i64, max: i64, ttl: Duration) -> Result<bool> {
        let _turn = self.writes.turn().await;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db_error("begin a counter update", e))?;
        let t = now();
        let next = Self::current(&mut tx, key, t)
            .await?
            .unwrap_or(0)
            .saturating_add(amount);
        if !(min..=max).contains(&next) {
            return Ok(false);
        }
        Self::set(&mut tx, key, next, t + ms(ttl)).await?;
        tx.commit().await.map_err(|e| db_error("commit a counter update", e))?;
        Ok(true)
    }

    async fn incr_and_sum(&self, key: &str, keys: &[String], amount: i64, max: i64, ttl: Duration) -> Result<bool> {
        let _turn = self.writes.turn().await;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db_error("begin a counter update", e))?;
        let t = now();
        let mut sum: i64 = 0;
        for k in keys {
            sum = sum.saturating_add(Self::current(&mut tx, k, t).await?.unwrap_or(0));
        }
        if sum.saturating_add(amount) > max {
            return Ok(false);
        }
        let current = Self::current(&mut tx, key, t).await?.unwrap_or(0);
        Self::set(&mut tx, key, current.saturating_add(amount), t + ms(ttl)).await?;
        tx.commit().await.map_err(|e| db_error("commit a counter update", e))?;
        Ok(true)
    }

    async fn arrive(&self, key: &str, party: &str, outcome: &str, ttl: Duration) -> Result<(bool, bool, bool)> {
        let _turn = self.writes.turn().await;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db_error("begin a barrier arrival", e))?;
        let t = now();
        let until = t.saturating_add(ms(ttl));
        let events = format!("{key}@events");
        sqlx::query("DELETE FROM troupe_arrivals WHERE key = ?1 AND expires_at <= ?2")
            .bind(key)
            .bind(t)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("drop expired arrivals", e))?;
        let counted = sqlx::query(
            "INSERT INTO troupe_arrivals (key, party, outcome, expires_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (key, party) DO NOTHING",
        )
        .bind(key)
        .bind(party)
        .bind(outcome)
        .bind(until)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("record an arrival", e))?
        .rows_affected()
            == 1;
        let cleared = if counted {
            let left = Self::current(&mut tx, key, t).await?.unwrap_or(0).saturating_sub(1);
            if left >= 1 {
                Self::set(&mut tx, key, left, until).await?;
                false
            } else {
                sqlx::query(
                    "INSERT INTO troupe_events (key, expires_at) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at",
                )
                .bind(&events)
                .bind(until)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("clear a barrier", e))?;
                sqlx::query(
                    "INSERT INTO troupe_arrivals (key, party, outcome, expires_at) VALUES (?1, '', ?2, ?3)
                     ON CONFLICT (key, party) DO UPDATE SET outcome = excluded.outcome, expires_at = excluded.expires_at",
                )
                .bind(key)
                .bind(party)
                .bind(until)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("clear a barrier", e))?;
                true
            }
        } else {
            sqlx::query("SELECT 1 FROM troupe_events WHERE key = ?1 AND expires_at > ?2")
                .bind(&events)
                .bind(t)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| db_error("read a barrier", e))?
                .is_some()
        };
        // A counted arrival that cleared the barrier is its clearer; a repeat asks who was.
        let clearer = if counted {
            cleared
        } else {
            cleared
                && sqlx::query("SELECT 1 FROM troupe_arrivals WHERE key = ?1 AND party = '' AND outcome = ?2")
                    .bind(key)
                    .bind(party)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| db_error("read a barrier", e))?
                    .is_some()
        };
        tx.commit().await.map_err(|e| db_error("commit a barrier arrival", e))?;
        Ok((counted, cleared, clearer))
    }

    async fn coordination(&self, limit: usize) -> Result<troupe_sql::dialect::CoordinationRows> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let t = now();
        let slots = sqlx::query(
            "SELECT key, holder FROM troupe_slots WHERE expires_at > ?1
             AND key IN (SELECT DISTINCT key FROM troupe_slots WHERE expires_at > ?1 ORDER BY key LIMIT ?2)
             ORDER BY key, holder",
        )
        .bind(t)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error("list slot holders", e))?;
        let barriers = sqlx::query(
            "SELECT key, SUM(party <> ''), MAX(party = '') FROM troupe_arrivals WHERE expires_at > ?1
             GROUP BY key ORDER BY key LIMIT ?2",
        )
        .bind(t)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error("list barriers", e))?;
        let slots = slots
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read slot holders", e))?;
        let barriers = barriers
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get::<i64, _>(2)? != 0)))
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read barriers", e))?;
        Ok((slots, barriers))
    }

    async fn arrivals(&self, key: &str) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT party, outcome FROM troupe_arrivals WHERE key = ?1 AND party <> '' AND expires_at > ?2",
        )
        .bind(key)
        .bind(now())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error("read arrivals", e))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read arrivals", e))
    }

    async fn acquire_slot(&self, key: &str, holder: &str, limit: i64, lease: Duration) -> Result<bool> {
        // BEGIN IMMEDIATE holds the write lock across the count and the insert.
        let _turn = self.writes.turn().await;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db_error("begin a slot acquire", e))?;
        let t = now();
        sqlx::query("DELETE FROM troupe_slots WHERE key = ?1 AND expires_at <= ?2")
            .bind(key)
            .bind(t)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("drop expired slots", e))?;
        let taken = sqlx::query(
            "INSERT INTO troupe_slots (key, holder, expires_at)
             SELECT ?1, ?2, ?3 WHERE (SELECT COUNT(*) FROM troupe_slots WHERE key = ?1 AND holder <> ?2) < ?4
             ON CONFLICT (key, holder) DO UPDATE SET expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(holder)
        .bind(t.saturating_add(ms(lease)))
        .bind(limit)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("take a slot", e))?
        .rows_affected();
        tx.commit().await.map_err(|e| db_error("commit a slot acquire", e))?;
        Ok(taken == 1)
    }

    async fn renew_slot(&self, key: &str, holder: &str, lease: Duration) -> Result<bool> {
        let t = now();
        let renewed = self
            .exec(
                "renew a slot",
                sqlx::query(
                    "UPDATE troupe_slots SET expires_at = ?3 WHERE key = ?1 AND holder = ?2 AND expires_at > ?4",
                )
                .bind(key)
                .bind(holder)
                .bind(t.saturating_add(ms(lease)))
                .bind(t),
            )
            .await?;
        Ok(renewed == 1)
    }

    async fn release_slot(&self, key: &str, holder: &str) -> Result<()> {
        self.exec(
            "release a slot",
            sqlx::query("DELETE FROM troupe_slots WHERE key = ?1 AND holder = ?2")
                .bind(key)
                .bind(holder),
        )
        .await
        .map(|_| ())
    }

    async fn counter(&self, key: &str) -> Result<Option<i64>> {
        let mut conn = self.pool.acquire().await.map_err(|e| db_error("read a counter", e))?;
        Self::current(&mut conn, key, now()).await
    }

    async fn event_seen(&self, key: &str) -> Result<bool> {
        let found = self
            .row(
                "read an event",
                sqlx::query("SELECT 1 FROM troupe_events WHERE key = ?1 AND expires_at > ?2")
                    .bind(key)
                    .bind(now()),
            )
            .await?;
        Ok(found.is_some())
    }

    async fn write_event(&self, key: &str, ttl: Duration) -> Result<()> {
        self.exec(
            "write an event",
            sqlx::query(
                "INSERT INTO troupe_events (key, expires_at) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at",
            )
            .bind(key)
            .bind(now() + ms(ttl)),
        )
        .await?;
        Ok(())
    }

    async fn record_tasks(&self, writes: &[TaskWrite<'_>], retention: Duration) -> Result<Vec<bool>> {
        let _turn = self.writes.turn().await;
        tasks::record(&self.pool, writes, retention).await
    }

    async fn set_progress(&self, message_id: &str, progress: &str, at: i64, retention: Duration) -> Result<bool> {
        let _turn = self.writes.turn().await;
        tasks::set_progress(&self.pool, message_id, progress, at, retention).await
    }

    async fn task(&self, message_id: &str) -> Result<Option<TaskRow>> {
        tasks::task(&self.pool, message_id).await
    }

    async fn tasks(&self, query: &TaskQuery) -> Result<Vec<TaskRow>> {
        tasks::tasks(&self.pool, query).await
    }

    async fn task_counts(&self, scope: &TaskFilter) -> Result<Vec<TaskCountRow>> {
        tasks::task_counts(&self.pool, scope).await
    }

    async fn task_status_count(&self, status: &str, scope: &TaskFilter) -> Result<i64> {
        // One of the (status, ...) indexes answers it without reading the records.
        let sql = match (&scope.actor, &scope.queue) {
            (Some(_), Some(_)) => "SELECT count(*) FROM troupe_tasks WHERE status = ?1 AND actor = ?2 AND queue = ?3",
            (Some(_), None) => "SELECT count(*) FROM troupe_tasks WHERE status = ?1 AND actor = ?2",
            (None, Some(_)) => "SELECT count(*) FROM troupe_tasks WHERE status = ?1 AND queue = ?3",
            (None, None) => "SELECT count(*) FROM troupe_tasks WHERE status = ?1",
        };
        let mut query = sqlx::query_scalar::<_, i64>(sql).bind(status);
        query = query.bind(scope.actor.as_deref().unwrap_or_default());
        query = query.bind(scope.queue.as_deref().unwrap_or_default());
        query
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db_error("count tasks", e))
    }

    async fn delete_task(&self, message_id: &str) -> Result<bool> {
        let _turn = self.writes.turn().await;
        tasks::delete_task(&self.pool, message_id).await
    }

    async fn expire_tasks(&self, limit: i64) -> Result<u64> {
        let _turn = self.writes.turn().await;
        tasks::expire_tasks(&self.pool, limit).await
    }

    async fn mark_cancelled(&self, message_id: &str, at: i64, retention: Duration) -> Result<Option<String>> {
        let _turn = self.writes.turn().await;
        tasks::mark_cancelled(&self.pool, message_id, at, retention).await
    }

    async fn request_cancel(&self, message_id: &str, mode: &str, ttl: Duration) -> Result<()> {
        let _turn = self.writes.turn().await;
        tasks::request_cancel(&self.pool, message_id, mode, ttl).await
    }

    async fn cancels(&self, message_ids: &[String]) -> Result<Vec<(String, String)>> {
        tasks::cancels(&self.pool, message_ids).await
    }

    async fn claim_unique(&self, key: &str, message_id: &str, ttl: Duration) -> Result<String> {
        let _turn = self.writes.turn().await;
        tasks::claim_unique(&self.pool, key, message_id, ttl).await
    }

    async fn release_unique(&self, key: &str, message_id: &str) -> Result<()> {
        let _turn = self.writes.turn().await;
        tasks::release_unique(&self.pool, key, message_id).await
    }
}
