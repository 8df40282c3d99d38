//! Core types of [Troupe](https://docs.rs/troupe): messages, actors, the broker, middleware,
//! results and state backend traits, encoders, Dramatiq's built-in middleware, and the in-memory
//! broker and backends.
//!
//! Write a broker or a middleware against this crate alone; applications use the `troupe`
//! facade.

mod actor;
mod app;
mod broker;
mod composition;
mod encoder;
mod error;
pub mod limits;
pub mod memory;
mod message;
pub mod middleware;
pub mod periodic;
pub mod priority;
pub mod queue;
mod results;
mod state;
pub mod support;
pub mod tasks;
pub mod tls;

pub use actor::{
    Actor, ActorError, ActorOptions, BAD_ARGUMENTS, DEFAULT_QUEUE, DynActor, ErrorAction, ErrorPredicate, RetryWhen,
    bind_arguments, encode_args,
};
pub use app::{App, AppBuilder, JoinOptions, SendOptions, Sent};
pub use broker::{
    AckHandle, Broker, Capabilities, Consumer, ConsumerOptions, DEFAULT_MAX_MESSAGE_SIZE, DeadLetter, Delivery,
    QueueStats, Waiting, WorkerInfo, decode_delivery, encode_checked, prepare_for_delay_queue,
};
pub use composition::{GROUP_BARRIER_TTL, Group, GroupChild, Pipeline, Stage, group, pipeline};
pub use encoder::{Encoder, JsonEncoder, MsgPackEncoder, python_float_repr};
pub use error::{BoxError, Error, ErrorKind, Result, redact_url};
pub use memory::{MemoryBroker, MemoryResults, MemoryState};
pub use message::{Message, Options, duration_ms, new_message_id, now_ms, option_keys};
pub use middleware::{
    Middleware, MiddlewareStack, Next, Outcome, ProcessContext, StopReason, TaskHandle, current_app, current_message,
    current_task,
};
pub use results::{
    DEFAULT_RESULT_TTL, FAILURE_CANARY, RESULTS_NAMESPACE, ResultBackend, result_key, unwrap_result, wrap_failure,
};
pub use state::{Arrival, BarrierKey, Coordination, SlotKey, StateBackend};
pub use tasks::{
    CancelMode, CancelOutcome, TaskCounts, TaskCursor, TaskFilter, TaskPage, TaskQuery, TaskRecord, TaskStatus,
    TaskStore, TaskUpdate,
};

pub use async_trait::async_trait;
/// The one table of actor options (names, kinds, defaults, readers), which the `#[actor]` macro
/// and [`AppBuilder::build`] check against.
pub use troupe_options as options;

/// Items the `#[actor]` macro's output uses. Not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::middleware::current_message::Scope;
    pub use crate::periodic::MissedTicks;
    pub use futures::future::BoxFuture;
    pub use serde;
    pub use serde_json;
    pub use serde_json::Value;
    pub use std::time::Duration;

    use crate::actor::ActorError;

    /// Decodes one positional argument, naming it in the error.
    ///
    /// # Errors
    /// Which argument did not fit, and why.
    pub fn decode_arg<T: serde::de::DeserializeOwned>(
        value: Option<Value>,
        name: &str,
        position: usize,
    ) -> Result<T, String> {
        let value = value.unwrap_or(Value::Null);
        serde_json::from_value(value).map_err(|e| format!("argument {name:?} (position {position}): {e}"))
    }

    /// Runs a sync actor on the blocking pool, with the current message available to it; a
    /// panic is a failure.
    ///
    /// # Errors
    /// The actor's error, or a `Panic` failure.
    pub async fn run_blocking<T, F>(f: F) -> Result<T, ActorError>
    where
        F: FnOnce() -> Result<T, ActorError> + Send + 'static,
        T: Send + 'static,
    {
        let scope = Scope::capture();
        match tokio::task::spawn_blocking(move || scope.run(f)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => {
                let panic = e.into_panic();
                let text = panic
                    .downcast_ref::<&str>()
                    .map(ToString::to_string)
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "actor panicked".into());
                Err(ActorError::new(crate::middleware::error_types::PANIC, text))
            }
            Err(e) => Err(ActorError::new("Cancelled", e.to_string())),
        }
    }
}
