//! Actors: named functions with options, and the errors they return.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The default queue of an actor.
pub const DEFAULT_QUEUE: &str = troupe_options::defaults::QUEUE_NAME;

/// A predicate over an actor's error, for `retry_when` and `throws`.
pub type ErrorPredicate = Arc<dyn Fn(&ActorError) -> bool + Send + Sync>;
/// Dramatiq's `retry_when(retries, exception)`: whether to retry after the given number of
/// failed attempts.
pub type RetryWhen = Arc<dyn Fn(u64, &ActorError) -> bool + Send + Sync>;

/// An actor's options: where its messages go and how the middleware treats them.
///
/// A message option of the same name (sent with the message) wins over the actor option, which
/// wins over the middleware default, as in Dramatiq. The options, their defaults and the
/// middleware reading each are one table, [`troupe_options::ACTOR_OPTIONS`] (also in the
/// README and the `#[actor]` docs); `App::build` rejects an option whose middleware the app
/// does not have. A 0 is a value, never "not set": a `time_limit` or `max_age` of
/// `Duration::ZERO` is no limit, `max_retries(0)` no retry, a zero backoff a retry at once.
#[derive(Clone)]
#[non_exhaustive]
pub struct ActorOptions {
    /// The queue the actor's messages go to (default `"default"`).
    pub queue_name: String,
    /// The priority of the actor's messages: lower runs first (Dramatiq's direction), default
    /// 0, in -10..=10 (clamped where read; see [`crate::priority`]). Sending sets it as the
    /// message's `troupe_priority` option unless the message has a priority of its own, so the
    /// broker itself runs the actor's messages in that order; a worker also orders what it
    /// prefetched by it (messages without `troupe_priority`, such as Python's, by the actor's).
    pub priority: i32,
    /// Retries before the message is dead-lettered (Retries middleware; default 20).
    pub max_retries: Option<u64>,
    /// The first retry's base delay (default 15 s).
    pub min_backoff: Option<Duration>,
    /// The longest retry delay (default 7 days).
    pub max_backoff: Option<Duration>,
    /// Retry only while this returns true (replaces `max_retries`).
    pub retry_when: Option<RetryWhen>,
    /// Errors that are failures without retry.
    pub throws: Option<ErrorPredicate>,
    /// Actor to send `(message, {"retries", "max_retries"})` when retries run out.
    pub on_retry_exhausted: Option<String>,
    /// The actor's time limit (TimeLimit middleware; default 10 minutes; zero: no limit).
    pub time_limit: Option<Duration>,
    /// When the actor is told to wrap up before its time limit (its
    /// [`TaskHandle`](crate::TaskHandle) stops with `SoftTimeLimit`; TimeLimit middleware).
    pub soft_time_limit: Option<Duration>,
    /// Sending a message with the same arguments while one is pending or running returns the
    /// first one's id instead (at most this long; needs a state backend that keeps task
    /// states).
    pub unique_for: Option<Duration>,
    /// Messages older than this are dead-lettered instead of run (AgeLimit middleware; zero: no
    /// limit).
    pub max_age: Option<Duration>,
    /// Store the actor's return value in the results backend.
    pub store_results: Option<bool>,
    /// How long stored results live (default 10 minutes).
    pub result_ttl: Option<Duration>,
    /// Actor to send `(message, result)` after each success.
    pub on_success: Option<String>,
    /// Actor to send `(message, {"type", "message"})` after each failed attempt.
    pub on_failure: Option<String>,
    /// Do not append this actor's result to the next pipeline stage's arguments.
    pub pipe_ignore: bool,
    /// Cancel the actor when the worker begins to shut down (ShutdownNotifications middleware).
    pub notify_shutdown: bool,
    /// A periodic actor's cron expression, with seconds (see [`crate::periodic`]).
    pub cron: Option<String>,
    /// A periodic actor's period, counted from the Unix epoch (see [`crate::periodic`]).
    pub every: Option<Duration>,
    /// The IANA time zone `cron` is read in (default UTC).
    pub timezone: Option<String>,
    /// What a periodic actor does with ticks missed while no worker ran (default skip).
    pub missed: Option<crate::periodic::MissedTicks>,
    /// Options for user middleware, checked against every middleware's `actor_options()` when
    /// the app is built.
    pub extra: Map<String, Value>,
}

