//! The message: exactly Dramatiq's seven wire fields.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::queue;

/// A message's `options`: an order-preserving map whose unknown keys round-trip untouched.
pub type Options = Map<String, Value>;

/// The keys of the message options Troupe reads or writes. Read and write them through
/// [`Message`]'s accessors ([`Message::max_retries`], [`Message::set_eta`], ...), which apply
/// the [one rule](Message#options) for absent, `null` and 0 values.
pub mod option_keys {
    /// When a delayed message is due, in milliseconds since the Unix epoch.
    pub const ETA: &str = "eta";
    /// How many times the message has failed so far.
    pub const RETRIES: &str = "retries";
    /// This message's `max_retries`, over its actor's.
    pub const MAX_RETRIES: &str = "max_retries";
    /// This message's `min_backoff`, in milliseconds.
    pub const MIN_BACKOFF: &str = "min_backoff";
    /// This message's `max_backoff`, in milliseconds.
    pub const MAX_BACKOFF: &str = "max_backoff";
    /// The last failure's traceback (or the dead-letter reason).
    pub const TRACEBACK: &str = "traceback";
    /// When the last retry was enqueued, in milliseconds since the Unix epoch.
    pub const REQUEUE_TIMESTAMP: &str = "requeue_timestamp";
    /// This message's `time_limit`, in milliseconds.
    pub const TIME_LIMIT: &str = "time_limit";
    /// This message's `max_age`, in milliseconds.
    pub const MAX_AGE: &str = "max_age";
    /// This message's `store_results`.
    pub const STORE_RESULTS: &str = "store_results";
    /// This message's `result_ttl`, in milliseconds.
    pub const RESULT_TTL: &str = "result_ttl";
    /// This message's `on_success` callback actor.
    pub const ON_SUCCESS: &str = "on_success";
    /// This message's `on_failure` callback actor.
    pub const ON_FAILURE: &str = "on_failure";
    /// This message's `on_retry_exhausted` callback actor.
    pub const ON_RETRY_EXHAUSTED: &str = "on_retry_exhausted";
    /// This message's `notify_shutdown`.
    pub const NOTIFY_SHUTDOWN: &str = "notify_shutdown";
    /// The next pipeline stage: a whole message as a JSON object.
    pub const PIPE_TARGET: &str = "pipe_target";
    /// Whether this pipeline stage ignores the previous stage's result.
    pub const PIPE_IGNORE: &str = "pipe_ignore";
    /// The delay a pipeline applies when it enqueues this message as its next stage, in
    /// milliseconds.
    pub const DELAY: &str = "delay";
    /// The Redis broker's id of the message (Dramatiq's layout).
    pub const REDIS_MESSAGE_ID: &str = "redis_message_id";
    /// Dramatiq's RabbitMQ priority: the AMQP priority itself, higher first.
    pub const BROKER_PRIORITY: &str = "broker_priority";
    /// Troupe's priority (see [`crate::priority`]).
    pub const TROUPE_PRIORITY: &str = crate::priority::OPTION;
    /// This message's soft time limit, in milliseconds.
    pub const SOFT_TIME_LIMIT: &str = "troupe_soft_time_limit";
    /// This message's `unique_for`, in milliseconds.
    pub const UNIQUE_FOR: &str = "troupe_unique_for";
    /// The unique key a sender gave, instead of the actor and arguments.
    pub const UNIQUE_KEY: &str = "troupe_unique_key";
    /// The unique key the message holds (set when it was sent; its worker frees it at the end).
    pub const UNIQUE_HELD: &str = "troupe_unique";
    /// The group (its barrier's key) a child message belongs to (Dramatiq's).
    pub const GROUP_COMPLETION_UUID: &str = "group_completion_uuid";
    /// The messages to send once every child of the group succeeded (Dramatiq's; message dicts).
    pub const GROUP_COMPLETION_CALLBACKS: &str = "group_completion_callbacks";
    /// The messages to send once every child of the group finished, failed or not, each given
    /// the children's outcomes as its last argument (message dicts).
    pub const GROUP_FINISHED_CALLBACKS: &str = "troupe_group_finished";
    /// A child's position in its group (orders the outcomes the finished callbacks get).
    pub const GROUP_INDEX: &str = "troupe_group_index";
    /// On a finished callback: send it only if every child succeeded, with the list of their
    /// results (in order) instead of the outcomes (a pipeline's stage after a group).
    pub const GROUP_RESULTS: &str = "troupe_group_results";
    /// The group that is a pipeline's next stage: `{"children": [messages], "then": message}`.
    pub const PIPE_GROUP: &str = "troupe_pipe_group";
}

