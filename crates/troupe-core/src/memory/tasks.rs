//! The in-memory task store behind [`MemoryState`](super::MemoryState).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::Result;
use crate::tasks::{
    CancelMode, TaskCounts, TaskFilter, TaskPage, TaskQuery, TaskRecord, TaskStatus, TaskStore, TaskUpdate, applies,
};

#[derive(Debug, Default)]
pub(super) struct MemoryTasks {
    state: Mutex<Tasks>,
    cancelled: Notify,
}

#[derive(Debug, Default)]
struct Tasks {
    records: HashMap<String, Entry>,
    /// (expiry, message id), oldest first: what `expire_tasks` walks.
    expiry: BTreeSet<(Instant, String)>,
    cancels: HashMap<String, (CancelMode, Instant)>,
    unique: HashMap<String, (String, Instant)>,
}

#[derive(Debug)]
struct Entry {
    record: TaskRecord,
    version: u64,
    expires: Instant,
}

impl Tasks {
    fn touch(&mut self, id: &str, retention: Duration) {
        let expires = Instant::now() + retention;
        if let Some(entry) = self.records.get_mut(id) {
            self.expiry.remove(&(entry.expires, id.to_owned()));
            entry.expires = expires;
            self.expiry.insert((expires, id.to_owned()));
        }
    }

    fn live(&self, id: &str) -> Option<&Entry> {
        self.records.get(id).filter(|e| e.expires > Instant::now())
    }
}

impl MemoryTasks {
    /// Every operation leaves the maps whole, so a poisoned lock keeps its data.
    fn state(&self) -> MutexGuard<'_, Tasks> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl TaskStore for MemoryTasks {
    async fn record(&self, update: &TaskUpdate, retention: Duration) -> Result<bool> {
        let mut state = self.state();
        let existing = state.live(&update.message_id).map(|e| (&e.record, e.version));
        if !applies(existing, update) {
            return Ok(false);
        }
        match state.records.get_mut(&update.message_id) {
            Some(entry) if entry.expires > Instant::now() => {
                update.apply_to(&mut entry.record);
                entry.version = update.version;
            }
            _ => {
                let entry = Entry {
                    record: update.to_record(),
                    version: update.version,
                    expires: Instant::now(),
                };
                if let Some(old) = state.records.insert(update.message_id.clone(), entry) {
                    state.expiry.remove(&(old.expires, update.message_id.clone()));
                }
            }
        }
        state.touch(&update.message_id, retention);
        Ok(true)
    }

    async fn set_progress(&self, message_id: &str, progress: &Value, retention: Duration) -> Result<bool> {
        let mut state = self.state();
        let now = crate::now_ms();
        match state.records.get_mut(message_id) {
            Some(entry) if entry.expires > Instant::now() => {
                entry.record.progress = Some(progress.clone());
                entry.record.updated_at = now;
            }
            _ => return Ok(false),
        }
        state.touch(message_id, retention);
        Ok(true)
    }

    async fn task(&self, message_id: &str) -> Result<Option<TaskRecord>> {
        Ok(self.state().live(message_id).map(|e| e.record.clone()))
    }

    async fn tasks(&self, query: &TaskQuery) -> Result<TaskPage> {
        let state = self.state();
        let now = Instant::now();
        let mut tasks: Vec<TaskRecord> = state
            .records
            .values()
            .filter(|e| e.expires > now && query.filter.matches(&e.record))
            .filter(|e| query.after.as_ref().is_none_or(|c| c.precedes(&e.record)))
            .map(|e| e.record.clone())
            .collect();
        tasks.sort_by(|a, b| (b.enqueued_at, &b.message_id).cmp(&(a.enqueued_at, &a.message_id)));
        tasks.truncate(query.page_size());
        Ok(TaskPage::new(tasks, query.page_size()))
    }

    async fn task_counts(&self, filter: &TaskFilter) -> Result<TaskCounts> {
        let scope = TaskFilter {
            actor: filter.actor.clone(),
            queue: filter.queue.clone(),
            ..TaskFilter::default()
        };
        let state = self.state();
        let now = Instant::now();
        let mut counts = TaskCounts::default();
        for entry in state.records.values().filter(|e| e.expires > now) {
            if scope.matches(&entry.record) {
                counts.add(&entry.record);
            }
        }
        Ok(counts)
    }

    async fn delete_task(&self, message_id: &str) -> Result<bool> {
        let mut state = self.state();
        match state.records.remove(message_id) {
            Some(entry) => {
                state.expiry.remove(&(entry.expires, message_id.to_owned()));
                Ok(entry.expires > Instant::now())
            }
            None => Ok(false),
        }
    }

    async fn expire_tasks(&self, limit: usize) -> Result<u64> {
        let mut state = self.state();
        let now = Instant::now();
        let due: Vec<(Instant, String)> = state
            .expiry
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(limit)
            .cloned()
            .collect();
        for key in &due {
            state.expiry.remove(key);
            state.records.remove(&key.1);
        }
        state.cancels.retain(|_, (_, at)| *at > now);
        state.unique.retain(|_, (_, at)| *at > now);
        Ok(u64::try_from(due.len()).unwrap_or(u64::MAX))
    }

    async fn mark_cancelled(&self, message_id: &str, retention: Duration) -> Result<Option<TaskStatus>> {
        let mut state = self.state();
        let now = Instant::now();
        let Some(entry) = state.records.get_mut(message_id).filter(|e| e.expires > now) else {
            return Ok(None);
        };
        let before = entry.record.status;
        if before.is_pending() {
            let at = crate::now_ms();
            entry.record.status = TaskStatus::Cancelled;
            entry.record.updated_at = at;
            entry.record.finished_at = Some(at);
            entry.record.eta = None;
            state.touch(message_id, retention);
        }
        Ok(Some(before))
    }

    async fn request_cancel(&self, message_id: &str, mode: CancelMode, ttl: Duration) -> Result<()> {
        self.state()
            .cancels
            .insert(message_id.to_owned(), (mode, Instant::now() + ttl));
        self.cancelled.notify_waiters();
        Ok(())
    }

    async fn cancel_requested(&self, message_id: &str) -> Result<Option<CancelMode>> {
        let state = self.state();
        Ok(state
            .cancels
            .get(message_id)
            .filter(|(_, at)| *at > Instant::now())
            .map(|(mode, _)| *mode))
    }

    async fn wait_cancels(&self, message_ids: &[String], timeout: Duration) -> Result<Vec<(String, CancelMode)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.cancelled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let found: Vec<(String, CancelMode)> = {
                let state = self.state();
                let now = Instant::now();
                message_ids
                    .iter()
                    .filter_map(|id| {
                        state
                            .cancels
                            .get(id)
                            .filter(|(_, at)| *at > now)
                            .map(|(mode, _)| (id.clone(), *mode))
                    })
                    .collect()
            };
            if !found.is_empty() || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(found);
            }
        }
    }

    async fn claim_unique(&self, key: &str, message_id: &str, ttl: Duration) -> Result<Option<String>> {
        let mut state = self.state();
        let now = Instant::now();
        if let Some((holder, _)) = state.unique.get(key).filter(|(_, at)| *at > now)
            && holder != message_id
        {
            return Ok(Some(holder.clone()));
        }
        state.unique.insert(key.to_owned(), (message_id.to_owned(), now + ttl));
        Ok(None)
    }

    async fn release_unique(&self, key: &str, message_id: &str) -> Result<()> {
        let mut state = self.state();
        if state.unique.get(key).is_some_and(|(holder, _)| holder == message_id) {
            state.unique.remove(key);
        }
        Ok(())
    }
}