impl Default for ActorOptions {
    fn default() -> Self {
        Self {
            queue_name: DEFAULT_QUEUE.to_owned(),
            priority: 0,
            max_retries: None,
            min_backoff: None,
            max_backoff: None,
            retry_when: None,
            throws: None,
            on_retry_exhausted: None,
            time_limit: None,
            soft_time_limit: None,
            unique_for: None,
            max_age: None,
            store_results: None,
            result_ttl: None,
            on_success: None,
            on_failure: None,
            pipe_ignore: false,
            notify_shutdown: false,
            cron: None,
            every: None,
            timezone: None,
            missed: None,
            extra: Map::new(),
        }
    }
}

impl fmt::Debug for ActorOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActorOptions")
            .field("queue_name", &self.queue_name)
            .field("priority", &self.priority)
            .field("max_retries", &self.max_retries)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("retry_when", &self.retry_when.as_ref().map(|_| ".."))
            .field("throws", &self.throws.as_ref().map(|_| ".."))
            .field("on_retry_exhausted", &self.on_retry_exhausted)
            .field("time_limit", &self.time_limit)
            .field("soft_time_limit", &self.soft_time_limit)
            .field("unique_for", &self.unique_for)
            .field("max_age", &self.max_age)
            .field("store_results", &self.store_results)
            .field("result_ttl", &self.result_ttl)
            .field("on_success", &self.on_success)
            .field("on_failure", &self.on_failure)
            .field("pipe_ignore", &self.pipe_ignore)
            .field("notify_shutdown", &self.notify_shutdown)
            .field("cron", &self.cron)
            .field("every", &self.every)
            .field("timezone", &self.timezone)
            .field("missed", &self.missed)
            .field("extra", &self.extra)
            .finish()
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty => $field:ident = $conv:expr;)*) => {
        $(
            $(#[$doc])*
            #[must_use]
            pub fn $name(mut self, value: $ty) -> Self {
                #[allow(clippy::redundant_closure_call)]
                { self.$field = ($conv)(value); }
                self
            }
        )*
    };
}

