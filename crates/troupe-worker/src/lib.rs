//! The Troupe worker runtime.
//!
//! A [`Worker`] consumes the queues of an [`App`](troupe_core::App)'s actors and runs their
//! messages through the middleware: `concurrency` messages at a time, a prefetch window per
//! queue, lower priority first (the message's, else its actor's), delayed messages held until
//! their eta, time limits, and a graceful shutdown that returns prefetched and delayed messages
//! to the broker.
//!
//! [`WorkerArgs`] gives an application's `main` Dramatiq-like command-line flags.

mod args;
mod delay;
mod periodic;
mod process;
mod supervise;
mod work;
mod worker;

pub use args::{WorkerArgs, exit_code, init_logging};
pub use supervise::{PROCESS_ENV, Supervisor, is_supervised};
pub use worker::{
    ADAPTIVE_PREFETCH_HOLD, ADAPTIVE_PREFETCH_MAX, DEFAULT_HEARTBEAT, DEFAULT_MAX_DELAY_PREFETCH, Worker,
    WorkerBuilder, WorkerHandle,
};
