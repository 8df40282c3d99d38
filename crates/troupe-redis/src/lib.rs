//! Troupe's Redis backend: a broker with Python Dramatiq's key layout (so Python and Rust
//! workers share queues in both directions), and results and state backends with Dramatiq's key
//! schemes.
//!
//! ```no_run
//! # async fn run() -> troupe_core::Result<()> {
//! let broker = troupe_redis::RedisBroker::connect("redis://127.0.0.1:6379/0").await?;
//! # Ok(()) }
//! ```
//!
//! # Priorities
//!
//! A message at priority 0 (`troupe_core::priority`, the default) is stored exactly as Dramatiq
//! stores it: its id on the list `ns:q`, its body in the hash `ns:q.msgs`. A message at another
//! priority p (-10..=10, lower first) has its id `P<p>:<uuid4>` on a lane list `ns:q.P<p>`
//! (`ns:q.lanes` is the sorted set of lanes in use) and its body in `ns:q.msgs` as usual. A
//! fetch, one script call, takes from the negative lanes (most urgent first), then `ns:q`, then
//! the positive lanes. Requeued and recovered messages go back to their own lane; delayed ones
//! wait in the delay queue's lanes (`ns:q.DQ.P<p>`). Python Dramatiq workers do not read lanes,
//! so only Troupe workers run prioritized messages (Dramatiq's `join` still counts them, since
//! their bodies are in `ns:q.msgs`).

#[cfg(feature = "broker")]
mod broker;
mod cluster;
mod conn;
#[cfg(feature = "results")]
mod results;
mod sentinel;
#[cfg(feature = "results")]
mod state;
#[cfg(feature = "results")]
mod tasks;

#[cfg(feature = "broker")]
pub use broker::RedisBroker;
pub use conn::{RedisConnection, RedisOptions};
#[cfg(feature = "results")]
pub use results::RedisResults;
#[cfg(feature = "results")]
pub use state::RedisState;

/// The redis client this crate is built on.
pub use redis;

/// Entry points for the fuzz targets in `fuzz/` (not part of the API: they may change in any
/// release).
#[doc(hidden)]
pub mod fuzzing {
    /// Parses `bytes` as a RESP reply and reads it as Redis answers are read: as the fetch
    /// script's (id, body) pairs and as a task record's `HGETALL` fields. Returns whether the
    /// bytes parsed as a reply; must never panic.
    #[must_use]
    pub fn redis_reply(bytes: &[u8]) -> bool {
        let Ok(value) = redis::parse_redis_value(bytes) else {
            return false;
        };
        #[cfg(feature = "broker")]
        if let Ok(values) = redis::from_redis_value::<Vec<redis::Value>>(value.clone()) {
            let _ = crate::broker::read_fetch_reply(
                &troupe_core::JsonEncoder,
                values,
                troupe_core::DEFAULT_MAX_MESSAGE_SIZE,
            );
        }
        #[cfg(feature = "results")]
        if let Ok(fields) = redis::from_redis_value::<std::collections::HashMap<String, String>>(value) {
            let _ = crate::tasks::parse_record(&fields);
        }
        true
    }
}