impl ActorOptions {
    /// Default options (queue `"default"`, priority 0, middleware defaults for the rest).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    setters! {
        /// Sets the queue.
        queue_name: impl Into<String> => queue_name = Into::into;
        /// Sets the priority (lower runs first; clamped into -10..=10).
        priority: i32 => priority = |v| crate::priority::clamp(i64::from(v));
        /// Sets `max_retries`.
        max_retries: u64 => max_retries = Some;
        /// Sets `min_backoff`.
        min_backoff: Duration => min_backoff = Some;
        /// Sets `max_backoff`.
        max_backoff: Duration => max_backoff = Some;
        /// Sets the time limit.
        time_limit: Duration => time_limit = Some;
        /// Sets the soft time limit.
        soft_time_limit: Duration => soft_time_limit = Some;
        /// Sets `unique_for`.
        unique_for: Duration => unique_for = Some;
        /// Sets the maximum age.
        max_age: Duration => max_age = Some;
        /// Sets `store_results`.
        store_results: bool => store_results = Some;
        /// Sets `result_ttl`.
        result_ttl: Duration => result_ttl = Some;
        /// Sets the `on_success` callback actor.
        on_success: impl Into<String> => on_success = |v: _| Some(Into::into(v));
        /// Sets the `on_failure` callback actor.
        on_failure: impl Into<String> => on_failure = |v: _| Some(Into::into(v));
        /// Sets the `on_retry_exhausted` callback actor.
        on_retry_exhausted: impl Into<String> => on_retry_exhausted = |v: _| Some(Into::into(v));
        /// Sets `pipe_ignore`.
        pipe_ignore: bool => pipe_ignore = |v| v;
        /// Sets `notify_shutdown`.
        notify_shutdown: bool => notify_shutdown = |v| v;
        /// Makes the actor periodic on a cron schedule, with seconds (`"0 */5 * * * *"`).
        cron: impl Into<String> => cron = |v: _| Some(Into::into(v));
        /// Makes the actor periodic: a message every `period`, counted from the Unix epoch.
        every: Duration => every = Some;
        /// Sets the time zone `cron` is read in (an IANA name such as `"Europe/Paris"`).
        timezone: impl Into<String> => timezone = |v: _| Some(Into::into(v));
        /// Sets what a periodic actor does with ticks missed while no worker ran.
        missed: crate::periodic::MissedTicks => missed = Some;
    }

    /// Retries only while `f(retries_so_far, error)` is true.
    #[must_use]
    pub fn retry_when(mut self, f: impl Fn(u64, &ActorError) -> bool + Send + Sync + 'static) -> Self {
        self.retry_when = Some(Arc::new(f));
        self
    }

    /// Errors matching `f` fail without retry (Dramatiq's `throws`).
    #[must_use]
    pub fn throws(mut self, f: impl Fn(&ActorError) -> bool + Send + Sync + 'static) -> Self {
        self.throws = Some(Arc::new(f));
        self
    }

    /// Sets an option that a user middleware declared in its `actor_options()`.
    #[must_use]
    pub fn extra(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }

    /// The names of the options set here, in the table's order (`queue_name` and `priority`
    /// always, the others when set), then the keys of `extra`: what `App::build` checks
    /// against the app's middleware.
    #[must_use]
    pub fn option_names(&self) -> Vec<&str> {
        // Exhaustive on purpose: a new field does not compile until it is named here (and a
        // test checks these names against the options table).
        let Self {
            queue_name: _,
            priority: _,
            max_retries,
            min_backoff,
            max_backoff,
            retry_when,
            throws,
            on_retry_exhausted,
            time_limit,
            soft_time_limit,
            unique_for,
            max_age,
            store_results,
            result_ttl,
            on_success,
            on_failure,
            pipe_ignore,
            notify_shutdown,
            cron,
            every,
            timezone,
            missed,
            extra,
        } = self;
        [
            ("queue_name", true),
            ("priority", true),
            ("max_retries", max_retries.is_some()),
            ("min_backoff", min_backoff.is_some()),
            ("max_backoff", max_backoff.is_some()),
            ("time_limit", time_limit.is_some()),
            ("soft_time_limit", soft_time_limit.is_some()),
            ("max_age", max_age.is_some()),
            ("unique_for", unique_for.is_some()),
            ("result_ttl", result_ttl.is_some()),
            ("store_results", store_results.is_some()),
            ("pipe_ignore", *pipe_ignore),
            ("notify_shutdown", *notify_shutdown),
            ("on_success", on_success.is_some()),
            ("on_failure", on_failure.is_some()),
            ("on_retry_exhausted", on_retry_exhausted.is_some()),
            ("retry_when", retry_when.is_some()),
            ("throws", throws.is_some()),
            ("cron", cron.is_some()),
            ("every", every.is_some()),
            ("timezone", timezone.is_some()),
            ("missed", missed.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| name)
        .chain(extra.keys().map(String::as_str))
        .collect()
    }
}

/// What an actor's failure asks the worker to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorAction {
    /// A normal failure: the Retries middleware decides.
    Fail,
    /// Retry, after the given delay if any (Dramatiq's `Retry`).
    Retry(Option<Duration>),
    /// Fail now, no retry: straight to the dead letters.
    FailPermanently,
    /// Skip the message: acked, no retry, no failure.
    Skip,
}

/// The error an actor returns.
///
/// Any `std::error::Error` converts with `?`. Like `anyhow::Error` it does not implement
/// `std::error::Error` itself.
///
/// # Type names
///
/// Every `ActorError` has a type name, which plays the part of a Python exception's class: it
/// is `exn.type` in a stored failure result (`{"__t": "dramatiq.results.Result", "exn": {"type",
/// "msg"}}`, what a Python peer's `get_result` raises), `type` in `on_failure` callbacks, the
/// first word of tracebacks and dead-letter reasons, and what `retry_when` and `throws` test.
///
/// - [`ActorError::new`] and [`with_type_name`](ActorError::with_type_name) use the name given.
/// - [`ActorError::msg`] and [`ActorError::from_boxed`] use `"Error"`.
/// - `From<E>` (what `?` uses) uses the last path segment of `E`'s Rust type, without generic
///   arguments: `ParseIntError` for `std::num::ParseIntError`, `MyError` for
///   `my_crate::MyError<T>`. The text comes from [`std::any::type_name`], whose exact output Rust
///   does not promise, so only a plain identifier (letters, digits and `_`, not starting with a
///   digit) is ever used and anything else gives `"Error"`: a peer never sees a path, generic
///   arguments or punctuation. Where a name must never depend on the compiler (a Python peer
///   matches on it), name it: `ActorError::from(e).with_type_name("ValueError")`.
/// - The runtime's own failures use the names in
///   [`middleware::error_types`](crate::middleware::error_types).
pub struct ActorError {
    action: ErrorAction,
    type_name: Cow<'static, str>,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl ActorError {
    /// An error with an explicit type name and message.
    pub fn new(type_name: impl Into<Cow<'static, str>>, message: impl fmt::Display) -> Self {
        Self {
            action: ErrorAction::Fail,
            type_name: type_name.into(),
            message: message.to_string(),
            source: None,
        }
    }

