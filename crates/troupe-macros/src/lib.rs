//! The `#[actor]` attribute macro of [Troupe](https://docs.rs/troupe). Use it through the
//! `troupe` facade (`#[troupe::actor]`), whose `__private` module the generated code names.

mod expand;
mod options;

use proc_macro::TokenStream;

/// Turns a function into an actor.
///
/// The function stays as written and callable as before. Next to it the macro defines a unit
/// struct, the actor *handle*, named after the function in `PascalCase` (`send_welcome` gives
/// `SendWelcome`), which implements `troupe::Actor` and has typed methods:
///
/// * `Handle.send(&app, args...)` sends a message and returns a typed `Sent`;
/// * `Handle.send_with_options(&app, args..., options)` does so with per-message options;
/// * `Handle.message(args...)` builds the message without sending it (for pipelines).
///
/// ```text
/// #[troupe::actor(queue_name = "math", max_retries = 3, time_limit = "30s")]
/// async fn add(x: i64, y: i64) -> i64 {
///     x + y
/// }
///
/// let app = App::builder(broker).actor(Add).build()?;
/// let sent = Add.send(&app, 1, 2).await?;
/// ```
///
/// An `async fn` runs on the worker's runtime; a plain `fn` runs on the blocking thread pool,
/// where a panic becomes a failure. Parameters must be named (`x: T`) and owned (`String`,
/// not `&str`): they are deserialised from the message. The function returns a value `T`,
/// nothing, or a `Result<T, E>` whose error converts into `ActorError` (any
/// `std::error::Error + Send + Sync + 'static` does).
///
/// # Options
///
/// | option | value |
/// |---|---|
/// | `name` | the wire name (default: the function's name) |
/// | `queue_name` | the queue (default `"default"`; `[a-zA-Z_][a-zA-Z0-9._-]*`) |
/// | `priority` | an integer from -10 to 10, lower runs first (default 0); every broker honours it |
/// | `max_retries` | a `u64` |
/// | `min_backoff`, `max_backoff`, `time_limit`, `max_age`, `result_ttl` | a duration: a string such as `"500ms"`, `"30s"`, `"5m"`, `"7days"`, or an integer number of milliseconds |
/// | `store_results`, `pipe_ignore`, `notify_shutdown` | a `bool` |
/// | `on_success`, `on_failure`, `on_retry_exhausted` | the name of the callback actor |
/// | `crate` | the path of the `troupe` crate (default `::troupe`), for renamed dependencies |
///
/// Durations, the priority's range and the queue name are checked at compile time.
#[proc_macro_attribute]
pub fn actor(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::actor(attr.into(), item.into()).into()
}
