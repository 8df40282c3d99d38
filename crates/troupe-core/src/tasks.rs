//! Task lifecycle records: every message's state from the moment it is sent to its end, the
//! queries over them, cancellation requests and unique-message keys (design §4b).
//!
//! A [`TaskStore`] keeps them; the state backends of memory, SQLite, Redis and PostgreSQL each
//! are one ([`StateBackend::tasks`](crate::StateBackend::tasks)). The app writes to it when
//! tracking is on (`AppBuilder::track_tasks`), and reads from it to answer
//! [`App::task`](crate::App::task), [`App::tasks`](crate::App::tasks) and
//! [`App::cancel`](crate::App::cancel).
//!
//! # How a record moves
//!
//! Every write is a [`TaskUpdate`] with a `version` that only grows along one message's life:
//! `3 × retries + step`, where the step is 0 when the message is (re-)enqueued, 1 when an
//! attempt starts, 2 when it ends. A store applies an update only when its version is at least
//! the record's and the record is not cancelled, in one atomic step, so the writes of a fast
//! worker and a slow producer may arrive in any order and the record still ends in the latest
//! state. Cancellation ([`TaskStore::mark_cancelled`]) wins over everything but a final state.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Records are kept this long after their last change, unless told otherwise (7 days, as the
/// Celery deployment in the seeds kept its task states).
pub const DEFAULT_TASK_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A page of tasks holds this many records unless the query says otherwise.
pub const DEFAULT_PAGE_SIZE: usize = 50;

/// The largest page a store returns.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Where a message is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TaskStatus {
    /// In its queue, ready to run.
    Enqueued,
    /// Waiting for its eta (sent with a delay).
    Delayed,
    /// An attempt is running.
    Running,
    /// An attempt failed and a retry waits for its eta.
    Retrying,
    /// The actor succeeded.
    Succeeded,
    /// The message failed for good and went to the dead letters.
    Failed,
    /// The message was skipped (not run, or the actor asked to skip it).
    Skipped,
    /// The message was cancelled before or while it ran.
    Cancelled,
}

impl TaskStatus {
    /// Every status, in the order of a message's life.
    pub const ALL: [TaskStatus; 8] = [
        Self::Enqueued,
        Self::Delayed,
        Self::Running,
        Self::Retrying,
        Self::Succeeded,
        Self::Failed,
        Self::Skipped,
        Self::Cancelled,
    ];

    /// The status's name, as stored and shown (`"enqueued"`, ...).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enqueued => "enqueued",
            Self::Delayed => "delayed",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the message's life has ended (succeeded, failed, skipped or cancelled).
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Skipped | Self::Cancelled)
    }

    /// Whether the message waits in a queue (enqueued, delayed or retrying).
    #[must_use]
    pub fn is_pending(self) -> bool {
        matches!(self, Self::Enqueued | Self::Delayed | Self::Retrying)
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|t| t.as_str()).collect();
            Error::Config(format!("unknown task status {s:?}; valid: {}", names.join(", ")))
        })
    }
}

/// What is known of one message. Times are milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TaskRecord {
    /// The message id.
    pub message_id: String,
    /// Its actor.
    pub actor: String,
    /// Its queue (canonical name).
    pub queue: String,
    /// Its state.
    pub status: TaskStatus,
    /// When it was first recorded (sent, or first seen by a worker).
    pub enqueued_at: u64,
    /// When its latest attempt started.
    pub started_at: Option<u64>,
    /// When it reached a final state.
    pub finished_at: Option<u64>,
    /// When the record last changed.
    pub updated_at: u64,
    /// When a delayed or retrying message is due.
    pub eta: Option<u64>,
    /// How many attempts started.
    pub attempts: u64,
    /// The type of the last error (`"TimeLimitExceeded"`, a Rust type name, a Python class).
    pub error_type: Option<String>,
    /// The text of the last error.
    pub error: Option<String>,
    /// The worker that ran the latest attempt (`host:pid`).
    pub worker: Option<String>,
    /// The latest progress the actor reported.
    pub progress: Option<Value>,
    /// The message's arguments, `{"args": [...], "kwargs": {...}}`, when tracking keeps them.
    pub args: Option<Value>,
}