/// A message, as it travels between producers and workers.
///
/// The fields and their order are Dramatiq's; a message encoded by Troupe's
/// [`JsonEncoder`](crate::JsonEncoder) is byte-identical to one Python Dramatiq encodes.
///
/// # Options
///
/// The options Troupe reads have accessors ([`eta`](Self::eta), [`max_retries`](Self::max_retries),
/// [`time_limit`](Self::time_limit), ...; their keys are in [`option_keys`]), all with one rule:
///
/// - an option that is absent, `null` or of the wrong type is not set (`None`): the actor's
///   option applies, then the middleware's default;
/// - a number is the value, **0 included**: 0 never means "not set". What 0 does is the
///   option's own: `max_retries` 0 retries nothing, `min_backoff`/`max_backoff` 0 retry at once,
///   `time_limit`/`max_age` 0 set no limit, `eta` 0 (the epoch) is due now, `delay` 0 does not
///   delay. Numbers are milliseconds where the option is a time; a negative number counts as
///   0 and a fraction is truncated;
/// - a boolean option takes Python's truthiness (`0`, `""` and `[]` are false);
/// - a callback option is a non-empty string.
///
/// The actor options of the same names follow the same rule (`ActorOptions::time_limit` of
/// `Duration::ZERO` is no limit), as do the middleware defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// The queue it is on (`q`, or `q.DQ` while it waits for its eta).
    pub queue_name: String,
    /// The actor's wire name.
    pub actor_name: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments, bound to the actor's parameters by name.
    pub kwargs: Map<String, Value>,
    /// Per-message options (`eta`, `retries`, `max_retries`, ...).
    pub options: Options,
    /// A uuid4 string, fixed for the message's whole life (retries, delays, dead letters).
    #[serde(default = "new_message_id")]
    pub message_id: String,
    /// When the message was built, in milliseconds since the Unix epoch.
    #[serde(default = "now_ms")]
    pub message_timestamp: u64,
}

