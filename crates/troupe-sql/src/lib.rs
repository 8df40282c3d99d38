//! Not for direct use: the SQL broker, results and state backends that `troupe-sqlite` and
//! `troupe-postgres` share. Its API follows theirs and may change in any release; depend on
//! those crates (or the `troupe` facade) instead.
//!
//! The broker is written once here: job states, the writer that settles acks, nacks and
//! requeues in batches, leases and their fencing by attempt, claims, maintenance, dead
//! letters, the consumer (per-queue wake-ups and polling), and the results and state backends
//! (with the task store).
//! A backend supplies its statements as a [`Dialect`] (and a [`Store`] for results and state)
//! and its wake-up source (PostgreSQL's LISTEN; none on SQLite). Dispatch is static: the
//! broker is generic over its dialect.

mod broker;
mod consumer;
pub mod dialect;
mod results;
pub mod settings;
mod state;
pub mod tasks;

pub use broker::SqlBroker;
pub use dialect::{Claimed, DeadRow, Dialect, Job, Key, Store, Wake};
pub use results::SqlResults;
pub use settings::{Common, Setting, SqlOptions, ms, parse_query};
pub use state::SqlState;
pub use tasks::{TaskRow, TaskWhere, TaskWrite};

use troupe_core::Message;

/// The claim order of a message on a SQL broker: its priority ([`Message::priority`], the
/// `troupe_priority` option), lower first, 0 when absent or not a number, clamped into Troupe's
/// one range (`troupe_core::priority`, -10..=10), the same on every broker.
#[must_use]
pub fn priority_of(message: &Message) -> i64 {
    i64::from(message.priority())
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
        assert_eq!(priority_of(&m), 10);
        m.options.insert("troupe_priority".into(), (-11).into());
        assert_eq!(priority_of(&m), -10);
        m.options.insert("troupe_priority".into(), "high".into());
        assert_eq!(priority_of(&m), 0);
    }
}
