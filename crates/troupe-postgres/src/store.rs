//! The results and state statements on PostgreSQL (`results`, `state`, `events` in Troupe's
//! schema; the task store's are in `tasks.rs`). Every counter update is one statement (or a transaction holding an advisory lock),
//! atomic under concurrency; times are the server's.

use std::time::Duration;

use sqlx::postgres::{PgArguments, PgRow, Postgres};
use sqlx::query::Query;
use sqlx::{Connection, PgPool, Row};
use troupe_core::{Result, TaskFilter, TaskQuery};
use troupe_sql::tasks::{TaskCountRow, TaskRow, TaskWrite};
use troupe_sql::{Store, dialect::CLEANUP_BATCH, ms};

use crate::db::{BACKEND, db_error, timed};
use crate::pooling::{Db, Statements};
use crate::tasks;

/// PostgreSQL's results, state and task statements, for [`crate::PostgresResults`] and
/// [`crate::PostgresState`]. Not used directly.
#[derive(Clone, Debug)]
pub struct PostgresStore {
    db: Db,
    sql: Statements,
}

impl PostgresStore {
    /// Opens (and migrates) the database `options` name: the results and state statements
    /// with its settings, for `PostgresResults::from_store` and `PostgresState::from_store`
    /// (behind a transaction pooler a bare pool does not carry the mode).
    ///
    /// # Errors
    /// As [`crate::open`].
    pub async fn open(options: &crate::PostgresOptions) -> Result<Self> {
        Ok(Self::from_db(crate::db::open(options).await?))
    }

    /// Statements over the main pool `db`.
    pub(crate) fn from_db(db: Db) -> Self {
        Self {
            sql: db.statements(),
            db,
        }
    }

    /// The main pool.
    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// Runs one query on the pool; its row, if any.
    async fn row(&self, what: &str, query: Query<'_, Postgres, PgArguments>) -> Result<Option<PgRow>> {
        timed!(&self.db, what, |c| query.fetch_optional(c))
    }

    /// Runs one statement on the pool; how many rows it changed.
    async fn exec(&self, what: &str, query: Query<'_, Postgres, PgArguments>) -> Result<u64> {
        let done = timed!(&self.db, what, |c| query.execute(c))?;
        Ok(done.rows_affected())
    }
}

impl Store for PostgresStore {
    type Pool = PgPool;

    const BACKEND: &'static str = BACKEND;

    fn from_pool(pool: PgPool) -> Self {
        Self::from_db(Db::direct(pool))
    }

    fn pool(&self) -> &PgPool {
        self.db.pool()
    }

    async fn open_url(url: &str) -> Result<Self> {
        Ok(Self::from_db(
            crate::db::open(&crate::PostgresOptions::from_url(url)?).await?,
        ))
    }

