//! SQLite state backend.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Row, SqlitePool};
use troupe_core::support::poll_until;
use troupe_core::{Result, StateBackend};

use crate::db::{db_error, ms, now};

const POLL: Duration = Duration::from_millis(20);

/// Atomic counters with TTLs in the `troupe_state` table; events in `troupe_events`.
#[derive(Clone, Debug)]
pub struct SqliteState {
    pool: SqlitePool,
}

impl SqliteState {
    /// State in the database of `pool`.
    #[must_use]
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// This backend as a shared trait object.
    #[must_use]
    pub fn into_dyn(self) -> Arc<dyn StateBackend> {
        Arc::new(self)
    }

    /// Reads the live value of `key` inside `tx`.
    async fn current(tx: &mut sqlx::SqliteConnection, key: &str, t: i64) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT value FROM troupe_state WHERE key = ?1 AND expires_at > ?2")
            .bind(key)
            .bind(t)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db_error("read a counter", e))?;
        row.map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| db_error("read a counter", e))
    }

    async fn set(tx: &mut sqlx::SqliteConnection, key: &str, value: i64, expires_at: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO troupe_state (key, value, expires_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(value)
        .bind(expires_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("write a counter", e))?;
        Ok(())
    }

    /// Applies `change` to the live value of `key` (0 when missing) in one write transaction,
    /// if `allowed` accepts the result.
    async fn update(&self, key: &str, ttl: Duration, change: impl FnOnce(i64) -> Option<i64> + Send) -> Result<bool> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db_error("begin a counter update", e))?;
        let t = now();
        let current = Self::current(&mut tx, key, t).await?.unwrap_or(0);
        let Some(next) = change(current) else {
            return Ok(false);
        };
        Self::set(&mut tx, key, next, t + ms(ttl)).await?;
        tx.commit().await.map_err(|e| db_error("commit a counter update", e))?;
        Ok(true)
    }
}

#[async_trait]
impl StateBackend for SqliteState {
    async fn add(&self, key: &str, value: i64, ttl: Duration) -> Result<bool> {
        let t = now();
        let changed = sqlx::query(
            "INSERT INTO troupe_state (key, value, expires_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
             WHERE troupe_state.expires_at <= ?4",
        )
        .bind(key)
        .bind(value)
        .bind(t + ms(ttl))
        .bind(t)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("add a counter", e))?
        .rows_affected();
        Ok(changed == 1)
    }

    async fn incr(&self, key: &str, amount: i64, maximum: i64, ttl: Duration) -> Result<bool> {
        self.update(key, ttl, |v| Some(v.saturating_add(amount)).filter(|n| *n <= maximum))
            .await
    }

    async fn decr(&self, key: &str, amount: i64, minimum: i64, ttl: Duration) -> Result<bool> {
        self.update(key, ttl, |v| Some(v.saturating_sub(amount)).filter(|n| *n >= minimum))
            .await
    }

    async fn incr_and_sum(&self, key: &str, keys: &[String], amount: i64, maximum: i64, ttl: Duration) -> Result<bool> {
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
        if sum.saturating_add(amount) > maximum {
            return Ok(false);
        }
        let current = Self::current(&mut tx, key, t).await?.unwrap_or(0);
        Self::set(&mut tx, key, current.saturating_add(amount), t + ms(ttl)).await?;
        tx.commit().await.map_err(|e| db_error("commit a counter update", e))?;
        Ok(true)
    }

    async fn get(&self, key: &str) -> Result<Option<i64>> {
        let mut conn = self.pool.acquire().await.map_err(|e| db_error("read a counter", e))?;
        Self::current(&mut conn, key, now()).await
    }

    async fn wait(&self, key: &str, timeout: Duration) -> Result<bool> {
        let seen = poll_until(timeout, POLL, None, || async {
            let found = sqlx::query("SELECT 1 FROM troupe_events WHERE key = ?1 AND expires_at > ?2")
                .bind(key)
                .bind(now())
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
            "INSERT INTO troupe_events (key, expires_at) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(now() + ms(ttl))
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("write an event", e))?;
        Ok(())
    }
}
