//! The task store of a SQL database (design §4b): task records, cancellation requests and
//! unique keys in three tables, written by the statements a backend's [`Store`] supplies.
//!
//! The shared code here turns [`TaskUpdate`]s into rows to bind ([`TaskWrite`]), rows read
//! back into [`TaskRecord`]s ([`TaskRow`]), and a [`TaskQuery`] into the conditions of a page
//! ([`TaskWhere`]); the backend supplies the statements, each atomic on its own. A record whose
//! retention has passed counts as absent everywhere, and an update over it starts it afresh.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use troupe_core::support::poll_until;
use troupe_core::tasks::{TaskCursor, TaskFilter};
use troupe_core::{
    CancelMode, Error, ErrorKind, Result, TaskCounts, TaskPage, TaskQuery, TaskRecord, TaskStatus, TaskStore,
    TaskUpdate,
};

use crate::dialect::Store;
use crate::state::{POLL, SqlState};

/// A [`TaskUpdate`] as the values an upsert binds: the times the rules of
/// [`TaskUpdate::apply_to`] set (`started_at` only when an attempt starts, `finished_at` only
/// at the end, the error type only with an error) are worked out here; `None` keeps the
/// record's value, except for `eta`, which is always replaced.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TaskWrite<'a> {
    /// The message id.
    pub message_id: &'a str,
    /// Its actor (kept from the first write while the record lives).
    pub actor: &'a str,
    /// Its queue (kept from the first write while the record lives).
    pub queue: &'a str,
    /// The new status's name.
    pub status: &'static str,
    /// The update's version.
    pub version: i64,
    /// When the change happened (ms since the epoch): `updated_at`, and `enqueued_at` of a new
    /// record.
    pub at: i64,
    /// `at` when an attempt starts.
    pub started_at: Option<i64>,
    /// `at` when the message's life ends.
    pub finished_at: Option<i64>,
    /// The eta (replaces the record's, cleared when `None`).
    pub eta: Option<i64>,
    /// Attempts started so far.
    pub attempts: i64,
    /// The error's type, only when there is an error.
    pub error_type: Option<&'a str>,
    /// The error's text.
    pub error: Option<&'a str>,
    /// The worker.
    pub worker: Option<&'a str>,
    /// The arguments, as JSON text.
    pub args: Option<String>,
}

impl<'a> TaskWrite<'a> {
    /// The values `update` writes.
    ///
    /// # Errors
    /// [`Error::Encode`] if the arguments cannot be written as JSON.
    pub fn new(update: &'a TaskUpdate) -> Result<Self> {
        let at = int(update.at);
        Ok(Self {
            message_id: &update.message_id,
            actor: &update.actor,
            queue: &update.queue,
            status: update.status.as_str(),
            version: int(update.version),
            at,
            started_at: update.started().map(int),
            finished_at: update.status.is_final().then_some(at),
            eta: update.eta.map(int),
            attempts: int(update.attempts),
            error_type: update.error.as_ref().and(update.error_type.as_deref()),
            error: update.error.as_deref(),
            worker: update.worker.as_deref(),
            args: update.args.as_ref().map(json_text).transpose()?,
        })
    }
}

/// Whether every write is to a different record: then a batch can be one statement (two
/// writes to one record must apply in turn, each seeing the one before).
#[must_use]
pub fn distinct_records(writes: &[TaskWrite<'_>]) -> bool {
    let ids: std::collections::HashSet<&str> = writes.iter().map(|w| w.message_id).collect();
    ids.len() == writes.len()
}

/// A task's columns as a backend reads them (times in ms since the epoch, JSON as text).
#[derive(Clone, Debug)]
pub struct TaskRow {
    /// The message id.
    pub message_id: String,
    /// Its actor.
    pub actor: String,
    /// Its queue.
    pub queue: String,
    /// The status's name.
    pub status: String,
    /// When it was first recorded.
    pub enqueued_at: i64,
    /// When its latest attempt started.
    pub started_at: Option<i64>,
    /// When it ended.
    pub finished_at: Option<i64>,
    /// When it last changed.
    pub updated_at: i64,
    /// When it is due.
    pub eta: Option<i64>,
    /// Attempts started.
    pub attempts: i64,
    /// The last error's type.
    pub error_type: Option<String>,
    /// The last error's text.
    pub error: Option<String>,
    /// The worker of the latest attempt.
    pub worker: Option<String>,
    /// The latest progress, as JSON text.
    pub progress: Option<String>,
    /// The arguments, as JSON text.
    pub args: Option<String>,
}

impl TaskRow {
    /// The record this row holds.
    ///
    /// # Errors
    /// A serialization error naming the column when the row holds an unknown status or JSON
    /// that does not parse.
    pub fn into_record<S: Store>(self) -> Result<TaskRecord> {
        let status = parse_status::<S>(&self.status)?;
        let progress = self.progress.as_deref().map(parse_json::<S>).transpose()?;
        let args = self.args.as_deref().map(parse_json::<S>).transpose()?;
        // `TaskRecord` is non-exhaustive: start from a fresh record and fill every field.
        let mut record = TaskUpdate::new(self.message_id, self.actor, self.queue, status, 0).to_record();
        record.enqueued_at = uint(self.enqueued_at);
        record.started_at = self.started_at.map(uint);
        record.finished_at = self.finished_at.map(uint);
        record.updated_at = uint(self.updated_at);
        record.eta = self.eta.map(uint);
        record.attempts = uint(self.attempts);
        record.error_type = self.error_type;
        record.error = self.error;
        record.worker = self.worker;
        record.progress = progress;
        record.args = args;
        Ok(record)
    }
}

/// A value bound to a page query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SqlArg {
    /// A text value.
    Text(String),
    /// An integer.
    Int(i64),
}