    /// A plain failure with a message (type name `"Error"`).
    pub fn msg(message: impl fmt::Display) -> Self {
        Self::new("Error", message)
    }

    /// Converts a boxed error, keeping it as the source.
    #[must_use]
    pub fn from_boxed(error: Box<dyn std::error::Error + Send + Sync + 'static>) -> Self {
        Self {
            action: ErrorAction::Fail,
            type_name: Cow::Borrowed("Error"),
            message: error.to_string(),
            source: Some(error),
        }
    }

    /// Asks for a retry after `delay` instead of the computed backoff.
    #[must_use]
    pub fn retry_after(delay: Duration) -> Self {
        Self::new("Retry", format!("retry requested after {delay:?}")).with_action(ErrorAction::Retry(Some(delay)))
    }

    /// Fails the message now, with no retry: it goes to the dead letters with this reason.
    pub fn fail_permanently(error: impl Into<ActorError>) -> Self {
        error.into().with_action(ErrorAction::FailPermanently)
    }

    /// Skips the message: it is acked and nothing else happens.
    #[must_use]
    pub fn skip() -> Self {
        Self::new("SkipMessage", "message skipped").with_action(ErrorAction::Skip)
    }

    /// The same error under another type name (see [Type names](ActorError#type-names)).
    #[must_use]
    pub fn with_type_name(mut self, type_name: impl Into<Cow<'static, str>>) -> Self {
        self.type_name = type_name.into();
        self
    }

    /// The same error with another action.
    #[must_use]
    pub fn with_action(mut self, action: ErrorAction) -> Self {
        self.action = action;
        self
    }

    /// What the error asks for.
    #[must_use]
    pub fn action(&self) -> ErrorAction {
        self.action
    }

    /// The error's type name (`"ParseIntError"`, `"TimeLimitExceeded"`, ...).
    #[must_use]
    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    /// The error's message.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The underlying error, when the error was converted from one.
    #[must_use]
    pub fn source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }

    /// A traceback-like text for `options.traceback` and dead-letter reasons: the error and its
    /// chain of sources.
    #[must_use]
    pub fn traceback(&self) -> String {
        let mut out = format!("{}: {}", self.type_name, self.message);
        let mut next = self.source.as_deref().and_then(|s| s.source());
        while let Some(cause) = next {
            out.push_str("\n  caused by: ");
            out.push_str(&cause.to_string());
            next = cause.source();
        }
        out
    }
}

impl fmt::Display for ActorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.type_name, self.message)
    }
}

impl fmt::Debug for ActorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActorError")
            .field("action", &self.action)
            .field("type_name", &self.type_name)
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

impl<E> From<E> for ActorError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        Self {
            action: ErrorAction::Fail,
            type_name: short_type_name(std::any::type_name::<E>()),
            message: error.to_string(),
            source: Some(Box::new(error)),
        }
    }
}

/// The type name `From<E>` gives (see [Type names](ActorError#type-names)): the last `::`
/// segment of the leading path of `full` (which ends at generic arguments or any other type
/// syntax; `{{closure}}` segments of types declared in closures and async blocks are part of the
/// path), when it is a plain identifier; `"Error"` otherwise.
fn short_type_name(full: &str) -> Cow<'static, str> {
    let path = full
        .split(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | ':' | '{' | '}')))
        .next()
        .unwrap_or_default();
    let last = path.rsplit("::").next().unwrap_or_default();
    let mut chars = last.chars();
    let identifier =
        chars.next().is_some_and(|c| c.is_alphabetic() || c == '_') && chars.all(|c| c.is_alphanumeric() || c == '_');
    if identifier {
        Cow::Owned(last.to_owned())
    } else {
        Cow::Borrowed("Error")
    }
}

