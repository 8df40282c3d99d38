//! Results backends: where actors' return values (and final failures) are stored.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use md5::{Digest, Md5};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::message::Message;
use crate::queue::q_name;

/// The namespace of result keys, as Dramatiq's.
pub const RESULTS_NAMESPACE: &str = "dramatiq-results";
/// The marker Dramatiq puts on stored failures.
pub const FAILURE_CANARY: &str = "dramatiq.results.Result";
/// Default time results are kept (10 minutes).
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_millis(troupe_options::defaults::RESULT_TTL_MS);

/// Stores and fetches results by message.
///
/// Values are stored as Dramatiq stores them: a success as the value itself, a failure as
/// `{"__t": "dramatiq.results.Result", "exn": {"type": T, "msg": M}}` (see [`wrap_failure`]).
#[async_trait]
pub trait ResultBackend: Send + Sync + fmt::Debug + 'static {
    /// Stores `value` (already wrapped) for `message`, kept for `ttl`.
    async fn store(&self, message: &Message, value: Value, ttl: Duration) -> Result<()>;

    /// Gets the stored value of `message`. With `timeout`, waits up to that long for it to
    /// appear ([`Error::ResultTimeout`]); without, [`Error::ResultMissing`] when absent.
    async fn get(&self, message: &Message, timeout: Option<Duration>) -> Result<Value>;
}

/// Dramatiq's result key: the md5 hex digest of `dramatiq-results:<q>:<actor>:<message_id>`
/// (`<q>` without `.DQ`).
#[must_use]
pub fn result_key(message: &Message) -> String {
    let raw = format!(
        "{RESULTS_NAMESPACE}:{}:{}:{}",
        q_name(&message.queue_name),
        message.actor_name,
        message.message_id
    );
    let digest = Md5::digest(raw.as_bytes());
    let mut out = String::with_capacity(32);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The stored form of a failure.
#[must_use]
pub fn wrap_failure(error_type: &str, message: &str) -> Value {
    json!({"__t": FAILURE_CANARY, "exn": {"type": error_type, "msg": message}})
}

/// Turns a stored value back into the result: a stored failure becomes
/// [`Error::ResultFailure`].
///
/// # Errors
/// [`Error::ResultFailure`] for a stored failure.
pub fn unwrap_result(value: Value) -> Result<Value> {
    if let Value::Object(map) = &value
        && map.get("__t").and_then(Value::as_str) == Some(FAILURE_CANARY)
    {
        let exn = map.get("exn");
        let field = |k: &str| {
            exn.and_then(|e| e.get(k))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        return Err(Error::ResultFailure {
            error_type: field("type"),
            message: field("msg"),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_md5_of_dramatiq_key() {
        let mut m = Message::new("default.DQ", "add", vec![], serde_json::Map::new());
        m.message_id = "00000000-0000-4000-8000-000000000000".into();
        // md5("dramatiq-results:default:add:00000000-0000-4000-8000-000000000000")
        let expected = format!(
            "{:x}",
            Md5::digest(b"dramatiq-results:default:add:00000000-0000-4000-8000-000000000000")
        );
        assert_eq!(result_key(&m), expected);
        assert_eq!(result_key(&m).len(), 32);
    }

    #[test]
    fn failures_round_trip() {
        let v = wrap_failure("ValueError", "bad");
        match unwrap_result(v) {
            Err(Error::ResultFailure { error_type, message }) => {
                assert_eq!((error_type.as_str(), message.as_str()), ("ValueError", "bad"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(unwrap_result(json!([1])).ok(), Some(json!([1])));
    }
}
