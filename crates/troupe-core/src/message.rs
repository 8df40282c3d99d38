//! The message: exactly Dramatiq's seven wire fields.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::queue;

/// A message's `options`: an order-preserving map whose unknown keys round-trip untouched.
pub type Options = Map<String, Value>;

/// A message, as it travels between producers and workers.
///
/// The fields and their order are Dramatiq's; a message encoded by Troupe's
/// [`JsonEncoder`](crate::JsonEncoder) is byte-identical to one Python Dramatiq encodes.
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
        self.with_option("delay", duration_ms(delay))
    }

    /// The canonical queue name (without `.DQ`).
    #[must_use]
    pub fn canonical_queue(&self) -> &str {
        queue::q_name(&self.queue_name)
    }

    /// An option as an unsigned integer; `null`, missing or non-numeric values give `None`.
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

    /// The `eta` option (ms since the epoch). `null` counts as absent; a value that is not a number
    /// counts as due now, as in Dramatiq.
    #[must_use]
    pub fn eta(&self) -> Option<u64> {
        match self.options.get("eta")? {
            Value::Null => None,
            Value::Number(_) => self.option_u64("eta"),
            other => {
                tracing::warn!(message_id = %self.message_id, eta = %other, "message has a non-numeric eta; treating it as due now");
                Some(now_ms())
            }
        }
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

    /// How many times this message has failed so far (`options.retries`).
    #[must_use]
    pub fn retries(&self) -> u64 {
        self.option_u64("retries").unwrap_or(0)
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