/// A function the worker runs when a message names it.
///
/// `#[troupe::actor]` implements this for a generated handle type; implementing it by hand is
/// just as supported.
///
/// ```
/// use troupe_core::{Actor, ActorError, ActorOptions};
///
/// struct Add;
///
/// impl Actor for Add {
///     type Args = (i64, i64);
///     type Output = i64;
///     fn name(&self) -> &str { "add" }
///     fn arg_names(&self) -> &[&str] { &["x", "y"] }
///     fn options(&self) -> ActorOptions { ActorOptions::new().queue_name("math") }
///     async fn call(&self, (x, y): (i64, i64)) -> Result<i64, ActorError> { Ok(x + y) }
/// }
/// ```
pub trait Actor: Send + Sync + 'static {
    /// The arguments, serialised as the positional `args` array (use a tuple).
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// What the actor returns (stored when results are on, passed down pipelines).
    type Output: Serialize + Send + 'static;

    /// The stable wire name. Never derived from a Rust path, so renaming code keeps queued
    /// messages valid.
    fn name(&self) -> &str;

    /// The parameter names, in order, so a message's `kwargs` bind by name. Empty means
    /// keyword arguments are not accepted.
    fn arg_names(&self) -> &[&str] {
        &[]
    }

    /// The actor's options.
    fn options(&self) -> ActorOptions {
        ActorOptions::default()
    }

    /// Turns the bound positional values into `Args`. The default deserialises the whole array
    /// (or `()` from an empty one); `#[actor]` decodes argument by argument to name the bad one.
    ///
    /// # Errors
    /// A message naming the argument that did not fit.
    fn decode_args(&self, values: Vec<Value>) -> Result<Self::Args, String> {
        let empty = values.is_empty();
        match serde_json::from_value(Value::Array(values)) {
            Ok(args) => Ok(args),
            Err(e) if empty => serde_json::from_value(Value::Null).map_err(|_| e.to_string()),
            Err(e) => Err(format!("arguments do not match the actor's parameters: {e}")),
        }
    }

    /// Runs the actor.
    fn call(&self, args: Self::Args) -> impl Future<Output = Result<Self::Output, ActorError>> + Send;
}

/// Serialises an actor's `Args` into the positional `args` array.
///
/// # Errors
/// [`crate::Error::Encode`] when the arguments cannot be serialised.
pub fn encode_args<T: Serialize>(args: &T) -> crate::Result<Vec<Value>> {
    match serde_json::to_value(args).map_err(|e| crate::Error::Encode(e.to_string()))? {
        Value::Null => Ok(Vec::new()),
        Value::Array(values) => Ok(values),
        other => Ok(vec![other]),
    }
}

/// Binds a message's positional `args` and `kwargs` to parameter names, as a Python call would.
///
/// Missing parameters become `null` (so `Option` parameters may be omitted; others then fail
/// to decode, naming the argument).
///
/// # Errors
/// Surplus positional arguments, unknown keyword arguments or a parameter given twice.
pub fn bind_arguments(
    names: &[&str],
    args: &[Value],
    kwargs: &Map<String, Value>,
) -> Result<(Vec<Value>, Vec<bool>), String> {
    if kwargs.is_empty() {
        if !names.is_empty() && args.len() > names.len() {
            return Err(format!(
                "takes {} positional argument(s) but {} were given",
                names.len(),
                args.len()
            ));
        }
        let mut present = vec![true; args.len()];
        let mut values = args.to_vec();
        while values.len() < names.len() {
            values.push(Value::Null);
            present.push(false);
        }
        return Ok((values, present));
    }
    if names.is_empty() {
        let key = kwargs.keys().next().map_or("", String::as_str);
        return Err(format!(
            "got an unexpected keyword argument {key:?} (this actor takes positional arguments only)"
        ));
    }
    if args.len() > names.len() {
        return Err(format!(
            "takes {} positional argument(s) but {} were given",
            names.len(),
            args.len()
        ));
    }
    let mut values = args.to_vec();
    let mut present = vec![true; args.len()];
    for name in &names[args.len()..] {
        match kwargs.get(*name) {
            Some(v) => {
                values.push(v.clone());
                present.push(true);
            }
            None => {
                values.push(Value::Null);
                present.push(false);
            }
        }
    }
    for key in kwargs.keys() {
        match names.iter().position(|n| n == key) {
            None => return Err(format!("got an unexpected keyword argument {key:?}")),
            Some(i) if i < args.len() => {
                return Err(format!("got multiple values for argument {key:?}"));
            }
            Some(_) => {}
        }
    }
    Ok((values, present))
}