/// One state change, as the tracking writes it (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct TaskUpdate {
    /// The message id.
    pub message_id: String,
    /// Its actor.
    pub actor: String,
    /// Its queue (canonical name).
    pub queue: String,
    /// The new state.
    pub status: TaskStatus,
    /// Orders updates of one message: `3 × retries + step` (see the module docs).
    pub version: u64,
    /// When the change happened.
    pub at: u64,
    /// The eta, for delayed and retrying messages (cleared otherwise).
    pub eta: Option<u64>,
    /// When the attempt started, when known (kept otherwise; a `running` update without it
    /// starts at `at`). A final update carries it, so an attempt that ended before its
    /// `running` state was written still shows when it started.
    pub started_at: Option<u64>,
    /// Attempts started so far.
    pub attempts: u64,
    /// The error's type, when the change is a failure (kept otherwise).
    pub error_type: Option<String>,
    /// The error's text, when the change is a failure (kept otherwise).
    pub error: Option<String>,
    /// The worker, when an attempt starts (kept otherwise).
    pub worker: Option<String>,
    /// The arguments, when tracking keeps them (kept otherwise).
    pub args: Option<Value>,
}

impl TaskUpdate {
    /// An update of `message_id` to `status` at `version`, now.
    #[must_use]
    pub fn new(
        message_id: impl Into<String>,
        actor: impl Into<String>,
        queue: impl Into<String>,
        status: TaskStatus,
        version: u64,
    ) -> Self {
        Self {
            message_id: message_id.into(),
            actor: actor.into(),
            queue: queue.into(),
            status,
            version,
            at: crate::now_ms(),
            eta: None,
            started_at: None,
            attempts: 0,
            error_type: None,
            error: None,
            worker: None,
            args: None,
        }
    }

    /// The record this update makes when there is none yet.
    #[must_use]
    pub fn to_record(&self) -> TaskRecord {
        let mut record = TaskRecord {
            message_id: self.message_id.clone(),
            actor: self.actor.clone(),
            queue: self.queue.clone(),
            status: self.status,
            enqueued_at: self.at,
            started_at: None,
            finished_at: None,
            updated_at: self.at,
            eta: None,
            attempts: 0,
            error_type: None,
            error: None,
            worker: None,
            progress: None,
            args: None,
        };
        self.apply_to(&mut record);
        record
    }

    /// The start time this update sets: its `started_at`, else `at` for a `running` update.
    #[must_use]
    pub fn started(&self) -> Option<u64> {
        self.started_at
            .or_else(|| (self.status == TaskStatus::Running).then_some(self.at))
    }

    /// Applies this update to `record` (the store has checked the version).
    pub fn apply_to(&self, record: &mut TaskRecord) {
        record.status = self.status;
        record.updated_at = self.at;
        record.eta = self.eta;
        record.attempts = self.attempts;
        if let Some(started) = self.started() {
            record.started_at = Some(started);
        }
        if self.status.is_final() {
            record.finished_at = Some(self.at);
        }
        if self.error.is_some() {
            record.error_type.clone_from(&self.error_type);
            record.error.clone_from(&self.error);
        }
        if self.worker.is_some() {
            record.worker.clone_from(&self.worker);
        }
        if self.args.is_some() {
            record.args.clone_from(&self.args);
        }
    }
}

/// Which tasks a page or a count covers. Every filter set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskFilter {
    /// Only tasks in this state.
    pub status: Option<TaskStatus>,
    /// Only tasks of this actor.
    pub actor: Option<String>,
    /// Only tasks of this queue.
    pub queue: Option<String>,
    /// Only tasks first recorded at or after this time (ms since the epoch).
    pub since: Option<u64>,
    /// Only tasks first recorded before this time (ms since the epoch).
    pub until: Option<u64>,
}

impl TaskFilter {
    /// No filter: every task.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Only tasks in `status`.
    #[must_use]
    pub fn status(mut self, status: TaskStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Only tasks of `actor`.
    #[must_use]
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Only tasks of `queue`.
    #[must_use]
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(crate::queue::q_name(&queue.into()).to_owned());
        self
    }

    /// Only tasks first recorded at or after `since_ms`.
    #[must_use]
    pub fn since(mut self, since_ms: u64) -> Self {
        self.since = Some(since_ms);
        self
    }

    /// Only tasks first recorded before `until_ms`.
    #[must_use]
    pub fn until(mut self, until_ms: u64) -> Self {
        self.until = Some(until_ms);
        self
    }

    /// Whether `record` passes the filter.
    #[must_use]
    pub fn matches(&self, record: &TaskRecord) -> bool {
        self.status.is_none_or(|s| s == record.status)
            && self.actor.as_ref().is_none_or(|a| *a == record.actor)
            && self.queue.as_ref().is_none_or(|q| *q == record.queue)
            && self.since.is_none_or(|t| record.enqueued_at >= t)
            && self.until.is_none_or(|t| record.enqueued_at < t)
    }
}