/// The conditions a filter and a cursor add to a `WHERE` clause, each ` AND …` with bound
/// placeholders only (never a caller's text in the SQL), and the values to bind in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskWhere {
    /// ` AND status = $2 AND …` (empty without conditions).
    pub sql: String,
    /// The values of the placeholders, in order.
    pub args: Vec<SqlArg>,
}

impl TaskWhere {
    /// The conditions of `filter` (every field) and of `after` (the rows after the cursor,
    /// newest first), numbering placeholders from `first` with `mark` (`$N` or `?N`).
    #[must_use]
    pub fn new(filter: &TaskFilter, after: Option<&TaskCursor>, first: usize, mark: fn(usize) -> String) -> Self {
        let mut w = Self::default();
        let push = |w: &mut Self, condition: &str, arg: SqlArg| {
            let n = first + w.args.len();
            w.sql.push_str(&format!(" AND {condition} {}", mark(n)));
            w.args.push(arg);
        };
        if let Some(status) = filter.status {
            push(&mut w, "status =", SqlArg::Text(status.as_str().to_owned()));
        }
        if let Some(actor) = &filter.actor {
            push(&mut w, "actor =", SqlArg::Text(actor.clone()));
        }
        if let Some(queue) = &filter.queue {
            push(&mut w, "queue =", SqlArg::Text(queue.clone()));
        }
        if let Some(since) = filter.since {
            push(&mut w, "enqueued_at >=", SqlArg::Int(int(since)));
        }
        if let Some(until) = filter.until {
            push(&mut w, "enqueued_at <", SqlArg::Int(int(until)));
        }
        if let Some(cursor) = after {
            // A row value: both databases search the index's range with it.
            let (a, b) = (first + w.args.len(), first + w.args.len() + 1);
            w.sql
                .push_str(&format!(" AND (enqueued_at, message_id) < ({}, {})", mark(a), mark(b)));
            w.args.push(SqlArg::Int(int(cursor.enqueued_at)));
            w.args.push(SqlArg::Text(cursor.message_id.clone()));
        }
        w
    }

    /// The number of the next placeholder after these, when they started at `first`.
    #[must_use]
    pub fn next(&self, first: usize) -> usize {
        first + self.args.len()
    }
}

/// One group of a count: status, actor, queue and how many live records have them.
pub type TaskCountRow = (String, String, String, i64);

/// A `u64` (times, versions, counts) as SQL's signed 64-bit integer, saturating.
#[must_use]
pub fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn uint(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn json_text(value: &Value) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Encode(format!("task JSON: {e}")))
}

fn parse_json<S: Store>(text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| {
        Error::backend(
            S::BACKEND,
            ErrorKind::Serialization,
            format!("a task record holds JSON that does not parse: {e}"),
        )
    })
}

fn parse_status<S: Store>(name: &str) -> Result<TaskStatus> {
    name.parse().map_err(|_| {
        Error::backend(
            S::BACKEND,
            ErrorKind::Serialization,
            format!("a task record holds the unknown status {name:?} (written by a newer Troupe?)"),
        )
    })
}

