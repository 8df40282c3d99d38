//! The results backend of a SQL database.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::Notify;
use troupe_core::support::poll_until;
use troupe_core::{Encoder, Error, JsonEncoder, Message, Result, ResultBackend, result_key};

use crate::dialect::Store;

/// How often a blocking `get` polls for a result written by another process (a store in the
/// same process wakes it at once).
const POLL: Duration = Duration::from_millis(20);

/// Expired results are also deleted every this many stores (one bounded batch), so a
/// database used without a consuming broker does not keep them.
const PURGE_EVERY: u64 = 1000;

/// Results in a SQL table, keyed as Dramatiq keys them, with TTLs; the backend crates name it
/// (`SqliteResults`, `PostgresResults`). Cheap to clone.
pub struct SqlResults<S: Store> {
    store: S,
    encoder: Arc<dyn Encoder>,
    stores: Arc<AtomicU64>,
    stored: Arc<Notify>,
}

impl<S: Store> Clone for SqlResults<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            encoder: Arc::clone(&self.encoder),
            stores: Arc::clone(&self.stores),
            stored: Arc::clone(&self.stored),
        }
    }
}

impl<S: Store> std::fmt::Debug for SqlResults<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlResults")
            .field("backend", &S::BACKEND)
            .finish_non_exhaustive()
    }
}

impl<S: Store> SqlResults<S> {
    /// Results in the database of `pool` (the broker's `pool()`, or the backend crate's
    /// `open`).
    #[must_use]
    pub fn from_pool(pool: S::Pool) -> Self {
        Self::from_store(S::from_pool(pool))
    }

    /// Results over `store`, the statements of a broker's database with its settings
    /// ([`SqlBroker::store`](crate::SqlBroker::store)): the way to share a PostgreSQL
    /// broker's database behind a transaction pooler.
    #[must_use]
    pub fn from_store(store: S) -> Self {
        Self {
            store,
            encoder: Arc::new(JsonEncoder),
            stores: Arc::default(),
            stored: Arc::default(),
        }
    }

    /// Opens (and migrates) the database a URL names.
    ///
    /// # Errors
    /// As the backend crate's `open`.
    pub async fn connect(url: &str) -> Result<Self> {
        Ok(Self::from_store(S::open_url(url).await?))
    }

    /// The same backend encoding values with another encoder.
    #[must_use]
    pub fn with_encoder(self, encoder: Arc<dyn Encoder>) -> Self {
        Self { encoder, ..self }
    }

    /// This backend as a shared trait object.
    #[must_use]
    pub fn into_dyn(self) -> Arc<dyn ResultBackend> {
        Arc::new(self)
    }

    async fn lookup(&self, key: &str) -> Result<Option<Value>> {
        match self.store.read_result(key).await? {
            Some(bytes) => Ok(Some(self.encoder.decode_value(&bytes)?)),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl<S: Store> ResultBackend for SqlResults<S> {
    async fn store(&self, message: &Message, value: Value, ttl: Duration) -> Result<()> {
        let bytes = self.encoder.encode_value(&value)?;
        self.store.write_result(&result_key(message), bytes, ttl).await?;
        self.stored.notify_waiters();
        if self.stores.fetch_add(1, Ordering::Relaxed) % PURGE_EVERY == PURGE_EVERY - 1 {
            self.store.expire_results().await?;
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
