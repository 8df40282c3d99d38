//! The state backend of a SQL database: bounded counters and events with TTLs, and the task
//! store (in `tasks.rs`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use troupe_core::support::poll_until;
use troupe_core::{Arrival, Result, StateBackend, TaskStore};

use crate::dialect::Store;

/// How often `wait` and `wait_cancels` poll for an event or a cancellation written by another
/// process (a `notify` or a request in the same process wakes them at once).
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// Atomic counters with TTLs, events and task records in SQL tables; the backend crates name
/// it (`SqliteState`, `PostgresState`). Cheap to clone.
pub struct SqlState<S: Store> {
    pub(crate) store: S,
    notified: Arc<Notify>,
    /// Wakes `wait_cancels` at a cancellation request made in this process.
    pub(crate) cancelled: Arc<Notify>,
}

impl<S: Store> Clone for SqlState<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            notified: Arc::clone(&self.notified),
            cancelled: Arc::clone(&self.cancelled),
        }
    }
}

impl<S: Store> std::fmt::Debug for SqlState<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlState")
            .field("backend", &S::BACKEND)
            .finish_non_exhaustive()
    }
}

impl<S: Store> SqlState<S> {
    /// State in the database of `pool`.
    #[must_use]
    pub fn from_pool(pool: S::Pool) -> Self {
        Self::from_store(S::from_pool(pool))
    }

    /// State over `store`, the statements of a broker's database with its settings
    /// ([`SqlBroker::store`](crate::SqlBroker::store)): the way to share a PostgreSQL
    /// broker's database behind a transaction pooler.
    #[must_use]
    pub fn from_store(store: S) -> Self {
        Self {
            store,
            notified: Arc::default(),
            cancelled: Arc::default(),
        }
    }

    /// Opens (and migrates) the database a URL names.
    ///
    /// # Errors
    /// As the backend crate's `open`.
    pub async fn connect(url: &str) -> Result<Self> {
        Ok(Self::from_store(S::open_url(url).await?))
    }

    /// This backend as a shared trait object.
    #[must_use]
    pub fn into_dyn(self) -> Arc<dyn StateBackend> {
        Arc::new(self)
    }
}

#[async_trait]
impl<S: Store> StateBackend for SqlState<S> {
    async fn add(&self, key: &str, value: i64, ttl: Duration) -> Result<bool> {
        self.store.add(key, value, ttl).await
    }

    async fn incr(&self, key: &str, amount: i64, maximum: i64, ttl: Duration) -> Result<bool> {
        self.store.bounded(key, amount, i64::MIN, maximum, ttl).await
    }

    async fn decr(&self, key: &str, amount: i64, minimum: i64, ttl: Duration) -> Result<bool> {
        self.store
            .bounded(key, amount.saturating_neg(), minimum, i64::MAX, ttl)
            .await
    }

    async fn incr_and_sum(&self, key: &str, keys: &[String], amount: i64, maximum: i64, ttl: Duration) -> Result<bool> {
        self.store.incr_and_sum(key, keys, amount, maximum, ttl).await
    }

    async fn get(&self, key: &str) -> Result<Option<i64>> {
        self.store.counter(key).await
    }

    async fn wait(&self, key: &str, timeout: Duration) -> Result<bool> {
        let seen = poll_until(timeout, POLL, Some(&self.notified), || async {
            Ok(self.store.event_seen(key).await?.then_some(()))
        })
        .await?;
        Ok(seen.is_some())
    }

    async fn notify(&self, key: &str, ttl: Duration) -> Result<()> {
        self.store.write_event(key, ttl).await?;
        self.notified.notify_waiters();
        Ok(())
    }

    async fn arrive(&self, key: &str, party: &str, outcome: &str, ttl: Duration) -> Result<Arrival> {
        let (counted, cleared, clearer) = self.store.arrive(key, party, outcome, ttl).await?;
        if counted && cleared {
            // Wake this process's waiters on the barrier's events at once.
            self.notified.notify_waiters();
        }
        Ok(Arrival::new(counted, cleared, clearer))
    }

    async fn arrivals(&self, key: &str) -> Result<Vec<(String, String)>> {
        self.store.arrivals(key).await
    }

    async fn coordination(&self, limit: usize) -> Result<troupe_core::Coordination> {
        let (slots, barriers) = self.store.coordination(limit).await?;
        let mut by_key: Vec<troupe_core::SlotKey> = Vec::new();
        for (key, holder) in slots {
            match by_key.last_mut() {
                Some(last) if last.key == key => last.holders.push(holder),
                _ => by_key.push(troupe_core::SlotKey::new(key, vec![holder])),
            }
        }
        let mut coordination = troupe_core::Coordination::default();
        coordination.slots = by_key
            .into_iter()
            .take(limit)
            .map(|s| troupe_core::SlotKey::new(s.key, s.holders))
            .collect();
        coordination.barriers = barriers
            .into_iter()
            .map(|(key, arrived, cleared)| {
                troupe_core::BarrierKey::new(key, u64::try_from(arrived).unwrap_or(0), cleared)
            })
            .collect();
        Ok(coordination)
    }

    async fn acquire_slot(&self, key: &str, holder: &str, limit: i64, lease: Duration) -> Result<bool> {
        self.store.acquire_slot(key, holder, limit, lease).await
    }

    async fn renew_slot(&self, key: &str, holder: &str, lease: Duration) -> Result<bool> {
        self.store.renew_slot(key, holder, lease).await
    }

    async fn release_slot(&self, key: &str, holder: &str, _lease: Duration) -> Result<()> {
        self.store.release_slot(key, holder).await
    }

    fn tasks(&self) -> Option<&dyn TaskStore> {
        Some(self)
    }
}
