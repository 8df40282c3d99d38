//! # Troupe
//!
//! Background task processing for Rust in the model of Python's
//! [Dramatiq](https://dramatiq.io), and wire-compatible with it.
//!
//! Define actors, send them messages through a broker, and run workers that process them with
//! retries, delays, time limits, results, pipelines and middleware.
//!
//! ```
//! use std::time::Duration;
//! use troupe::prelude::*;
//!
//! #[troupe::actor(queue_name = "math", store_results = true, max_retries = 3)]
//! async fn add(x: i64, y: i64) -> i64 {
//!     x + y
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let app = App::builder(MemoryBroker::new().into_dyn())
//!     .results(MemoryResults::new().into_dyn())
//!     .actor(Add)
//!     .build()?;
//!
//! // Send a message: this is all a producer does.
//! let sent = Add.send(&app, 1, 2).await?;
//!
//! // Run a worker until the queue is drained (on any broker).
//! let worker = Worker::builder(app.clone()).concurrency(2).start().await?;
//! app.join("math", Duration::from_secs(5)).await?;
//! worker.stop().await;
//!
//! assert_eq!(sent.get_result(&app).await?, 3);
//! # Ok(())
//! # }
//! ```
//!
//! ## Features
//! | feature | default | what |
//! |---|---|---|
//! | `macros` | yes | the `#[actor]` attribute |
//! | `worker` | yes | the worker runtime ([`worker`]) |
//! | `broker-sqlite` | yes | the embedded SQLite broker (`sqlite://PATH`) |
//! | `results-sqlite` | yes | SQLite results and state backends |
//! | `broker-redis` | no | the Redis broker (`redis://`, `rediss://`), Dramatiq's layout |
//! | `results-redis` | no | Redis results and state backends, Dramatiq's keys |
//! | `broker-postgres` | no | the PostgreSQL broker (`postgres://`), transactional enqueue |
//! | `results-postgres` | no | PostgreSQL results and state backends |
//! | `broker-rabbitmq` | no | the RabbitMQ broker (`amqp://`), Dramatiq's topology |
//! | `prometheus` | no | Prometheus metrics with Dramatiq's names ([`prometheus`]), the worker flag `--metrics-bind` |
//! | `opentelemetry` | no | OpenTelemetry tracing across the queue ([`otel`]) |
//! | `full` | no | everything above |
//!
//! The in-memory broker is always available.

pub use troupe_core::middleware::{Cancellation, TaskTracking};
pub use troupe_core::{
    Actor, ActorError, ActorOptions, App, AppBuilder, Broker, Capabilities, Consumer, ConsumerOptions, DeadLetter,
    Delivery, Encoder, Error, ErrorAction, ErrorKind, Group, GroupChild, JoinOptions, JsonEncoder, MemoryBroker,
    MemoryResults, MemoryState, Message, Middleware, MiddlewareStack, MsgPackEncoder, Next, Outcome, Pipeline,
    ProcessContext, QueueStats, Result, ResultBackend, SendOptions, Sent, Stage, StateBackend, WorkerInfo, async_trait,
    current_app, current_message, group, now_ms, pipeline, redact_url, result_key, unwrap_result, wrap_failure,
};
pub use troupe_core::{
    CancelMode, CancelOutcome, StopReason, TaskCounts, TaskCursor, TaskFilter, TaskHandle, TaskPage, TaskQuery,
    TaskRecord, TaskStatus, TaskStore, current_task,
};
pub use troupe_core::{limits, memory, middleware, option_keys, options, periodic, priority, queue, tasks, tls};

/// Prometheus metrics with Dramatiq's names ([`troupe_prometheus`]).
#[cfg(feature = "prometheus")]
pub mod prometheus {
    pub use troupe_prometheus::*;
}

/// OpenTelemetry tracing across the queue ([`troupe_otel`]).
#[cfg(feature = "opentelemetry")]
pub mod otel {
    pub use troupe_otel::*;
}

/// The `#[actor]` attribute: turns a function into an actor.
///
/// See the crate docs for an example.
#[cfg(feature = "macros")]
pub use troupe_macros::actor;

/// The worker runtime.
#[cfg(feature = "worker")]
pub mod worker {
    pub use troupe_worker::*;
}

#[cfg(feature = "worker")]
pub use troupe_worker::Worker;

/// The Redis backend (`redis://HOST`), compatible with Python Dramatiq's.
#[cfg(any(feature = "broker-redis", feature = "results-redis"))]
pub mod redis {
    pub use troupe_redis::*;
}

/// The RabbitMQ broker (`amqp://`), compatible with Python Dramatiq's.
#[cfg(feature = "broker-rabbitmq")]
pub mod rabbitmq {
    pub use troupe_rabbitmq::*;
}

/// The PostgreSQL backend (`postgres://`), with transactional enqueue.
#[cfg(any(feature = "broker-postgres", feature = "results-postgres"))]
pub mod postgres {
    pub use troupe_postgres::*;
}

/// The embedded SQLite backend (`sqlite://PATH`).
#[cfg(any(feature = "broker-sqlite", feature = "results-sqlite"))]
pub mod sqlite {
    pub use troupe_sqlite::*;
}

#[cfg(feature = "worker")]
mod cli;
#[cfg(feature = "worker")]
pub use cli::{Backends, DEFAULT_BROKER_URL, run_worker, run_worker_status, run_worker_status_with, run_worker_with};

mod connect;
pub use connect::{connect, connect_results, connect_state};

/// The names most applications need: actors, the app, sending, middleware (with what a
/// [`Middleware::process`] hook names), results and state, and backends from URLs.
pub mod prelude {
    #[cfg(feature = "worker")]
    pub use crate::Worker;
    #[cfg(feature = "macros")]
    pub use crate::actor;
    pub use crate::limits::{Barrier, BucketRateLimiter, ConcurrentRateLimiter, WhenLimited, WindowRateLimiter};
    pub use crate::{
        Actor, ActorError, ActorOptions, App, Broker, JoinOptions, MemoryBroker, MemoryResults, Message, Middleware,
        Next, Outcome, ProcessContext, ResultBackend, SendOptions, Sent, Stage, StateBackend, async_trait, connect,
        connect_results, connect_state, current_app, current_message, group, pipeline,
    };
    pub use crate::{CancelMode, CancelOutcome, TaskFilter, TaskQuery, TaskStatus, TaskTracking, current_task};
}

/// Items the `#[actor]` macro's output uses. Not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use troupe_core::__private::*;
    pub use troupe_core::{Actor, ActorError, ActorOptions, App, Message, Result, SendOptions, Sent};
}