    async fn read_result(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let row = self
            .row(
                "read a result",
                self.sql
                    .query("SELECT value FROM results WHERE key = $1 AND expires_at > now()")
                    .bind(key),
            )
            .await?;
        row.map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| db_error("read a result", e))
    }

    async fn write_result(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<()> {
        self.exec(
            "store a result",
            self.sql.query(
                "INSERT INTO results (key, value, expires_at) VALUES ($1, $2, now() + $3 * interval '1 millisecond')
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
            )
            .bind(key)
            .bind(value)
            .bind(ms(ttl)),
        )
        .await?;
        Ok(())
    }

    async fn expire_results(&self) -> Result<u64> {
        self.exec(
            "expire results",
            self.sql
                .query("DELETE FROM results WHERE key IN (SELECT key FROM results WHERE expires_at <= now() LIMIT $1)")
                .bind(i64::try_from(CLEANUP_BATCH).unwrap_or(i64::MAX)),
        )
        .await
    }

    async fn add(&self, key: &str, value: i64, ttl: Duration) -> Result<bool> {
        let changed = self.exec("add a counter", self.sql.query("INSERT INTO state AS s (key, value, expires_at) VALUES ($1, $2, now() + $3 * interval '1 millisecond')
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
             WHERE s.expires_at <= now()")
        .bind(key)
        .bind(value)
        .bind(ms(ttl))).await?;
        Ok(changed == 1)
    }

    async fn bounded(&self, key: &str, amount: i64, min: i64, max: i64, ttl: Duration) -> Result<bool> {
        // The conflict branch re-checks the bound on the locked row, so concurrent updates
        // never pass it.
        let changed = self.exec("update a counter", self.sql.query("WITH cur AS (SELECT COALESCE((SELECT value FROM state WHERE key = $1 AND expires_at > now()), 0) AS v)
             INSERT INTO state AS s (key, value, expires_at)
             SELECT $1, cur.v + $2, now() + $5 * interval '1 millisecond' FROM cur WHERE cur.v + $2 BETWEEN $3 AND $4
             ON CONFLICT (key) DO UPDATE
               SET value = (CASE WHEN s.expires_at > now() THEN s.value ELSE 0 END) + $2,
                   expires_at = excluded.expires_at
               WHERE (CASE WHEN s.expires_at > now() THEN s.value ELSE 0 END) + $2 BETWEEN $3 AND $4")
        .bind(key)
        .bind(amount)
        .bind(min)
        .bind(max)
        .bind(ms(ttl))).await?;
        Ok(changed == 1)
    }

    async fn incr_and_sum(&self, key: &str, keys: &[String], amount: i64, max: i64, ttl: Duration) -> Result<bool> {
        timed!(&self.db, "a window update", |conn| async move {
            let mut tx = conn.begin().await.map_err(|e| db_error("begin a window update", e))?;
            // Serialise updates of this window: lock its first key's advisory lock.
            self.sql
                .query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("lock a window", e))?;
            let sum: i64 = self
                .sql
                .query("SELECT COALESCE(SUM(value), 0)::bigint FROM state WHERE key = ANY($1) AND expires_at > now()")
                .bind(keys)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| db_error("sum a window", e))?
                .try_get(0)
                .map_err(|e| db_error("sum a window", e))?;
            if sum.saturating_add(amount) > max {
                return Ok(false);
            }
            self.sql.query(
                "INSERT INTO state AS s (key, value, expires_at) VALUES ($1, $2, now() + $3 * interval '1 millisecond')
             ON CONFLICT (key) DO UPDATE
               SET value = (CASE WHEN s.expires_at > now() THEN s.value ELSE 0 END) + $2,
                   expires_at = excluded.expires_at",
            )
            .bind(key)
            .bind(amount)
            .bind(ms(ttl))
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("update a window", e))?;
            tx.commit().await.map_err(|e| db_error("commit a window update", e))?;
            Ok::<_, troupe_core::Error>(true)
        })
    }

    async fn arrive(&self, key: &str, party: &str, outcome: &str, ttl: Duration) -> Result<(bool, bool, bool)> {
        timed!(&self.db, "a barrier arrival", |conn| async move {
            let mut tx = conn.begin().await.map_err(|e| db_error("begin a barrier arrival", e))?;
            // Serialise the arrivals at this barrier (and with Python-style counter updates, which
            // lock its state row).
            self.sql
                .query("SELECT pg_advisory_xact_lock(hashtext('troupe arrivals'), hashtext($1))")
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("lock a barrier", e))?;
            let events = format!("{key}@events");
            self.sql
                .query("DELETE FROM arrivals WHERE key = $1 AND expires_at <= now()")
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("drop expired arrivals", e))?;
            let counted = self
                .sql
                .query(
                    "INSERT INTO arrivals (key, party, outcome, expires_at)
             VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond') ON CONFLICT (key, party) DO NOTHING",
                )
                .bind(key)
                .bind(party)
                .bind(outcome)
                .bind(ms(ttl))
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("record an arrival", e))?
                .rows_affected()
                == 1;
            let cleared = if counted {
                // Dramatiq's step: down by one unless that goes below 1 (the row is locked).
                let stepped = self
                    .sql
                    .query(
                        "UPDATE state SET value = value - 1, expires_at = now() + $2 * interval '1 millisecond'
                 WHERE key = $1 AND expires_at > now() AND value - 1 >= 1",
                    )
                    .bind(key)
                    .bind(ms(ttl))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_error("count an arrival", e))?
                    .rows_affected()
                    == 1;
                if !stepped {
                    self.sql
                        .query(
                            "INSERT INTO events (key, expires_at) VALUES ($1, now() + $2 * interval '1 millisecond')
                     ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at",
                        )
                        .bind(&events)
                        .bind(ms(ttl))
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| db_error("clear a barrier", e))?;
                    self.sql.query(
                    "INSERT INTO arrivals (key, party, outcome, expires_at)
                     VALUES ($1, '', $2, now() + $3 * interval '1 millisecond')
                     ON CONFLICT (key, party) DO UPDATE SET outcome = excluded.outcome, expires_at = excluded.expires_at",
                )
                .bind(key)
                .bind(party)
                .bind(ms(ttl))
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("clear a barrier", e))?;
                }
                !stepped
            } else {
                self.sql
                    .query("SELECT 1 FROM events WHERE key = $1 AND expires_at > now()")
                    .bind(&events)
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
                    && self
                        .sql
                        .query("SELECT 1 FROM arrivals WHERE key = $1 AND party = '' AND outcome = $2")
                        .bind(key)
                        .bind(party)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(|e| db_error("read a barrier", e))?
                        .is_some()
            };
            tx.commit().await.map_err(|e| db_error("commit a barrier arrival", e))?;
            Ok::<_, troupe_core::Error>((counted, cleared, clearer))
        })
    }

    async fn coordination(&self, limit: usize) -> Result<troupe_sql::dialect::CoordinationRows> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let slots = timed!(&self.db, "list slot holders", |c| self
            .sql
            .query(
                "SELECT key, holder FROM slots WHERE expires_at > now()
             AND key IN (SELECT DISTINCT key FROM slots WHERE expires_at > now() ORDER BY key LIMIT $1)
             ORDER BY key, holder",
            )
            .bind(limit)
            .fetch_all(c))?;
        let barriers = timed!(&self.db, "list barriers", |c| self
            .sql
            .query(
                "SELECT key, COUNT(*) FILTER (WHERE party <> ''), bool_or(party = '') FROM arrivals
             WHERE expires_at > now() GROUP BY key ORDER BY key LIMIT $1",
            )
            .bind(limit)
            .fetch_all(c))?;
        let slots = slots
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read slot holders", e))?;
        let barriers = barriers
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read barriers", e))?;
        Ok((slots, barriers))
    }

    async fn arrivals(&self, key: &str) -> Result<Vec<(String, String)>> {
        let rows = timed!(&self.db, "read arrivals", |c| self
            .sql
            .query("SELECT party, outcome FROM arrivals WHERE key = $1 AND party <> '' AND expires_at > now()")
            .bind(key)
            .fetch_all(c))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<sqlx::Result<_>>()
            .map_err(|e| db_error("read arrivals", e))
    }

    async fn acquire_slot(&self, key: &str, holder: &str, limit: i64, lease: Duration) -> Result<bool> {
        timed!(&self.db, "a slot acquire", |conn| async move {
            let mut tx = conn.begin().await.map_err(|e| db_error("begin a slot acquire", e))?;
            // Serialise the acquires of this key: the count and the insert see every other's.
            self.sql
                .query("SELECT pg_advisory_xact_lock(hashtext('troupe slots'), hashtext($1))")
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("lock a slot key", e))?;
            self.sql
                .query("DELETE FROM slots WHERE key = $1 AND expires_at <= now()")
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("drop expired slots", e))?;
            let taken = self
                .sql
                .query(
                    "INSERT INTO slots (key, holder, expires_at)
             SELECT $1, $2, now() + $3 * interval '1 millisecond'
             WHERE (SELECT count(*) FROM slots WHERE key = $1 AND holder <> $2) < $4
             ON CONFLICT (key, holder) DO UPDATE SET expires_at = excluded.expires_at",
                )
                .bind(key)
                .bind(holder)
                .bind(ms(lease))
                .bind(limit)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("take a slot", e))?
                .rows_affected();
            tx.commit().await.map_err(|e| db_error("commit a slot acquire", e))?;
            Ok::<_, troupe_core::Error>(taken == 1)
        })
    }

    async fn renew_slot(&self, key: &str, holder: &str, lease: Duration) -> Result<bool> {
        let renewed = self
            .exec(
                "renew a slot",
                self.sql
                    .query(
                        "UPDATE slots SET expires_at = now() + $3 * interval '1 millisecond'
                     WHERE key = $1 AND holder = $2 AND expires_at > now()",
                    )
                    .bind(key)
                    .bind(holder)
                    .bind(ms(lease)),
            )
            .await?;
        Ok(renewed == 1)
    }

    async fn release_slot(&self, key: &str, holder: &str) -> Result<()> {
        self.exec(
            "release a slot",
            self.sql
                .query("DELETE FROM slots WHERE key = $1 AND holder = $2")
                .bind(key)
                .bind(holder),
        )
        .await
        .map(|_| ())
    }

    async fn counter(&self, key: &str) -> Result<Option<i64>> {
        let row = self
            .row(
                "read a counter",
                self.sql
                    .query("SELECT value FROM state WHERE key = $1 AND expires_at > now()")
                    .bind(key),
            )
            .await?;
        row.map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| db_error("read a counter", e))
    }

    async fn event_seen(&self, key: &str) -> Result<bool> {
        let found = self
            .row(
                "read an event",
                self.sql
                    .query("SELECT 1 FROM events WHERE key = $1 AND expires_at > now()")
                    .bind(key),
            )
            .await?;
        Ok(found.is_some())
    }

    async fn write_event(&self, key: &str, ttl: Duration) -> Result<()> {
        self.exec(
            "write an event",
            self.sql
                .query(
                    "INSERT INTO events (key, expires_at) VALUES ($1, now() + $2 * interval '1 millisecond')
             ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at",
                )
                .bind(key)
                .bind(ms(ttl)),
        )
        .await?;
        Ok(())
    }

    async fn record_tasks(&self, writes: &[TaskWrite<'_>], retention: Duration) -> Result<Vec<bool>> {
        timed!(&self.db, "record tasks", |c| tasks::record(
            self.sql, c, writes, retention
        ))
    }

    async fn set_progress(&self, message_id: &str, progress: &str, at: i64, retention: Duration) -> Result<bool> {
        timed!(&self.db, "store a task's progress", |c| tasks::set_progress(
            self.sql, c, message_id, progress, at, retention
        ))
    }

    async fn task(&self, message_id: &str) -> Result<Option<TaskRow>> {
        timed!(&self.db, "read a task", |c| tasks::task(self.sql, c, message_id))
    }

    async fn tasks(&self, query: &TaskQuery) -> Result<Vec<TaskRow>> {
        timed!(&self.db, "read a page of tasks", |c| tasks::tasks(self.sql, c, query))
    }

    async fn task_counts(&self, scope: &TaskFilter) -> Result<Vec<TaskCountRow>> {
        timed!(&self.db, "count tasks", |c| tasks::task_counts(self.sql, c, scope))
    }

    async fn task_status_count(&self, status: &str, scope: &TaskFilter) -> Result<i64> {
        if scope.actor.is_none() && scope.queue.is_none() {
            // Counting stops at 10,000; past it the planner's estimate stands in (a count of
            // a million rows takes a fifth of a second).
            let capped: i64 = timed!(&self.db, "count tasks", |c| self
                .sql
                .scalar("SELECT count(*) FROM (SELECT 1 FROM tasks WHERE status = $1 LIMIT 10001) AS capped",)
                .bind(status)
                .fetch_one(c))?;
            if capped <= 10_000 {
                return Ok(capped);
            }
            // EXPLAIN takes no parameters; a status is one of Troupe's names.
            let sql = format!(
                "EXPLAIN SELECT 1 FROM tasks WHERE status = '{}'",
                status.replace('\'', "''")
            );
            let plan: Vec<String> = timed!(&self.db, "estimate a count", |c| self
                .sql
                .scalar(sqlx::AssertSqlSafe(sql))
                .fetch_all(c))?;
            let estimate = plan
                .first()
                .and_then(|line| line.split("rows=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|rows| rows.parse::<i64>().ok())
                .unwrap_or(0);
            return Ok(estimate.max(capped));
        }
        // One of the (status, ...) indexes answers it (an index-only scan once vacuumed).
        let sql = match (&scope.actor, &scope.queue) {
            (Some(_), Some(_)) => "SELECT count(*) FROM tasks WHERE status = $1 AND actor = $2 AND queue = $3",
            (Some(_), None) => "SELECT count(*) FROM tasks WHERE status = $1 AND actor = $2 AND $3 = $3",
            (None, Some(_)) => "SELECT count(*) FROM tasks WHERE status = $1 AND queue = $3 AND $2 = $2",
            (None, None) => "SELECT count(*) FROM tasks WHERE status = $1 AND $2 = $2 AND $3 = $3",
        };
        timed!(&self.db, "count tasks", |c| self
            .sql
            .scalar::<i64>(sql)
            .bind(status)
            .bind(scope.actor.as_deref().unwrap_or_default())
            .bind(scope.queue.as_deref().unwrap_or_default())
            .fetch_one(c))
    }

    async fn delete_task(&self, message_id: &str) -> Result<bool> {
        timed!(&self.db, "delete a task", |c| tasks::delete_task(
            self.sql, c, message_id
        ))
    }

    async fn expire_tasks(&self, limit: i64) -> Result<u64> {
        timed!(&self.db, "expire tasks", |c| tasks::expire_tasks(self.sql, c, limit))
    }

    async fn mark_cancelled(&self, message_id: &str, at: i64, retention: Duration) -> Result<Option<String>> {
        timed!(&self.db, "cancel a task", |c| tasks::mark_cancelled(
            self.sql, c, message_id, at, retention
        ))
    }

    async fn request_cancel(&self, message_id: &str, mode: &str, ttl: Duration) -> Result<()> {
        timed!(&self.db, "request a cancellation", |c| tasks::request_cancel(
            self.sql, c, message_id, mode, ttl
        ))
    }

    async fn cancels(&self, message_ids: &[String]) -> Result<Vec<(String, String)>> {
        timed!(&self.db, "read cancellation requests", |c| tasks::cancels(
            self.sql,
            c,
            message_ids
        ))
    }

    async fn claim_unique(&self, key: &str, message_id: &str, ttl: Duration) -> Result<String> {
        timed!(&self.db, "claim a unique key", |c| tasks::claim_unique(
            self.sql, c, key, message_id, ttl
        ))
    }

    async fn release_unique(&self, key: &str, message_id: &str) -> Result<()> {
        timed!(&self.db, "release a unique key", |c| tasks::release_unique(
            self.sql, c, key, message_id
        ))
    }
}
