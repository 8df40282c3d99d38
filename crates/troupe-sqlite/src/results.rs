//! SQLite results backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{Row, SqlitePool};
use troupe_core::support::poll_until;
use troupe_core::{Encoder, Error, JsonEncoder, Message, Result, ResultBackend, result_key};

use crate::db::{db_error, ms, now};

/// How often a blocking `get` polls for a result written by another process.
const POLL: Duration = Duration::from_millis(20);

/// Results in the `troupe_results` table, keyed as Dramatiq keys them, with TTLs.
#[derive(Clone, Debug)]
pub struct SqliteResults {
    pool: SqlitePool,
    encoder: Arc<dyn Encoder>,
    stores: Arc<AtomicU64>,
    stored: Arc<tokio::sync::Notify>,
}

impl SqliteResults {
    /// Results in the database of `pool` (from [`crate::open`] or
    /// [`SqliteBroker::pool`](crate::SqliteBroker::pool)).
    #[must_use]
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self {
            pool,
            encoder: Arc::new(JsonEncoder),
            stores: Arc::default(),
            stored: Arc::default(),
        }
    }

    /// Opens the database a `sqlite://PATH` URL names.
    ///
    /// # Errors
    /// As [`crate::open`].
    pub async fn connect(url: &str) -> Result<Self> {
        Ok(Self::from_pool(
            crate::open(&crate::SqliteOptions::from_url(url)?).await?,
        ))
    }

    /// This backend as a shared trait object.
    #[must_use]
    pub fn into_dyn(self) -> Arc<dyn ResultBackend> {
        Arc::new(self)
    }

    async fn lookup(&self, key: &str) -> Result<Option<Value>> {
        let row = sqlx::query("SELECT value FROM troupe_results WHERE key = ?1 AND expires_at > ?2")
            .bind(key)
            .bind(now())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error("read a result", e))?;
        match row {
            Some(row) => {
                let bytes: Vec<u8> = row.try_get(0).map_err(|e| db_error("read a result", e))?;
                Ok(Some(self.encoder.decode_value(&bytes)?))
            }
            None => Ok(None),
        }
    }
}

#[async_trait]
impl ResultBackend for SqliteResults {
    async fn store(&self, message: &Message, value: Value, ttl: Duration) -> Result<()> {
        let bytes = self.encoder.encode_value(&value)?;
        let t = now();
        sqlx::query(
            "INSERT INTO troupe_results (key, value, expires_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
        )
        .bind(result_key(message))
        .bind(bytes)
        .bind(t + ms(ttl))
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("store a result", e))?;
        self.stored.notify_waiters();
        // Expired results are purged every 1000 stores, in bounded batches.
        if self.stores.fetch_add(1, Ordering::Relaxed) % 1000 == 999 {
            sqlx::query(
                "DELETE FROM troupe_results WHERE key IN
                 (SELECT key FROM troupe_results WHERE expires_at <= ?1 LIMIT 5000)",
            )
            .bind(t)
            .execute(&self.pool)
            .await
            .map_err(|e| db_error("purge expired results", e))?;
        }
        Ok(())
    }

    async fn get(&self, message: &Message, timeout: Option<Duration>) -> Result<Value> {
        let key = result_key(message);
        let Some(timeout) = timeout else {
            return self
                .lookup(&key)
                .await?
                .ok_or_else(|| Error::ResultMissing(message.message_id.clone()));
        };
        poll_until(timeout, POLL, Some(&self.stored), || self.lookup(&key))
            .await?
            .ok_or_else(|| Error::ResultTimeout(message.message_id.clone()))
    }
}