/// An actor with its types erased, as the registry and the worker hold it.
pub trait DynActor: Send + Sync + 'static {
    /// The wire name.
    fn name(&self) -> &str;
    /// The options (computed once at registration).
    fn options(&self) -> &ActorOptions;
    /// Binds and decodes the message's arguments and runs the actor; the output is serialised
    /// to JSON. Bad arguments fail permanently.
    fn invoke(&self, args: &[Value], kwargs: &Map<String, Value>) -> BoxFuture<'static, Result<Value, ActorError>>;
}

impl fmt::Debug for dyn DynActor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynActor").field("name", &self.name()).finish()
    }
}

/// Wraps a typed [`Actor`] as a [`DynActor`].
pub(crate) struct Erased<A: Actor> {
    actor: Arc<A>,
    name: String,
    options: ActorOptions,
}

impl<A: Actor> Erased<A> {
    pub(crate) fn new(actor: A) -> Self {
        let name = actor.name().to_owned();
        let options = actor.options();
        Self {
            actor: Arc::new(actor),
            name,
            options,
        }
    }
}

/// The error type name of bad arguments (Python raises `TypeError`).
pub const BAD_ARGUMENTS: &str = "TypeError";

impl<A: Actor> DynActor for Erased<A> {
    fn name(&self) -> &str {
        &self.name
    }

    fn options(&self) -> &ActorOptions {
        &self.options
    }

