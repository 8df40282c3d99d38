//! Redis results backend: Dramatiq's keys (md5 of `dramatiq-results:<q>:<actor>:<id>`) and
//! value layout (a one-element list with a TTL), so Python's `message.get_result()` reads a
//! Troupe actor's result and the reverse.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use troupe_core::{Encoder, Error, JsonEncoder, Message, Result, ResultBackend, result_key};

use crate::conn::{BlockingPool, RedisConnection, RedisOptions, ms, redis_error};

/// Results in Redis, as Dramatiq's `RedisBackend` stores them.
#[derive(Clone)]
pub struct RedisResults {
    options: RedisOptions,
    conn: RedisConnection,
    encoder: Arc<dyn Encoder>,
    blocking: BlockingPool,
}

impl std::fmt::Debug for RedisResults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisResults")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl RedisResults {
    /// Connects to the server a `redis://` URL names.
    ///
    /// # Errors
    /// A bad URL or an unreachable server.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(RedisOptions::from_url(url)?).await
    }

    /// Connects with these options.
    ///
    /// # Errors
    /// An unreachable server.
    pub async fn open(options: RedisOptions) -> Result<Self> {
        let conn = options.connection().await?;
        Ok(Self {
            options,
            conn,
            encoder: Arc::new(JsonEncoder),
            blocking: BlockingPool::default(),
        })
    }

    /// This backend as a shared trait object.
    #[must_use]
    pub fn into_dyn(self) -> Arc<dyn ResultBackend> {
        Arc::new(self)
    }
}

#[async_trait]
impl ResultBackend for RedisResults {
    async fn store(&self, message: &Message, value: Value, ttl: Duration) -> Result<()> {
        let key = self.options.shared_key(&result_key(message)).into_owned();
        let bytes = self.encoder.encode_value(&value)?;
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .del(&key)
            .ignore()
            .lpush(&key, bytes)
            .ignore()
            .pexpire(&key, i64::try_from(ms(ttl)).unwrap_or(i64::MAX))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_error("store a result", e))
    }

    async fn get(&self, message: &Message, timeout: Option<Duration>) -> Result<Value> {
        let key = self.options.shared_key(&result_key(message)).into_owned();
        let bytes: Option<Vec<u8>> = match timeout {
            None => {
                let mut conn = self.conn.clone();
                redis::cmd("LINDEX")
                    .arg(&key)
                    .arg(0)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| redis_error("read a result", e))?
            }
            Some(timeout) => {
                self.blocking
                    .wait_on_list(&self.options, &key, timeout, "wait for a result")
                    .await?
            }
        };
        match bytes {
            Some(b) => self.encoder.decode_value(&b),
            None if timeout.is_some() => Err(Error::ResultTimeout(message.message_id.clone())),
            None => Err(Error::ResultMissing(message.message_id.clone())),
        }
    }
}
