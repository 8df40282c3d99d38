//! PostgreSQL state backend.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{PgPool, Row};
use troupe_core::support::poll_until;
use troupe_core::{Result, StateBackend};

use crate::db::{db_error, ms};

const POLL: Duration = Duration::from_millis(20);

/// Atomic counters with TTLs in the `state` table; events in `events`. Every operation is one
/// statement, atomic under concurrency.
#[derive(Clone, Debug)]
pub struct PostgresState {
    pool: PgPool,
}

impl PostgresState {
    /// State in the database of `pool`.
    #[must_use]
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// This backend as a shared trait object.
    #[must_use]
    pub fn into_dyn(self) -> Arc<dyn StateBackend> {
        Arc::new(self)
    }

    /// Adds `amount` when the live value (0 when missing or expired) plus `amount` stays within
    /// [min, max], in one statement; the conflict branch re-checks the bound on the locked row,
    /// so concurrent updates never pass it.
    async fn bounded(&self, key: &str, amount: i64, min: i64, max: i64, ttl: Duration) -> Result<bool> {
        let changed = sqlx::query(
            "WITH cur AS (SELECT COALESCE((SELECT value FROM state WHERE key = $1 AND expires_at > now()), 0) AS v)
             INSERT INTO state AS s (key, value, expires_at)
             SELECT $1, cur.v + $2, now() + $5 * interval '1 millisecond' FROM cur WHERE cur.v + $2 BETWEEN $3 AND $4
             ON CONFLICT (key) DO UPDATE
               SET value = (CASE WHEN s.expires_at > now() THEN s.value ELSE 0 END) + $2,
                   expires_at = excluded.expires_at
               WHERE (CASE WHEN s.expires_at > now() THEN s.value ELSE 0 END) + $2 BETWEEN $3 AND $4",
        )
        .bind(key)
        .bind(amount)
        .bind(min)
        .bind(max)
        .bind(ms(ttl))
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("update a counter", e))?
        .rows_affected();
        Ok(changed == 1)
    }
}

#[async_trait]
impl StateBackend for PostgresState {
    async fn add(&self, key: &str, value: i64, ttl: Duration) -> Result<bool> {
        let changed = sqlx::query(
            "INSERT INTO state AS s (key, value, expires_at) VALUES ($1, $2, now() + $3 * interval '1 millisecond')
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
             WHERE s.expires_at <= now()",
        )
        .bind(key)
        .bind(value)
        .bind(ms(ttl))
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("add a counter", e))?
        .rows_affected();
        Ok(changed == 1)
    }

    async fn incr(&self, key: &str, amount: i64, maximum: i64, ttl: Duration) -> Result<bool> {
        self.bounded(key, amount, i64::MIN, maximum, ttl).await
    }

    async fn decr(&self, key: &str, amount: i64, minimum: i64, ttl: Duration) -> Result<bool> {
        self.bounded(key, -amount, minimum, i64::MAX, ttl).await
    }

    async fn incr_and_sum(&self, key: &str, keys: &[String], amount: i64, maximum: i64, ttl: Duration) -> Result<bool> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| db_error("begin a window update", e))?;
        // Serialise updates of this window: lock its first key's advisory lock.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("lock a window", e))?;
        let sum: i64 =
            sqlx::query("SELECT COALESCE(SUM(value), 0)::bigint FROM state WHERE key = ANY($1) AND expires_at > now()")
                .bind(keys)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| db_error("sum a window", e))?
                .try_get(0)
                .map_err(|e| db_error("sum a window", e))?;
        if sum.saturating_add(amount) > maximum {
            return Ok(false);
        }
        sqlx::query(
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
        Ok(true)
    }

    async fn get(&self, key: &str) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT value FROM state WHERE key = $1 AND expires_at > now()")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error("read a counter", e))?;
        row.map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| db_error("read a counter", e))
    }

    async fn wait(&self, key: &str, timeout: Duration) -> Result<bool> {
        let seen = poll_until(timeout, POLL, None, || async {
            let found = sqlx::query("SELECT 1 FROM events WHERE key = $1 AND expires_at > now()")
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| db_error("read an event", e))?;
            Ok(found.map(|_| ()))
        })
        .await?;
        Ok(seen.is_some())
    }

    async fn notify(&self, key: &str, ttl: Duration) -> Result<()> {
        sqlx::query(
            "INSERT INTO events (key, expires_at) VALUES ($1, now() + $2 * interval '1 millisecond')
             ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(ms(ttl))
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("write an event", e))?;
        Ok(())
    }
}
