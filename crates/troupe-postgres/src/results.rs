//! PostgreSQL results backend.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{PgPool, Row};
use troupe_core::support::poll_until;
use troupe_core::{Encoder, Error, JsonEncoder, Message, Result, ResultBackend, result_key};

use crate::db::{PostgresOptions, db_error, ms};

/// How often a blocking `get` polls.
const POLL: Duration = Duration::from_millis(20);

/// Results in the `results` table of Troupe's schema, keyed as Dramatiq keys them, with TTLs
/// (expired rows are deleted in batches by the broker's maintenance and on read).
#[derive(Clone, Debug)]
pub struct PostgresResults {
    pool: PgPool,
    encoder: Arc<dyn Encoder>,
}

impl PostgresResults {
    /// Results in the database of `pool` (from [`crate::PostgresBroker::pool`] or
    /// [`crate::open`]).
    #[must_use]
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            encoder: Arc::new(JsonEncoder),
        }
    }

    /// Connects to the database a `postgres://` URL names (and migrates the schema).
    ///
    /// # Errors
    /// As [`crate::open`].
    pub async fn connect(url: &str) -> Result<Self> {
        Ok(Self::from_pool(crate::open(&PostgresOptions::from_url(url)?).await?))
    }

    /// This backend as a shared trait object.
    #[must_use]
    pub fn into_dyn(self) -> Arc<dyn ResultBackend> {
        Arc::new(self)
    }

    async fn lookup(&self, key: &str) -> Result<Option<Value>> {
        let row = sqlx::query("SELECT value FROM results WHERE key = $1 AND expires_at > now()")
            .bind(key)
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
impl ResultBackend for PostgresResults {
    async fn store(&self, message: &Message, value: Value, ttl: Duration) -> Result<()> {
        sqlx::query(
            "INSERT INTO results (key, value, expires_at) VALUES ($1, $2, now() + $3 * interval '1 millisecond')
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
        )
        .bind(result_key(message))
        .bind(self.encoder.encode_value(&value)?)
        .bind(ms(ttl))
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("store a result", e))?;
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
        poll_until(timeout, POLL, None, || self.lookup(&key))
            .await?
            .ok_or_else(|| Error::ResultTimeout(message.message_id.clone()))
    }
}