fn parse_mode<S: Store>(name: &str) -> Result<CancelMode> {
    match name {
        "pending" => Ok(CancelMode::Pending),
        "abort" => Ok(CancelMode::Abort),
        _ => Err(Error::backend(
            S::BACKEND,
            ErrorKind::Serialization,
            format!("a cancellation request holds the unknown mode {name:?} (written by a newer Troupe?)"),
        )),
    }
}

#[async_trait]
impl<S: Store> TaskStore for SqlState<S> {
    async fn record(&self, update: &TaskUpdate, retention: Duration) -> Result<bool> {
        let applied = self.store.record_tasks(&[TaskWrite::new(update)?], retention).await?;
        Ok(applied.first().copied().unwrap_or(false))
    }

    async fn record_many(&self, updates: &[TaskUpdate], retention: Duration) -> Result<Vec<bool>> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        // One transaction, its rows locked in message id order (two batches never wait on
        // each other in a cycle); one message's updates keep their order (a stable sort).
        let mut order: Vec<usize> = (0..updates.len()).collect();
        order.sort_by(|&a, &b| updates[a].message_id.cmp(&updates[b].message_id));
        let writes = order
            .iter()
            .map(|&i| TaskWrite::new(&updates[i]))
            .collect::<Result<Vec<_>>>()?;
        let sorted = self.store.record_tasks(&writes, retention).await?;
        let mut applied = vec![false; updates.len()];
        for (&i, done) in order.iter().zip(sorted) {
            applied[i] = done;
        }
        Ok(applied)
    }

    async fn set_progress(&self, message_id: &str, progress: &Value, retention: Duration) -> Result<bool> {
        let at = int(troupe_core::now_ms());
        self.store
            .set_progress(message_id, &json_text(progress)?, at, retention)
            .await
    }

    async fn task(&self, message_id: &str) -> Result<Option<TaskRecord>> {
        self.store
            .task(message_id)
            .await?
            .map(TaskRow::into_record::<S>)
            .transpose()
    }

    async fn tasks(&self, query: &TaskQuery) -> Result<TaskPage> {
        let tasks = self
            .store
            .tasks(query)
            .await?
            .into_iter()
            .map(TaskRow::into_record::<S>)
            .collect::<Result<Vec<_>>>()?;
        Ok(TaskPage::new(tasks, query.page_size()))
    }

    async fn status_counts(&self, filter: &TaskFilter) -> Result<std::collections::BTreeMap<TaskStatus, u64>> {
        let mut scope = TaskFilter::new();
        scope.actor.clone_from(&filter.actor);
        scope.queue.clone_from(&filter.queue);
        let mut counts = std::collections::BTreeMap::new();
        for status in TaskStatus::ALL {
            let n = uint(self.store.task_status_count(status.as_str(), &scope).await?);
            if n > 0 {
                counts.insert(status, n);
            }
        }
        Ok(counts)
    }

    async fn task_counts(&self, filter: &TaskFilter) -> Result<TaskCounts> {
        // Counts cover every status and time: only the actor and the queue apply.
        let mut scope = TaskFilter::new();
        scope.actor.clone_from(&filter.actor);
        scope.queue.clone_from(&filter.queue);
        let rows = self.store.task_counts(&scope).await?;
        let mut counts = TaskCounts::default();
        for (status, actor, queue, n) in rows {
            let n = uint(n);
            *counts.by_status.entry(parse_status::<S>(&status)?).or_default() += n;
            *counts.by_actor.entry(actor).or_default() += n;
            *counts.by_queue.entry(queue).or_default() += n;
        }
        Ok(counts)
    }

    async fn delete_task(&self, message_id: &str) -> Result<bool> {
        self.store.delete_task(message_id).await
    }

    async fn expire_tasks(&self, limit: usize) -> Result<u64> {
        self.store.expire_tasks(i64::try_from(limit).unwrap_or(i64::MAX)).await
    }

    async fn mark_cancelled(&self, message_id: &str, retention: Duration) -> Result<Option<TaskStatus>> {
        let at = int(troupe_core::now_ms());
        self.store
            .mark_cancelled(message_id, at, retention)
            .await?
            .as_deref()
            .map(parse_status::<S>)
            .transpose()
    }

    async fn request_cancel(&self, message_id: &str, mode: CancelMode, ttl: Duration) -> Result<()> {
        self.store.request_cancel(message_id, mode.as_str(), ttl).await?;
        self.cancelled.notify_waiters();
        Ok(())
    }

    async fn cancel_requested(&self, message_id: &str) -> Result<Option<CancelMode>> {
        Ok(self.cancel_requests(&[message_id.to_owned()]).await?.pop().flatten())
    }

    async fn cancel_requests(&self, message_ids: &[String]) -> Result<Vec<Option<CancelMode>>> {
        if message_ids.is_empty() {
            return Ok(Vec::new());
        }
        let found = self.store.cancels(message_ids).await?;
        message_ids
            .iter()
            .map(|id| {
                found
                    .iter()
                    .find(|(found, _)| found == id)
                    .map(|(_, mode)| parse_mode::<S>(mode))
                    .transpose()
            })
            .collect()
    }

    async fn wait_cancels(&self, message_ids: &[String], timeout: Duration) -> Result<Vec<(String, CancelMode)>> {
        if message_ids.is_empty() {
            // Nothing can come: wait as a watcher would, without polling.
            tokio::time::sleep(timeout).await;
            return Ok(Vec::new());
        }
        let found = poll_until(timeout, POLL, Some(&self.cancelled), || async {
            let found = self.store.cancels(message_ids).await?;
            Ok((!found.is_empty()).then_some(found))
        })
        .await?
        .unwrap_or_default();
        // In the order of the ids asked for, as the other stores answer.
        let mut requests = Vec::with_capacity(found.len());
        for id in message_ids {
            if let Some((_, mode)) = found.iter().find(|(found, _)| found == id) {
                requests.push((id.clone(), parse_mode::<S>(mode)?));
            }
        }
        Ok(requests)
    }

    async fn claim_unique(&self, key: &str, message_id: &str, ttl: Duration) -> Result<Option<String>> {
        let holder = self.store.claim_unique(key, message_id, ttl).await?;
        Ok((holder != message_id).then_some(holder))
    }

    async fn release_unique(&self, key: &str, message_id: &str) -> Result<()> {
        self.store.release_unique(key, message_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dollar(n: usize) -> String {
        format!("${n}")
    }

    #[test]
    fn conditions_bind_every_filter_and_the_cursor() {
        let filter = TaskFilter::new()
            .status(TaskStatus::Failed)
            .actor("a'; DROP TABLE x; --")
            .queue("q")
            .since(10)
            .until(20);
        let cursor = TaskCursor {
            enqueued_at: 15,
            message_id: "m".into(),
        };
        let w = TaskWhere::new(&filter, Some(&cursor), 2, dollar);
        assert_eq!(
            w.sql,
            " AND status = $2 AND actor = $3 AND queue = $4 AND enqueued_at >= $5 AND enqueued_at < $6 \
             AND (enqueued_at, message_id) < ($7, $8)"
        );
        assert_eq!(w.args.len(), 7);
        assert_eq!(w.args[1], SqlArg::Text("a'; DROP TABLE x; --".into()));
        assert_eq!(w.next(2), 9);
        let none = TaskWhere::new(&TaskFilter::new(), None, 1, dollar);
        assert_eq!((none.sql.as_str(), none.next(1)), ("", 1));
    }

    #[test]
    fn a_batch_is_distinct_when_no_record_repeats() {
        let updates = [
            TaskUpdate::new("a", "x", "q", TaskStatus::Enqueued, 0),
            TaskUpdate::new("b", "x", "q", TaskStatus::Enqueued, 0),
            TaskUpdate::new("a", "x", "q", TaskStatus::Running, 1),
        ];
        let writes: Vec<TaskWrite<'_>> = updates.iter().map(|u| TaskWrite::new(u).unwrap()).collect();
        assert!(distinct_records(&writes[..2]));
        assert!(!distinct_records(&writes));
        assert!(distinct_records(&[]));
    }

    #[test]
    fn writes_follow_the_update_rules() {
        let mut update = TaskUpdate::new("m", "a", "q", TaskStatus::Running, 4);
        update.at = 100;
        update.error_type = Some("Ignored".into());
        let w = TaskWrite::new(&update).unwrap();
        assert_eq!((w.started_at, w.finished_at), (Some(100), None));
        assert_eq!(w.error_type, None, "an error type without an error keeps the record's");
        update.status = TaskStatus::Failed;
        update.error = Some("boom".into());
        update.args = Some(serde_json::json!({"args": [1]}));
        let w = TaskWrite::new(&update).unwrap();
        assert_eq!((w.started_at, w.finished_at), (None, Some(100)));
        assert_eq!((w.error_type, w.error), (Some("Ignored"), Some("boom")));
        assert_eq!(w.args.as_deref(), Some(r#"{"args":[1]}"#));
    }
}