/// A fresh uuid4 message id, lowercase and hyphenated as Python's `str(uuid.uuid4())`.
#[must_use]
pub fn new_message_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A duration in whole milliseconds, saturating, for the wire.
#[must_use]
pub fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Message {
    /// A new message with a fresh id and timestamp and no options.
    #[must_use]
    pub fn new(
        queue_name: impl Into<String>,
        actor_name: impl Into<String>,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Self {
        Self {
            queue_name: queue_name.into(),
            actor_name: actor_name.into(),
            args,
            kwargs,
            options: Options::new(),
            message_id: new_message_id(),
            message_timestamp: now_ms(),
        }
    }

    /// Sets one option (builder style).
    #[must_use]
    pub fn with_option(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.options.insert(key.into(), value.into());
        self
    }

    /// Sets the `delay` option, in milliseconds on the wire: the delay a pipeline applies when it
    /// enqueues this message as its next stage.
    #[must_use]
    pub fn with_delay(self, delay: Duration) -> Self {
        self.with_option(option_keys::DELAY, duration_ms(delay))
    }

    /// The canonical queue name (without `.DQ`).
    #[must_use]
    pub fn canonical_queue(&self) -> &str {
        queue::q_name(&self.queue_name)
    }

    /// An option as an unsigned integer: `None` when it is missing, `null` or not a number; a
    /// number is its value, 0 included (a negative number gives 0, a fraction is truncated).
    #[must_use]
    pub fn option_u64(&self, key: &str) -> Option<u64> {
        match self.options.get(key)? {
            Value::Number(n) => n
                .as_u64()
                .or_else(|| n.as_i64().map(|v| u64::try_from(v).unwrap_or(0)))
                .or_else(|| n.as_f64().map(f64_to_u64)),
            _ => None,
        }
    }

    /// An option as a boolean (Python truthiness for numbers and strings).
    #[must_use]
    pub fn option_bool(&self, key: &str) -> Option<bool> {
        match self.options.get(key)? {
            Value::Null => None,
            Value::Bool(b) => Some(*b),
            Value::Number(n) => Some(n.as_f64().is_some_and(|v| v != 0.0)),
            Value::String(s) => Some(!s.is_empty()),
            Value::Array(a) => Some(!a.is_empty()),
            Value::Object(o) => Some(!o.is_empty()),
        }
    }

    /// An option as a non-empty string.
    #[must_use]
    pub fn option_str(&self, key: &str) -> Option<&str> {
        self.options.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
    }

    /// An option as a duration in milliseconds: as [`option_u64`](Self::option_u64), 0 included.
    #[must_use]
    pub fn option_duration(&self, key: &str) -> Option<Duration> {
        self.option_u64(key).map(Duration::from_millis)
    }

    /// The `eta` option (ms since the epoch): when a delayed message is due. `null` counts as
    /// absent; a value that is not a number counts as due now, as in Dramatiq.
    #[must_use]
    pub fn eta(&self) -> Option<u64> {
        match self.options.get(option_keys::ETA)? {
            Value::Null => None,
            Value::Number(_) => self.option_u64(option_keys::ETA),
            other => {
                tracing::warn!(message_id = %self.message_id, eta = %other, "message has a non-numeric eta; treating it as due now");
                Some(now_ms())
            }
        }
    }

    /// Sets the `eta` option (ms since the epoch).
    pub fn set_eta(&mut self, eta_ms: u64) {
        self.options.insert(option_keys::ETA.into(), eta_ms.into());
    }

    /// Removes the `eta` option (the message is no longer delayed).
    pub fn clear_eta(&mut self) {
        self.options.shift_remove(option_keys::ETA);
    }

    /// The message's priority (`options.troupe_priority`): lower runs first, 0 when absent, in
    /// [`priority::MIN`](crate::priority::MIN)`..=`[`priority::MAX`](crate::priority::MAX)
    /// (clamped; see [`crate::priority`]).
    #[must_use]
    pub fn priority(&self) -> i32 {
        self.options
            .get(crate::priority::OPTION)
            .map_or(crate::priority::DEFAULT, crate::priority::of_value)
    }

    /// Whether the message carries a priority of its own (the `troupe_priority` option).
    #[must_use]
    pub fn has_priority(&self) -> bool {
        self.options.contains_key(crate::priority::OPTION)
    }

    /// Sets the priority (clamped into range). Priority 0 removes the option, so the message
    /// stays exactly what Python Dramatiq sends.
    #[must_use]
    pub fn with_priority(mut self, priority: i32) -> Self {
        match crate::priority::clamp(i64::from(priority)) {
            0 => {
                self.options.shift_remove(crate::priority::OPTION);
            }
            p => {
                self.options.insert(crate::priority::OPTION.into(), p.into());
            }
        }
        self
    }

    /// How many times this message has failed so far (`options.retries`; 0 when absent).
    #[must_use]
    pub fn retries(&self) -> u64 {
        self.option_u64(option_keys::RETRIES).unwrap_or(0)
    }

    /// Sets `options.retries`.
    pub fn set_retries(&mut self, retries: u64) {
        self.options.insert(option_keys::RETRIES.into(), retries.into());
    }

    /// This message's `max_retries` (0: no retry), when it sets one.
    #[must_use]
    pub fn max_retries(&self) -> Option<u64> {
        self.option_u64(option_keys::MAX_RETRIES)
    }

    /// This message's `min_backoff` (0: retry at once), when it sets one.
    #[must_use]
    pub fn min_backoff(&self) -> Option<Duration> {
        self.option_duration(option_keys::MIN_BACKOFF)
    }

    /// This message's `max_backoff` (0: retry at once), when it sets one.
    #[must_use]
    pub fn max_backoff(&self) -> Option<Duration> {
        self.option_duration(option_keys::MAX_BACKOFF)
    }

    /// This message's `time_limit` (0: no limit), when it sets one.
    #[must_use]
    pub fn time_limit(&self) -> Option<Duration> {
        self.option_duration(option_keys::TIME_LIMIT)
    }

    /// This message's `max_age` (0: no limit), when it sets one.
    #[must_use]
    pub fn max_age(&self) -> Option<Duration> {
        self.option_duration(option_keys::MAX_AGE)
    }

    /// This message's `store_results`, when it sets one.
    #[must_use]
    pub fn store_results(&self) -> Option<bool> {
        self.option_bool(option_keys::STORE_RESULTS)
    }

    /// This message's `result_ttl`, when it sets one.
    #[must_use]
    pub fn result_ttl(&self) -> Option<Duration> {
        self.option_duration(option_keys::RESULT_TTL)
    }

    /// This message's `on_success` callback actor, when it names one.
    #[must_use]
    pub fn on_success(&self) -> Option<&str> {
        self.option_str(option_keys::ON_SUCCESS)
    }

    /// This message's `on_failure` callback actor, when it names one.
    #[must_use]
    pub fn on_failure(&self) -> Option<&str> {
        self.option_str(option_keys::ON_FAILURE)
    }

    /// This message's `on_retry_exhausted` callback actor, when it names one.
    #[must_use]
    pub fn on_retry_exhausted(&self) -> Option<&str> {
        self.option_str(option_keys::ON_RETRY_EXHAUSTED)
    }

    /// This message's `notify_shutdown`, when it sets one.
    #[must_use]
    pub fn notify_shutdown(&self) -> Option<bool> {
        self.option_bool(option_keys::NOTIFY_SHUTDOWN)
    }

    /// The last failure's traceback, or the reason the message was dead-lettered.
    #[must_use]
    pub fn traceback(&self) -> Option<&str> {
        self.option_str(option_keys::TRACEBACK)
    }

    /// Sets the `traceback` option.
    pub fn set_traceback(&mut self, traceback: impl Into<String>) {
        self.options
            .insert(option_keys::TRACEBACK.into(), traceback.into().into());
    }

    /// When the last retry was enqueued (ms since the epoch).
    #[must_use]
    pub fn requeue_timestamp(&self) -> Option<u64> {
        self.option_u64(option_keys::REQUEUE_TIMESTAMP)
    }

    /// Sets the `requeue_timestamp` option (ms since the epoch).
    pub fn set_requeue_timestamp(&mut self, at_ms: u64) {
        self.options.insert(option_keys::REQUEUE_TIMESTAMP.into(), at_ms.into());
    }

    /// The next pipeline stage (`pipe_target`: a message as a JSON object), when there is one.
    #[must_use]
    pub fn pipe_target(&self) -> Option<&Value> {
        self.options.get(option_keys::PIPE_TARGET).filter(|v| !v.is_null())
    }

    /// Sets the next pipeline stage (`pipe_target`).
    pub fn set_pipe_target(&mut self, next: &Message) {
        self.options.insert(option_keys::PIPE_TARGET.into(), next.to_value());
    }

    /// Whether this pipeline stage ignores the previous stage's result, when it says.
    #[must_use]
    pub fn pipe_ignore(&self) -> Option<bool> {
        self.option_bool(option_keys::PIPE_IGNORE)
    }

    /// The delay a pipeline applies when it enqueues this message as its next stage (0: none),
    /// when the message sets one ([`with_delay`](Self::with_delay)).
    #[must_use]
    pub fn delay(&self) -> Option<Duration> {
        self.option_duration(option_keys::DELAY)
    }

    /// The Redis broker's id of the message, when a Redis broker gave it one.
    #[must_use]
    pub fn redis_message_id(&self) -> Option<&str> {
        self.option_str(option_keys::REDIS_MESSAGE_ID)
    }

    /// Sets the Redis broker's id of the message.
    pub fn set_redis_message_id(&mut self, id: impl Into<String>) {
        self.options
            .insert(option_keys::REDIS_MESSAGE_ID.into(), id.into().into());
    }

    /// Dramatiq's RabbitMQ priority (`broker_priority`: the AMQP priority, higher first), when
    /// the message sets one.
    #[must_use]
    pub fn broker_priority(&self) -> Option<u64> {
        self.option_u64(option_keys::BROKER_PRIORITY)
    }

    /// The message as a JSON object (Dramatiq's `asdict()`), for callbacks and pipelines.
    #[must_use]
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// A message from a JSON object such as `options.pipe_target`.
    ///
    /// # Errors
    /// [`crate::Error::Decode`] when the value is not a message.
    pub fn from_value(value: Value) -> crate::Result<Self> {
        serde_json::from_value(value).map_err(|e| crate::Error::Decode(e.to_string()))
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn f64_to_u64(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 { v as u64 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_and_timestamps() {
        let m = Message::new("default", "add", vec![json!(1)], Map::new());
        assert_eq!(m.message_id.len(), 36);
        assert_eq!(
            uuid::Uuid::parse_str(&m.message_id).map(|u| u.get_version_num()).ok(),
            Some(4)
        );
        assert!(m.message_timestamp > 1_600_000_000_000);
    }

    #[test]
    fn option_lookups() {
        let m = Message::new("q.DQ", "a", vec![], Map::new())
            .with_option("eta", Value::Null)
            .with_option("retries", 3)
            .with_option("pipe_ignore", 0);
        assert_eq!(m.eta(), None);
        assert_eq!(m.retries(), 3);
        assert_eq!(m.option_bool("pipe_ignore"), Some(false));
        assert_eq!(m.canonical_queue(), "q");
        let m = m.with_option("eta", "soon");
        assert!(m.eta().is_some());
    }

    /// The one rule: absent, `null` or ill-typed is not set; a number is the value, 0 included.
    #[test]
    fn zero_is_a_value_and_null_is_unset() {
        let bare = Message::new("q", "a", vec![], Map::new());
        let nulls = bare
            .clone()
            .with_option(option_keys::MAX_RETRIES, Value::Null)
            .with_option(option_keys::TIME_LIMIT, Value::Null)
            .with_option(option_keys::STORE_RESULTS, Value::Null)
            .with_option(option_keys::ON_SUCCESS, "")
            .with_option(option_keys::MIN_BACKOFF, "15s");
        for m in [&bare, &nulls] {
            assert_eq!(m.max_retries(), None);
            assert_eq!(m.time_limit(), None);
            assert_eq!(m.min_backoff(), None);
            assert_eq!(m.store_results(), None);
            assert_eq!(m.on_success(), None);
        }
        let zeros = bare
            .with_option(option_keys::MAX_RETRIES, 0)
            .with_option(option_keys::MIN_BACKOFF, 0)
            .with_option(option_keys::MAX_BACKOFF, 0)
            .with_option(option_keys::TIME_LIMIT, 0)
            .with_option(option_keys::MAX_AGE, 0.0)
            .with_option(option_keys::RESULT_TTL, -5)
            .with_option(option_keys::ETA, 0)
            .with_option(option_keys::DELAY, 0)
            .with_option(option_keys::STORE_RESULTS, 0)
            .with_option(option_keys::NOTIFY_SHUTDOWN, 1);
        assert_eq!(zeros.max_retries(), Some(0));
        assert_eq!(zeros.min_backoff(), Some(Duration::ZERO));
        assert_eq!(zeros.max_backoff(), Some(Duration::ZERO));
        assert_eq!(zeros.time_limit(), Some(Duration::ZERO));
        assert_eq!(zeros.max_age(), Some(Duration::ZERO));
        assert_eq!(zeros.result_ttl(), Some(Duration::ZERO), "negative counts as 0");
        assert_eq!(zeros.eta(), Some(0));
        assert_eq!(zeros.delay(), Some(Duration::ZERO));
        assert_eq!(zeros.store_results(), Some(false));
        assert_eq!(zeros.notify_shutdown(), Some(true));
    }

    #[test]
    fn setters_write_dramatiqs_keys() {
        let mut m = Message::new("q", "a", vec![], Map::new());
        m.set_eta(5);
        m.set_retries(2);
        m.set_traceback("E: x");
        m.set_requeue_timestamp(7);
        m.set_redis_message_id("rid");
        let next = Message::new("q", "b", vec![], Map::new());
        m.set_pipe_target(&next);
        assert_eq!(
            m.options.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "eta",
                "retries",
                "traceback",
                "requeue_timestamp",
                "redis_message_id",
                "pipe_target"
            ]
        );
        assert_eq!((m.eta(), m.retries(), m.traceback()), (Some(5), 2, Some("E: x")));
        assert_eq!(m.requeue_timestamp(), Some(7));
        assert_eq!(m.redis_message_id(), Some("rid"));
        assert_eq!(m.pipe_target(), Some(&next.to_value()));
        m.clear_eta();
        assert_eq!(m.eta(), None);
        assert!(!m.options.contains_key("eta"));
    }

    #[test]
    fn priorities() {
        let m = Message::new("q", "a", vec![], Map::new());
        assert_eq!((m.priority(), m.has_priority()), (0, false));
        let m = m.with_priority(-50);
        assert_eq!(m.options.get("troupe_priority"), Some(&json!(-10)));
        assert_eq!(m.priority(), -10);
        let m = m.with_priority(0);
        assert!(!m.has_priority(), "priority 0 is no option at all");
        let m = m.with_option("troupe_priority", 99);
        assert_eq!(m.priority(), 10);
    }
}