/// Where a page ends: the next page starts after it. Pages are newest first, by the time a task
/// was first recorded, then by message id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskCursor {
    /// The `enqueued_at` of the last task of the page.
    pub enqueued_at: u64,
    /// Its message id.
    pub message_id: String,
}

impl TaskCursor {
    /// The cursor after `record`.
    #[must_use]
    pub fn after(record: &TaskRecord) -> Self {
        Self {
            enqueued_at: record.enqueued_at,
            message_id: record.message_id.clone(),
        }
    }

    /// Whether `record` comes after this cursor in newest-first order.
    #[must_use]
    pub fn precedes(&self, record: &TaskRecord) -> bool {
        (record.enqueued_at, record.message_id.as_str()) < (self.enqueued_at, self.message_id.as_str())
    }
}

impl fmt::Display for TaskCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.enqueued_at, self.message_id)
    }
}

impl FromStr for TaskCursor {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::Config(format!(
                "bad task cursor {s:?}: expected the `next` of a page (MILLIS:MESSAGE_ID)"
            ))
        };
        let (at, id) = s.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            enqueued_at: at.parse().map_err(|_| bad())?,
            message_id: id.to_owned(),
        })
    }
}

/// A query for a page of tasks: a filter, a page size and where to start.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskQuery {
    /// Which tasks.
    pub filter: TaskFilter,
    /// At most this many (1..=[`MAX_PAGE_SIZE`]; default [`DEFAULT_PAGE_SIZE`]).
    pub limit: usize,
    /// Start after this cursor (the previous page's `next`).
    pub after: Option<TaskCursor>,
}

impl Default for TaskQuery {
    fn default() -> Self {
        Self {
            filter: TaskFilter::default(),
            limit: DEFAULT_PAGE_SIZE,
            after: None,
        }
    }
}

impl TaskQuery {
    /// The first page of the tasks `filter` selects.
    #[must_use]
    pub fn new(filter: TaskFilter) -> Self {
        Self {
            filter,
            ..Self::default()
        }
    }

    /// At most `limit` tasks per page (clamped to 1..=[`MAX_PAGE_SIZE`]).
    #[must_use]
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit.clamp(1, MAX_PAGE_SIZE);
        self
    }

    /// The page after `cursor`.
    #[must_use]
    pub fn after(mut self, cursor: TaskCursor) -> Self {
        self.after = Some(cursor);
        self
    }

    /// The page size a store uses: `limit` clamped to 1..=[`MAX_PAGE_SIZE`].
    #[must_use]
    pub fn page_size(&self) -> usize {
        self.limit.clamp(1, MAX_PAGE_SIZE)
    }
}

/// A page of tasks, newest first.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct TaskPage {
    /// The tasks.
    pub tasks: Vec<TaskRecord>,
    /// The cursor of the next page, when there may be one.
    pub next: Option<TaskCursor>,
}

impl TaskPage {
    /// A page of `tasks` (newest first) for a query of `page_size`: `next` is set when the page
    /// is full.
    #[must_use]
    pub fn new(tasks: Vec<TaskRecord>, page_size: usize) -> Self {
        let next = (tasks.len() >= page_size)
            .then(|| tasks.last().map(TaskCursor::after))
            .flatten();
        Self { tasks, next }
    }
}

/// How many tasks there are per status, actor and queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TaskCounts {
    /// Per status (only statuses with tasks).
    pub by_status: BTreeMap<TaskStatus, u64>,
    /// Per actor.
    pub by_actor: BTreeMap<String, u64>,
    /// Per queue.
    pub by_queue: BTreeMap<String, u64>,
}

impl TaskCounts {
    /// The number of tasks in `status`.
    #[must_use]
    pub fn status(&self, status: TaskStatus) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Every task counted.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.by_status.values().sum()
    }

    /// Counts `record` in.
    pub fn add(&mut self, record: &TaskRecord) {
        *self.by_status.entry(record.status).or_default() += 1;
        *self.by_actor.entry(record.actor.clone()).or_default() += 1;
        *self.by_queue.entry(record.queue.clone()).or_default() += 1;
    }
}

/// What a cancellation stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CancelMode {
    /// Pending work only: a message that already runs goes on (dramatiq-abort's `cancel`).
    Pending,
    /// Pending work, and running work is stopped too (dramatiq-abort's `abort`).
    #[default]
    Abort,
}