    fn invoke(&self, args: &[Value], kwargs: &Map<String, Value>) -> BoxFuture<'static, Result<Value, ActorError>> {
        let bad = |reason: String| {
            ActorError::new(BAD_ARGUMENTS, format!("{}() {reason}", self.name))
                .with_action(ErrorAction::FailPermanently)
        };
        let names = self.actor.arg_names();
        let (values, present) = match bind_arguments(names, args, kwargs) {
            Ok(bound) => bound,
            Err(reason) => return futures::future::ready(Err(bad(reason))).boxed(),
        };
        let missing: Vec<&str> = names
            .iter()
            .zip(&present)
            .filter(|(_, p)| !**p)
            .map(|(n, _)| *n)
            .collect();
        let decoded = match self.actor.decode_args(values) {
            Ok(decoded) => decoded,
            Err(reason) if !missing.is_empty() => {
                return futures::future::ready(Err(bad(format!(
                    "missing required argument(s) {missing:?} ({reason})"
                ))))
                .boxed();
            }
            Err(reason) => return futures::future::ready(Err(bad(reason))).boxed(),
        };
        let actor = Arc::clone(&self.actor);
        async move {
            let output = actor.call(decoded).await?;
            serde_json::to_value(output)
                .map_err(|e| ActorError::new("EncodeError", format!("cannot serialise the actor's return value: {e}")))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kw(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn binds_kwargs_by_name() {
        let (v, p) = bind_arguments(&["x", "y"], &[json!(1)], &kw(json!({"y": 2}))).unwrap_or_default();
        assert_eq!(v, vec![json!(1), json!(2)]);
        assert_eq!(p, vec![true, true]);
        let (v, p) = bind_arguments(&["x", "y"], &[], &kw(json!({"y": 2}))).unwrap_or_default();
        assert_eq!(v, vec![Value::Null, json!(2)]);
        assert_eq!(p, vec![false, true]);
    }

    #[test]
    fn rejects_surplus_and_duplicates() {
        assert!(bind_arguments(&["x"], &[json!(1), json!(2)], &Map::new()).is_err());
        assert!(
            bind_arguments(&["x"], &[], &kw(json!({"z": 1})))
                .unwrap_err()
                .contains("\"z\"")
        );
        assert!(
            bind_arguments(&["x"], &[json!(1)], &kw(json!({"x": 1})))
                .unwrap_err()
                .contains("multiple")
        );
        assert!(bind_arguments(&[], &[], &kw(json!({"x": 1}))).is_err());
    }

    #[test]
    fn error_type_names() {
        let e: ActorError = "x".parse::<i32>().unwrap_err().into();
        assert_eq!(e.type_name(), "ParseIntError");
        assert_eq!(e.action(), ErrorAction::Fail);
        assert_eq!(ActorError::skip().action(), ErrorAction::Skip);
        assert_eq!(
            ActorError::fail_permanently(ActorError::msg("no")).action(),
            ErrorAction::FailPermanently
        );
    }

    #[test]
    fn type_names_are_plain_identifiers() {
        for (full, name) in [
            ("std::num::ParseIntError", "ParseIntError"),
            ("my_crate::errors::MyError<alloc::string::String>", "MyError"),
            ("my_crate::Wrapper<my_crate::Inner<u8>>", "Wrapper"),
            ("Local", "Local"),
            ("_Private", "_Private"),
            ("&str", "Error"),
            ("(u8, u16)", "Error"),
            ("[my::E; 2]", "Error"),
            ("my::f::{{closure}}", "Error"),
            ("tests::case::{{closure}}::CustomError", "CustomError"),
            ("my::f::{{closure}}::E<my::g::{{closure}}::F>", "E"),
            ("my::E::", "Error"),
            ("my::9lives", "Error"),
            ("", "Error"),
        ] {
            assert_eq!(short_type_name(full), name, "{full}");
        }
        // A user-defined error type, through `?`.
        #[derive(Debug)]
        struct Generic<T>(T);
        impl<T: fmt::Debug> fmt::Display for Generic<T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
        impl<T: fmt::Debug> std::error::Error for Generic<T> {}
        let e = ActorError::from(Generic(vec![1_u8]));
        assert_eq!(e.type_name(), "Generic");
        assert_eq!(e.message(), "[1]");
        let in_closure = || {
            #[derive(Debug)]
            struct Declared;
            impl fmt::Display for Declared {
                fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("declared in a closure")
                }
            }
            impl std::error::Error for Declared {}
            ActorError::from(Declared)
        };
        let e = in_closure();
        assert_eq!(e.type_name(), "Declared", "a type path with a {{{{closure}}}} segment");
        let named = ActorError::from(Generic(0_u8)).with_type_name("ValueError");
        assert_eq!(named.type_name(), "ValueError");
        assert_eq!(named.to_string(), "ValueError: 0");
    }

    /// `ActorOptions`' fields are the table's options: every one set names exactly the rows
    /// that are `ActorOptions` options, in the table's order.
    #[test]
    fn option_fields_are_the_tables_options() {
        let all = ActorOptions::new()
            .queue_name("q")
            .priority(1)
            .max_retries(1)
            .min_backoff(Duration::ZERO)
            .max_backoff(Duration::ZERO)
            .time_limit(Duration::ZERO)
            .soft_time_limit(Duration::ZERO)
            .max_age(Duration::ZERO)
            .unique_for(Duration::ZERO)
            .result_ttl(Duration::ZERO)
            .store_results(true)
            .pipe_ignore(true)
            .notify_shutdown(true)
            .on_success("a")
            .on_failure("b")
            .on_retry_exhausted("c")
            .retry_when(|_, _| true)
            .throws(|_| true)
            .cron("0 * * * * *")
            .every(Duration::from_secs(1))
            .timezone("UTC")
            .missed(crate::periodic::MissedTicks::RunOnce);
        let table: Vec<&str> = troupe_options::ACTOR_OPTIONS
            .iter()
            .filter(|o| o.in_actor_options())
            .map(|o| o.name)
            .collect();
        assert_eq!(all.option_names(), table);
        assert_eq!(ActorOptions::new().option_names(), ["queue_name", "priority"]);
        assert_eq!(
            ActorOptions::new().extra("rate", 3).option_names(),
            ["queue_name", "priority", "rate"]
        );
    }

    #[test]
    fn encode_args_shapes() {
        assert_eq!(encode_args(&()).unwrap_or_default(), Vec::<Value>::new());
        assert_eq!(encode_args(&(1, "a")).unwrap_or_default(), vec![json!(1), json!("a")]);
        assert_eq!(encode_args(&(5,)).unwrap_or_default(), vec![json!(5)]);
    }
}
