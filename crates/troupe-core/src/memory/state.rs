use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::state::{Arrival, BarrierKey, Coordination, SlotKey, StateBackend};

/// The party name under which a barrier's arrivals keep the party that cleared it (no party's
/// id is empty).
const CLEARER: &str = "";

/// The parties that arrived at a barrier (with their outcomes), and when they expire.
type Parties = (HashMap<String, String>, Instant);

/// In-memory [`StateBackend`].
#[derive(Clone, Debug, Default)]
pub struct MemoryState {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    counters: Mutex<HashMap<String, (i64, Instant)>>,
    events: Mutex<HashMap<String, Instant>>,
    /// Barrier arrivals per key: each party's outcome, and when the key expires.
    arrivals: Mutex<HashMap<String, Parties>>,
    /// Slot holders per key, with their lease's end.
    slots: Mutex<HashMap<String, HashMap<String, Instant>>>,
    notify: Notify,
    tasks: super::tasks::MemoryTasks,
}

impl MemoryState {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn counters(&self) -> Result<MutexGuard<'_, HashMap<String, (i64, Instant)>>> {
        let mut map = self
            .inner
            .counters
            .lock()
            .map_err(|_| Error::backend("memory", ErrorKind::Other, "state lock poisoned"))?;
        let now = Instant::now();
        map.retain(|_, (_, expires)| *expires > now);
        Ok(map)
    }

    /// The live holders of `key` (expired leases dropped), under the slots lock.
    fn with_slots<T>(&self, key: &str, f: impl FnOnce(&mut HashMap<String, Instant>) -> T) -> Result<T> {
        let mut slots = self
            .inner
            .slots
            .lock()
            .map_err(|_| Error::backend("memory", ErrorKind::Other, "state lock poisoned"))?;
        let now = Instant::now();
        let holders = slots.entry(key.to_owned()).or_default();
        holders.retain(|_, until| *until > now);
        let out = f(holders);
        if holders.is_empty() {
            slots.remove(key);
        }
        Ok(out)
    }

    fn event_set(&self, key: &str) -> bool {
        self.inner
            .events
            .lock()
            .map(|e| e.get(key).is_some_and(|exp| *exp > Instant::now()))
            .unwrap_or(false)
    }
}

#[async_trait]
impl StateBackend for MemoryState {
    async fn add(&self, key: &str, value: i64, ttl: Duration) -> Result<bool> {
        let mut map = self.counters()?;
        if map.contains_key(key) {
            return Ok(false);
        }
        map.insert(key.to_owned(), (value, Instant::now() + ttl));
        Ok(true)
    }

    async fn incr(&self, key: &str, amount: i64, maximum: i64, ttl: Duration) -> Result<bool> {
        let mut map = self.counters()?;
        let current = map.get(key).map_or(0, |(v, _)| *v);
        let next = current.saturating_add(amount);
        if next > maximum {
            return Ok(false);
        }
        map.insert(key.to_owned(), (next, Instant::now() + ttl));
        Ok(true)
    }

    async fn decr(&self, key: &str, amount: i64, minimum: i64, ttl: Duration) -> Result<bool> {
        let mut map = self.counters()?;
        let current = map.get(key).map_or(0, |(v, _)| *v);
        let next = current.saturating_sub(amount);
        if next < minimum {
            return Ok(false);
        }
        map.insert(key.to_owned(), (next, Instant::now() + ttl));
        Ok(true)
    }

    async fn incr_and_sum(&self, key: &str, keys: &[String], amount: i64, maximum: i64, ttl: Duration) -> Result<bool> {
        let mut map = self.counters()?;
        let sum: i64 = keys.iter().filter_map(|k| map.get(k).map(|(v, _)| *v)).sum();
        if sum.saturating_add(amount) > maximum {
            return Ok(false);
        }
        let current = map.get(key).map_or(0, |(v, _)| *v);
        map.insert(key.to_owned(), (current + amount, Instant::now() + ttl));
        Ok(true)
    }

    async fn get(&self, key: &str) -> Result<Option<i64>> {
        Ok(self.counters()?.get(key).map(|(v, _)| *v))
    }