impl CancelMode {
    /// The mode's name (`"pending"`, `"abort"`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Abort => "abort",
        }
    }
}

/// What [`App::cancel`](crate::App::cancel) found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// The message was pending; it will never run, and its state is cancelled.
    Cancelled,
    /// The message is running; its worker stops it and records it cancelled.
    Aborting,
    /// The message is running and the mode cancels pending work only; it goes on.
    Running,
    /// The message had already finished in this state; nothing changed.
    Finished(TaskStatus),
    /// No record of the message (tracking off, or an unknown or expired id). The request is
    /// kept, so a worker that receives the message skips it.
    Unknown,
}

/// Keeps task records, cancellation requests and unique-message keys. Every method applies
/// entirely or not at all; records expire `retention` after their last change.
#[async_trait]
pub trait TaskStore: Send + Sync + fmt::Debug {
    /// Applies `update` when its version is at least the record's and the record is not
    /// cancelled (creating the record when there is none). Returns whether it was applied.
    async fn record(&self, update: &TaskUpdate, retention: Duration) -> Result<bool>;

    /// Applies several updates (one round trip where the store can). Returns, per update,
    /// whether it was applied.
    async fn record_many(&self, updates: &[TaskUpdate], retention: Duration) -> Result<Vec<bool>> {
        let mut applied = Vec::with_capacity(updates.len());
        for update in updates {
            applied.push(self.record(update, retention).await?);
        }
        Ok(applied)
    }

    /// Stores the latest progress of a task that has a record. Returns whether it has one.
    async fn set_progress(&self, message_id: &str, progress: &Value, retention: Duration) -> Result<bool>;

    /// One task's record.
    async fn task(&self, message_id: &str) -> Result<Option<TaskRecord>>;

    /// A page of tasks, newest first.
    async fn tasks(&self, query: &TaskQuery) -> Result<TaskPage>;

    /// Counts per status, actor and queue of the tasks `filter` selects (its `status`, `since`
    /// and `until` are not used: counts cover every status and time).
    async fn task_counts(&self, filter: &TaskFilter) -> Result<TaskCounts>;

    /// How many tasks there are in each status, within `filter`'s actor and queue (its other
    /// fields are not used): what a dashboard shows. SQL stores count each status on its index
    /// (records expired since the last sweep may still count); the default takes the
    /// `by_status` of [`task_counts`](Self::task_counts).
    async fn status_counts(&self, filter: &TaskFilter) -> Result<BTreeMap<TaskStatus, u64>> {
        Ok(self.task_counts(filter).await?.by_status)
    }

    /// Deletes one task's record. Returns whether there was one.
    async fn delete_task(&self, message_id: &str) -> Result<bool>;

    /// Deletes up to `limit` records past their retention, oldest expiry first, through an
    /// index (no full scan). Returns how many it deleted.
    async fn expire_tasks(&self, limit: usize) -> Result<u64>;

    /// Marks a task cancelled unless it is running or finished, and says what it was (`None`:
    /// no record). A running task is left to its worker.
    async fn mark_cancelled(&self, message_id: &str, retention: Duration) -> Result<Option<TaskStatus>>;

    /// Records a cancellation request for `message_id`, kept for `ttl`.
    async fn request_cancel(&self, message_id: &str, mode: CancelMode, ttl: Duration) -> Result<()>;

    /// The cancellation request for `message_id`, if one is kept.
    async fn cancel_requested(&self, message_id: &str) -> Result<Option<CancelMode>>;

    /// [`cancel_requested`](Self::cancel_requested) for several messages (one round trip where
    /// the store can), in the order asked.
    async fn cancel_requests(&self, message_ids: &[String]) -> Result<Vec<Option<CancelMode>>> {
        let mut found = Vec::with_capacity(message_ids.len());
        for id in message_ids {
            found.push(self.cancel_requested(id).await?);
        }
        Ok(found)
    }

    /// The cancellation requests among `message_ids`, waiting up to `timeout` for one when
    /// there is none yet (a store without a blocking wait may return at once).
    async fn wait_cancels(&self, message_ids: &[String], timeout: Duration) -> Result<Vec<(String, CancelMode)>>;

    /// Takes the unique key `key` for `message_id` for `ttl`, unless another message holds it:
    /// then returns that message's id. Atomic across processes.
    async fn claim_unique(&self, key: &str, message_id: &str, ttl: Duration) -> Result<Option<String>>;

    /// Frees `key` if `message_id` holds it.
    async fn release_unique(&self, key: &str, message_id: &str) -> Result<()>;
}

