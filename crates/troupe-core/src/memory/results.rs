use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::results::{ResultBackend, result_key};

/// In-memory results, with the same keys, expiry and blocking semantics as the others.
#[derive(Clone, Debug, Default)]
pub struct MemoryResults {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    values: Mutex<HashMap<String, (Value, Instant)>>,
    stored: Notify,
}

impl MemoryResults {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// This backend as a shared trait object.
    #[must_use]
    pub fn into_dyn(self) -> Arc<dyn ResultBackend> {
        Arc::new(self)
    }

    fn lookup(&self, key: &str) -> Result<Option<Value>> {
        let mut values = self
            .inner
            .values
            .lock()
            .map_err(|_| Error::backend("memory", ErrorKind::Other, "results lock poisoned"))?;
        match values.get(key) {
            Some((_, expires)) if *expires <= Instant::now() => {
                values.remove(key);
                Ok(None)
            }
            Some((v, _)) => Ok(Some(v.clone())),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl ResultBackend for MemoryResults {
    async fn store(&self, message: &Message, value: Value, ttl: Duration) -> Result<()> {
        let key = result_key(message);
        self.inner
            .values
            .lock()
            .map_err(|_| Error::backend("memory", ErrorKind::Other, "results lock poisoned"))?
            .insert(key, (value, Instant::now() + ttl));
        self.inner.stored.notify_waiters();
        Ok(())
    }

    async fn get(&self, message: &Message, timeout: Option<Duration>) -> Result<Value> {
        let key = result_key(message);
        let Some(timeout) = timeout else {
            return self
                .lookup(&key)?
                .ok_or_else(|| Error::ResultMissing(message.message_id.clone()));
        };
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.inner.stored.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = self.lookup(&key)? {
                return Ok(v);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::ResultTimeout(message.message_id.clone()));
            }
        }
    }
}
