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
// The table below is troupe_options::markdown_table(), the one table of actor options; the test
// options::tests::documented_tables_are_the_table fails when this copy differs from it.
/// | option | value | default | read by | what it does |
/// |---|---|---|---|---|
/// | `name` | a non-empty string | the function's name | the app | The wire name messages call the actor by; never derived from a Rust path. |
/// | `queue_name` | a queue name: `[a-zA-Z_][a-zA-Z0-9._-]*` | `"default"` | the app | The queue the actor's messages go to. |
/// | `priority` | an integer from -10 to 10 | `0` | the app | Lower runs first: every broker delivers by it and a worker orders what it prefetched by it. |
/// | `max_retries` | a `u64` | `20` | `Retries` | Retries before the message is dead-lettered; 0: no retry. |
/// | `min_backoff` | a duration | `"15s"` | `Retries` | The first retry's base delay, doubled per retry and randomised; 0: retry at once. |
/// | `max_backoff` | a duration | `"7days"` | `Retries` | The longest retry delay (at most 7 days); 0: retry at once. |
/// | `time_limit` | a duration | `"10m"` | `TimeLimit` | How long the actor may run before it fails with `TimeLimitExceeded`; 0: no limit. |
/// | `soft_time_limit` | a duration | none | `TimeLimit` | When the actor is told to wrap up (its task handle stops with `SoftTimeLimit`) before the hard limit. |
/// | `max_age` | a duration | none | `AgeLimit` | A message older than this is dead-lettered instead of run; 0: no limit. |
/// | `unique_for` | a duration | none | the app | While a message with the same arguments is pending or running (at most this long), sending another returns its id. |
/// | `result_ttl` | a duration | `"10m"` | `Results` | How long a stored result lives. |
/// | `store_results` | `true` or `false` | `false` | `Results` | Store the actor's return value (or its final failure) in the results backend. |
/// | `pipe_ignore` | `true` or `false` | `false` | `Pipelines` | Do not append the actor's result to the next pipeline stage's arguments. |
/// | `notify_shutdown` | `true` or `false` | `false` | `ShutdownNotifications` | Cancel the actor when its worker begins to shut down. |
/// | `on_success` | an actor's name | none | `Callbacks` | The actor sent `(message, result)` after each success. |
/// | `on_failure` | an actor's name | none | `Callbacks` | The actor sent `(message, {"type", "message"})` after each failed attempt. |
/// | `on_retry_exhausted` | an actor's name | none | `Retries` | The actor sent `(message, {"retries", "max_retries"})` when retries run out. |
/// | `retry_when` | a closure (`ActorOptions` only) | none | `Retries` | `Fn(retries, &ActorError) -> bool`: retry only while it returns true (instead of `max_retries`). |
/// | `throws` | a closure (`ActorOptions` only) | none | `Retries` | `Fn(&ActorError) -> bool`: errors it matches fail without retry. |
/// | `cron` | a cron expression with seconds, such as `"0 */5 * * * *"` | none | the app | Makes the actor periodic: a worker consuming its queue sends it one message (no arguments) at each tick, once across all workers (needs a state backend). |
/// | `every` | a duration | none | the app | Makes the actor periodic with a fixed period counted from the Unix epoch (`"5m"` ticks at :00, :05, ...), as `cron` does. |
/// | `timezone` | an IANA time zone, such as `"Europe/Paris"` | `"UTC"` | the app | The time zone `cron` is read in. |
/// | `missed` | `"skip"` or `"run_once"` | `"skip"` | the app | What a periodic actor does with ticks missed while no worker ran: skip them, or run once for them. |
/// | `crate` | a path such as `"::troupe"` | `"::troupe"` | the macro | `#[actor]` only: the path of the `troupe` crate, for a renamed dependency. |
///
/// A duration is a `Duration` in `ActorOptions`; in `#[actor]`, a string such as `"500ms"`, `"30s"`, `"5m"` or `"7days"`, or an integer number of milliseconds.
///
/// Option names, durations, the priority's range and the queue name are checked at compile
/// time; `retry_when` and `throws` take closures, which only a hand-written `Actor` can set.
#[proc_macro_attribute]
pub fn actor(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::actor(attr.into(), item.into()).into()
}
