//! Not for direct use: the SQL broker, results and state backends that `troupe-sqlite` and
//! `troupe-postgres` share. Its API follows theirs and may change in any release; depend on
//! those crates (or the `troupe` facade) instead.
//!
//! The broker is written once here: job states, the writer that settles acks, nacks and
//! requeues in batches, leases and their fencing by attempt, claims, maintenance, dead
//! letters, the consumer (per-queue wake-ups and polling), and the results and state backends.
//! A backend supplies its statements as a [`Dialect`] (and a [`Store`] for results and state)
//! and its wake-up source (PostgreSQL's LISTEN; none on SQLite). Dispatch is static: the
//! broker is generic over its dialect.

mod broker;
mod consumer;
pub mod dialect;
mod results;
pub mod settings;
mod state;

pub use broker::SqlBroker;
pub use dialect::{Claimed, DeadRow, Dialect, Job, Key, Store, Wake};
pub use results::SqlResults;
pub use settings::{Common, Setting, SqlOptions, ms, parse_query};
pub use state::SqlState;

use troupe_core::Message;

/// The claim order of a message on a SQL broker: its `troupe_priority` option, lower first,
/// 0 when absent or not an integer, clamped to the range of a 32-bit integer (the column type
/// on PostgreSQL), the same on every SQL backend.
#[must_use]
pub fn priority_of(message: &Message) -> i64 {
    message
        .options
        .get("troupe_priority")
        .and_then(serde_json::Value::as_i64)
        .map_or(0, |p| p.clamp(i64::from(i32::MIN), i64::from(i32::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_one_range() {
        let mut m = Message::new("default", "a", vec![], serde_json::Map::new());
        assert_eq!(priority_of(&m), 0);
        m.options.insert("troupe_priority".into(), 5.into());
        assert_eq!(priority_of(&m), 5);
        m.options.insert("troupe_priority".into(), i64::MAX.into());
        assert_eq!(priority_of(&m), i64::from(i32::MAX));
        m.options.insert("troupe_priority".into(), "high".into());
        assert_eq!(priority_of(&m), 0);
    }
}