    async fn wait(&self, key: &str, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.event_set(key) {
                return Ok(true);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(self.event_set(key));
            }
        }
    }

    async fn notify(&self, key: &str, ttl: Duration) -> Result<()> {
        self.inner
            .events
            .lock()
            .map_err(|_| Error::backend("memory", ErrorKind::Other, "state lock poisoned"))?
            .insert(key.to_owned(), Instant::now() + ttl);
        self.inner.notify.notify_waiters();
        Ok(())
    }

    async fn arrive(&self, key: &str, party: &str, outcome: &str, ttl: Duration) -> Result<Arrival> {
        let now = Instant::now();
        let lost = || Error::backend("memory", ErrorKind::Other, "state lock poisoned");
        // Lock order: arrivals, then counters, then events (as nowhere else takes two).
        let mut arrivals = self.inner.arrivals.lock().map_err(|_| lost())?;
        arrivals.retain(|_, (_, expires)| *expires > now);
        let (parties, expires) = arrivals
            .entry(key.to_owned())
            .or_insert_with(|| (HashMap::new(), now + ttl));
        if parties.contains_key(party) {
            let clearer = parties.get(CLEARER).is_some_and(|p| p == party);
            return Ok(Arrival::new(false, self.event_set(&format!("{key}@events")), clearer));
        }
        parties.insert(party.to_owned(), outcome.to_owned());
        *expires = now + ttl;
        let mut counters = self.counters()?;
        let left = counters.get(key).map_or(0, |(v, _)| *v) - 1;
        if left >= 1 {
            counters.insert(key.to_owned(), (left, now + ttl));
            return Ok(Arrival::new(true, false, false));
        }
        drop(counters);
        parties.insert(CLEARER.to_owned(), party.to_owned());
        self.inner
            .events
            .lock()
            .map_err(|_| lost())?
            .insert(format!("{key}@events"), now + ttl);
        self.inner.notify.notify_waiters();
        Ok(Arrival::new(true, true, true))
    }

    async fn coordination(&self, limit: usize) -> Result<Coordination> {
        let now = Instant::now();
        let lost = || Error::backend("memory", ErrorKind::Other, "a state lock was poisoned");
        let mut slots: Vec<SlotKey> = {
            let slots = self.inner.slots.lock().map_err(|_| lost())?;
            slots
                .iter()
                .map(|(key, holders)| {
                    let live = holders
                        .iter()
                        .filter(|(_, until)| **until > now)
                        .map(|(h, _)| h.clone());
                    SlotKey::new(key.clone(), live.collect())
                })
                .filter(|s| !s.holders.is_empty())
                .collect()
        };
        slots.sort_by(|a, b| a.key.cmp(&b.key));
        slots.truncate(limit);
        let mut barriers: Vec<BarrierKey> = {
            let arrivals = self.inner.arrivals.lock().map_err(|_| lost())?;
            arrivals
                .iter()
                .filter(|(_, (_, expires))| *expires > now)
                .map(|(key, (parties, _))| {
                    let arrived = parties.keys().filter(|p| p.as_str() != CLEARER).count() as u64;
                    BarrierKey::new(key.clone(), arrived, parties.contains_key(CLEARER))
                })
                .collect()
        };
        barriers.sort_by(|a, b| a.key.cmp(&b.key));
        barriers.truncate(limit);
        Ok(Coordination { slots, barriers })
    }

    async fn arrivals(&self, key: &str) -> Result<Vec<(String, String)>> {
        let arrivals = self
            .inner
            .arrivals
            .lock()
            .map_err(|_| Error::backend("memory", ErrorKind::Other, "state lock poisoned"))?;
        Ok(arrivals
            .get(key)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(parties, _)| {
                parties
                    .iter()
                    .filter(|(p, _)| p.as_str() != CLEARER)
                    .map(|(p, o)| (p.clone(), o.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn acquire_slot(&self, key: &str, holder: &str, limit: i64, lease: Duration) -> Result<bool> {
        let until = Instant::now() + lease;
        self.with_slots(key, |holders| {
            let taken = holders.contains_key(holder) || i64::try_from(holders.len()).unwrap_or(i64::MAX) < limit;
            if taken {
                holders.insert(holder.to_owned(), until);
            }
            taken
        })
    }

    async fn renew_slot(&self, key: &str, holder: &str, lease: Duration) -> Result<bool> {
        let until = Instant::now() + lease;
        self.with_slots(key, |holders| holders.get_mut(holder).map(|h| *h = until).is_some())
    }

    async fn release_slot(&self, key: &str, holder: &str, _lease: Duration) -> Result<()> {
        self.with_slots(key, |holders| {
            holders.remove(holder);
        })
    }

    fn tasks(&self) -> Option<&dyn crate::tasks::TaskStore> {
        Some(&self.inner.tasks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counters_respect_bounds_and_ttl() {
        let s = MemoryState::new();
        let ttl = Duration::from_secs(60);
        assert!(s.add("k", 1, ttl).await.unwrap());
        assert!(!s.add("k", 5, ttl).await.unwrap());
        assert!(s.incr("k", 1, 2, ttl).await.unwrap());
        assert!(!s.incr("k", 1, 2, ttl).await.unwrap());
        assert_eq!(s.get("k").await.unwrap(), Some(2));
        assert!(s.decr("k", 2, 0, ttl).await.unwrap());
        assert!(!s.decr("k", 1, 0, ttl).await.unwrap());
        assert!(s.add("short", 1, Duration::from_millis(20)).await.unwrap());
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(s.get("short").await.unwrap(), None);
    }

    #[tokio::test]
    async fn sums_windows_and_notifies() {
        let s = MemoryState::new();
        let ttl = Duration::from_secs(60);
        let keys = vec!["w1".to_owned(), "w2".to_owned()];
        assert!(s.incr("w2", 2, 10, ttl).await.unwrap());
        assert!(s.incr_and_sum("w1", &keys, 1, 3, ttl).await.unwrap());
        assert!(!s.incr_and_sum("w1", &keys, 1, 3, ttl).await.unwrap());
        assert!(!s.wait("e", Duration::from_millis(20)).await.unwrap());
        let s2 = s.clone();
        let waiter = tokio::spawn(async move { s2.wait("e", Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        s.notify("e", ttl).await.unwrap();
        assert!(waiter.await.unwrap().unwrap());
    }
}