/// The state-backend key of a unique message: its actor and either the key its sender gave
/// (`troupe_unique_key`) or the md5 of its arguments as canonical JSON (object keys sorted), so
/// equal arguments give one key whatever order keyword arguments came in.
#[must_use]
pub fn unique_key(message: &crate::Message) -> String {
    use md5::{Digest, Md5};
    let user_key = message.option_str(crate::option_keys::UNIQUE_KEY);
    let part = match user_key {
        Some(key) => format!("key:{key}"),
        None => {
            let canonical = canonical_json(&serde_json::json!([message.args, message.kwargs]));
            let digest = Md5::digest(canonical.as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("args:{hex}")
        }
    };
    format!(
        "troupe-unique:{}:{}:{part}",
        message.canonical_queue(),
        message.actor_name
    )
}

/// `value` as compact JSON with every object's keys sorted.
fn canonical_json(value: &Value) -> String {
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&map[k]))).collect())
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(value).to_string()
}

/// The version of a write at `step` (0 enqueued, 1 started, 2 ended) of the attempt after
/// `retries` retries.
#[must_use]
pub fn task_version(retries: u64, step: u64) -> u64 {
    retries.saturating_mul(3).saturating_add(step.min(2))
}

/// Whether a store applies `update` to `existing`: a newer or equal version, and the record
/// not cancelled; a record that does not exist yet is always created.
#[must_use]
pub fn applies(existing: Option<(&TaskRecord, u64)>, update: &TaskUpdate) -> bool {
    match existing {
        None => true,
        Some((record, version)) => record.status != TaskStatus::Cancelled && update.version >= version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_by_name() {
        for status in TaskStatus::ALL {
            assert_eq!(status.as_str().parse::<TaskStatus>().unwrap(), status);
            assert_eq!(serde_json::to_value(status).unwrap(), Value::from(status.as_str()));
        }
        assert_eq!(
            format!("[{:<9}]", TaskStatus::Failed),
            "[failed   ]",
            "width and alignment apply"
        );
        let err = "done".parse::<TaskStatus>().unwrap_err().to_string();
        assert!(err.contains("valid: enqueued, delayed"), "{err}");
    }

    #[test]
    fn unique_keys_ignore_keyword_order_and_honour_a_given_key() {
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("b".into(), Value::from(1));
        kwargs.insert("a".into(), serde_json::json!({"y": 1, "x": 2}));
        let one = crate::Message::new("q", "act", vec![Value::from("x")], kwargs);
        let mut reordered = serde_json::Map::new();
        reordered.insert("a".into(), serde_json::json!({"x": 2, "y": 1}));
        reordered.insert("b".into(), Value::from(1));
        let two = crate::Message::new("q", "act", vec![Value::from("x")], reordered);
        assert_eq!(unique_key(&one), unique_key(&two));
        let other = crate::Message::new("q", "act", vec![Value::from("y")], serde_json::Map::new());
        assert_ne!(unique_key(&one), unique_key(&other));
        let keyed = other.with_option(crate::option_keys::UNIQUE_KEY, "order-7");
        assert!(
            unique_key(&keyed).ends_with(":act:key:order-7"),
            "{}",
            unique_key(&keyed)
        );
    }

    #[test]
    fn cursors_round_trip_and_order_newest_first() {
        let cursor: TaskCursor = "1700:abc".parse().unwrap();
        assert_eq!(cursor.to_string(), "1700:abc");
        assert!("nope".parse::<TaskCursor>().is_err());
        let mut older = TaskUpdate::new("abb", "a", "q", TaskStatus::Enqueued, 0).to_record();
        older.enqueued_at = 1700;
        assert!(cursor.precedes(&older));
        older.message_id = "abd".into();
        assert!(!cursor.precedes(&older));
    }

    #[test]
    fn updates_apply_in_version_order_and_never_undo_a_cancel() {
        let enqueued = TaskUpdate::new("m", "a", "q", TaskStatus::Enqueued, task_version(0, 0));
        let running = TaskUpdate::new("m", "a", "q", TaskStatus::Running, task_version(0, 1));
        let record = running.to_record();
        assert!(
            !applies(Some((&record, running.version)), &enqueued),
            "a late enqueue write is refused"
        );
        let mut cancelled = record.clone();
        cancelled.status = TaskStatus::Cancelled;
        let done = TaskUpdate::new("m", "a", "q", TaskStatus::Succeeded, task_version(0, 2));
        assert!(!applies(Some((&cancelled, 1)), &done));
        assert!(applies(Some((&record, 1)), &done));
    }
}
