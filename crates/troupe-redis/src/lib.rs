//! Troupe's Redis backend: a broker with Python Dramatiq's key layout (so Python and Rust
//! workers share queues in both directions), and results and state backends with Dramatiq's key
//! schemes.
//!
//! ```no_run
//! # async fn run() -> troupe_core::Result<()> {
//! let broker = troupe_redis::RedisBroker::connect("redis://127.0.0.1:6379/0").await?;
//! # Ok(()) }
//! ```

#[cfg(feature = "broker")]
mod broker;
mod conn;
#[cfg(feature = "results")]
mod results;
#[cfg(feature = "results")]
mod state;

#[cfg(feature = "broker")]
pub use broker::RedisBroker;
pub use conn::RedisOptions;
#[cfg(feature = "results")]
pub use results::RedisResults;
#[cfg(feature = "results")]
pub use state::RedisState;

/// The redis client this crate is built on.
pub use redis;
