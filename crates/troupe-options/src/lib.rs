//! The one table of Troupe's actor options: each option's name, the kind of value it takes, its
//! default and who reads it.
//!
//! Everything else is derived from [`ACTOR_OPTIONS`]:
//!
//! - the `#[actor]` macro checks option names and values against it (the names it lists in
//!   its errors are the table's, in the table's order);
//! - `App::build` (troupe-core) rejects an actor option that no middleware of the app reads: the
//!   options the app itself reads ([`Reader::App`]) plus each middleware's `actor_options()`,
//!   which for the built-in middleware are their rows of this table ([`read_by`]);
//! - the built-in middleware take their defaults from [`defaults`];
//! - the option tables in the README and in the macro's documentation are
//!   [`markdown_table`]'s text (a test in troupe-macros fails when they differ).
//!
//! The crate has no dependencies, so the proc-macro crate and troupe-core both build on it.
//!
//! # Zero
//!
//! One rule for 0, for actor options and message options alike: a number is the value, 0
//! included, and never means "not set" (a message option that is absent or `null` is not set,
//! and the actor's option, then the middleware's default, applies). What 0 does is each
//! option's business and the table says it: `max_retries` 0 retries nothing, `min_backoff` and
//! `max_backoff` 0 retry at once, `time_limit` and `max_age` 0 set no limit.

use std::fmt::Write as _;
use std::sync::OnceLock;

/// The most urgent priority (`priority` and the `troupe_priority` message option).
pub const PRIORITY_MIN: i32 = -10;

/// The least urgent priority.
pub const PRIORITY_MAX: i32 = 10;

/// The built-in middleware, by the names [`Reader::Middleware`] gives them.
pub mod middleware {
    /// `AgeLimit`.
    pub const AGE_LIMIT: &str = "AgeLimit";
    /// `TimeLimit`.
    pub const TIME_LIMIT: &str = "TimeLimit";
    /// `ShutdownNotifications`.
    pub const SHUTDOWN_NOTIFICATIONS: &str = "ShutdownNotifications";
    /// `Callbacks`.
    pub const CALLBACKS: &str = "Callbacks";
    /// `Pipelines`.
    pub const PIPELINES: &str = "Pipelines";
    /// `Retries`.
    pub const RETRIES: &str = "Retries";
    /// `Results`.
    pub const RESULTS: &str = "Results";
}

/// The built-in defaults: what an option is when neither the message nor the actor sets it,
/// unless the middleware was configured otherwise.
pub mod defaults {
    /// The queue of an actor.
    pub const QUEUE_NAME: &str = "default";
    /// An actor's priority.
    pub const PRIORITY: i32 = 0;
    /// `Retries`: retries before the dead letters.
    pub const MAX_RETRIES: u64 = 20;
    /// `Retries`: the first retry's base delay, in milliseconds (15 s).
    pub const MIN_BACKOFF_MS: u64 = 15_000;
    /// `Retries`: the longest retry delay, in milliseconds (7 days), which is also the most it
    /// can be set to.
    pub const MAX_BACKOFF_MS: u64 = 7 * 24 * 3600 * 1000;
    /// `TimeLimit`: how long an actor may run, in milliseconds (10 minutes).
    pub const TIME_LIMIT_MS: u64 = 600_000;
    /// `Results`: how long a stored result lives, in milliseconds (10 minutes).
    pub const RESULT_TTL_MS: u64 = 600_000;
}

/// The kind of value an option takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// The actor's wire name: a non-empty string.
    WireName,
    /// A queue name: `[a-zA-Z_][a-zA-Z0-9._-]*`.
    QueueName,
    /// An integer from [`PRIORITY_MIN`] to [`PRIORITY_MAX`].
    Priority,
    /// A non-negative integer (`u64`).
    Count,
    /// A duration (`Duration` in `ActorOptions`; a string such as `"30s"` or a number of
    /// milliseconds in `#[actor]`).
    Duration,
    /// `true` or `false`.
    Bool,
    /// The name of an actor to send a callback message to: a non-empty string.
    ActorName,
    /// A closure, set with its `ActorOptions` method; `#[actor]` cannot express it.
    Predicate,
    /// A cron expression with seconds: a string such as `"0 */5 * * * *"`.
    Cron,
    /// An IANA time zone name: a string such as `"Europe/Paris"`.
    TimeZone,
    /// A missed-ticks policy: `"skip"` or `"run_once"`.
    Missed,
    /// The path of the `troupe` crate: an argument of `#[actor]` itself, not an actor option.
    CratePath,
}

impl Kind {
    /// How the documentation describes a value of this kind.
    #[must_use]
    pub const fn describe(self) -> &'static str {
        match self {
            Self::WireName => "a non-empty string",
            Self::QueueName => "a queue name: `[a-zA-Z_][a-zA-Z0-9._-]*`",
            Self::Priority => "an integer from -10 to 10",
            Self::Count => "a `u64`",
            Self::Duration => "a duration",
            Self::Bool => "`true` or `false`",
            Self::ActorName => "an actor's name",
            Self::Predicate => "a closure (`ActorOptions` only)",
            Self::Cron => "a cron expression with seconds, such as `\"0 */5 * * * *\"`",
            Self::TimeZone => "an IANA time zone, such as `\"Europe/Paris\"`",
            Self::Missed => "`\"skip\"` or `\"run_once\"`",
            Self::CratePath => "a path such as `\"::troupe\"`",
        }
    }
}

/// Who reads an option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reader {
    /// The app itself (its registry, sending, the brokers and the worker), whatever the
    /// middleware: every app accepts the option.
    App,
    /// The middleware of that name (one of [`middleware`]): an app without it rejects the
    /// option.
    Middleware(&'static str),
    /// The `#[actor]` macro only; not an `ActorOptions` option.
    Macro,
}

/// An option's value when nobody sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DefaultValue {
    /// Unset: no limit, no callback, no predicate.
    None,
    /// The actor function's name.
    FunctionName,
    /// A string.
    Str(&'static str),
    /// An integer.
    Int(i64),
    /// A duration, in milliseconds.
    Millis(u64),
    /// A boolean.
    Bool(bool),
}

impl DefaultValue {
    /// The default as the documentation shows it.
    #[must_use]
    pub fn render(self) -> String {
        match self {
            Self::None => "none".to_owned(),
            Self::FunctionName => "the function's name".to_owned(),
            Self::Str(s) => format!("`{s:?}`"),
            Self::Int(v) => format!("`{v}`"),
            Self::Millis(ms) => format!("`{:?}`", render_millis(ms)),
            Self::Bool(b) => format!("`{b}`"),
        }
    }
}

/// `ms` as the largest whole unit the macro's duration syntax reads back: `"15s"`, `"10m"`,
/// `"7days"`.
fn render_millis(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400_000, "days"), (3_600_000, "h"), (60_000, "m"), (1000, "s")];
    for (size, unit) in UNITS {
        if ms != 0 && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// One actor option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct OptionSpec {
    /// The option's name: the `#[actor]` argument and the `ActorOptions` field and setter.
    pub name: &'static str,
    /// The kind of value it takes.
    pub kind: Kind,
    /// Its value when nobody sets it.
    pub default: DefaultValue,
    /// Who reads it.
    pub reader: Reader,
    /// What it does, in one sentence (Markdown), saying what 0 does for a number.
    pub summary: &'static str,
}

impl OptionSpec {
    /// Whether `#[actor(...)]` takes it (closures it cannot).
    #[must_use]
    pub const fn in_macro(&self) -> bool {
        !matches!(self.kind, Kind::Predicate)
    }

    /// Whether it is a field of `ActorOptions` (the wire name is `Actor::name`, and the
    /// macro's own arguments are not options).
    #[must_use]
    pub const fn in_actor_options(&self) -> bool {
        !matches!(self.kind, Kind::WireName) && !matches!(self.reader, Reader::Macro)
    }
}

const fn spec(
    name: &'static str,
    kind: Kind,
    default: DefaultValue,
    reader: Reader,
    summary: &'static str,
) -> OptionSpec {
    OptionSpec {
        name,
        kind,
        default,
        reader,
        summary,
    }
}

/// Every actor option, in the order the documentation and the macro's errors list them.
pub const ACTOR_OPTIONS: &[OptionSpec] = &[
    spec(
        "name",
        Kind::WireName,
        DefaultValue::FunctionName,
        Reader::App,
        "The wire name messages call the actor by; never derived from a Rust path.",
    ),
    spec(
        "queue_name",
        Kind::QueueName,
        DefaultValue::Str(defaults::QUEUE_NAME),
        Reader::App,
        "The queue the actor's messages go to.",
    ),
    spec(
        "priority",
        Kind::Priority,
        DefaultValue::Int(defaults::PRIORITY as i64),
        Reader::App,
        "Lower runs first: every broker delivers by it and a worker orders what it prefetched by it.",
    ),
    spec(
        "max_retries",
        Kind::Count,
        DefaultValue::Int(defaults::MAX_RETRIES as i64),
        Reader::Middleware(middleware::RETRIES),
        "Retries before the message is dead-lettered; 0: no retry.",
    ),
    spec(
        "min_backoff",
        Kind::Duration,
        DefaultValue::Millis(defaults::MIN_BACKOFF_MS),
        Reader::Middleware(middleware::RETRIES),
        "The first retry's base delay, doubled per retry and randomised; 0: retry at once.",
    ),
    spec(
        "max_backoff",
        Kind::Duration,
        DefaultValue::Millis(defaults::MAX_BACKOFF_MS),
        Reader::Middleware(middleware::RETRIES),
        "The longest retry delay (at most 7 days); 0: retry at once.",
    ),
    spec(
        "time_limit",
        Kind::Duration,
        DefaultValue::Millis(defaults::TIME_LIMIT_MS),
        Reader::Middleware(middleware::TIME_LIMIT),
        "How long the actor may run before it fails with `TimeLimitExceeded`; 0: no limit.",
    ),
    spec(
        "soft_time_limit",
        Kind::Duration,
        DefaultValue::None,
        Reader::Middleware(middleware::TIME_LIMIT),
        "When the actor is told to wrap up (its task handle stops with `SoftTimeLimit`) before the hard limit.",
    ),
    spec(
        "max_age",
        Kind::Duration,
        DefaultValue::None,
        Reader::Middleware(middleware::AGE_LIMIT),
        "A message older than this is dead-lettered instead of run; 0: no limit.",
    ),
    spec(
        "unique_for",
        Kind::Duration,
        DefaultValue::None,
        Reader::App,
        "While a message with the same arguments is pending or running (at most this long), sending another returns its id.",
    ),
    spec(
        "result_ttl",
        Kind::Duration,
        DefaultValue::Millis(defaults::RESULT_TTL_MS),
        Reader::Middleware(middleware::RESULTS),
        "How long a stored result lives.",
    ),
    spec(
        "store_results",
        Kind::Bool,
        DefaultValue::Bool(false),
        Reader::Middleware(middleware::RESULTS),
        "Store the actor's return value (or its final failure) in the results backend.",
    ),
    spec(
        "pipe_ignore",
        Kind::Bool,
        DefaultValue::Bool(false),
        Reader::Middleware(middleware::PIPELINES),
        "Do not append the actor's result to the next pipeline stage's arguments.",
    ),
    spec(
        "notify_shutdown",
        Kind::Bool,
        DefaultValue::Bool(false),
        Reader::Middleware(middleware::SHUTDOWN_NOTIFICATIONS),
        "Cancel the actor when its worker begins to shut down.",
    ),
    spec(
        "on_success",
        Kind::ActorName,
        DefaultValue::None,
        Reader::Middleware(middleware::CALLBACKS),
        "The actor sent `(message, result)` after each success.",
    ),
    spec(
        "on_failure",
        Kind::ActorName,
        DefaultValue::None,
        Reader::Middleware(middleware::CALLBACKS),
        "The actor sent `(message, {\"type\", \"message\"})` after each failed attempt.",
    ),
    spec(
        "on_retry_exhausted",
        Kind::ActorName,
        DefaultValue::None,
        Reader::Middleware(middleware::RETRIES),
        "The actor sent `(message, {\"retries\", \"max_retries\"})` when retries run out.",
    ),
    spec(
        "retry_when",
        Kind::Predicate,
        DefaultValue::None,
        Reader::Middleware(middleware::RETRIES),
        "`Fn(retries, &ActorError) -> bool`: retry only while it returns true (instead of `max_retries`).",
    ),
    spec(
        "throws",
        Kind::Predicate,
        DefaultValue::None,
        Reader::Middleware(middleware::RETRIES),
        "`Fn(&ActorError) -> bool`: errors it matches fail without retry.",
    ),
    spec(
        "cron",
        Kind::Cron,
        DefaultValue::None,
        Reader::App,
        "Makes the actor periodic: a worker consuming its queue sends it one message (no arguments) at each tick, once across all workers (needs a state backend).",
    ),
    spec(
        "every",
        Kind::Duration,
        DefaultValue::None,
        Reader::App,
        "Makes the actor periodic with a fixed period counted from the Unix epoch (`\"5m\"` ticks at :00, :05, ...), as `cron` does.",
    ),
    spec(
        "timezone",
        Kind::TimeZone,
        DefaultValue::Str("UTC"),
        Reader::App,
        "The time zone `cron` is read in.",
    ),
    spec(
        "missed",
        Kind::Missed,
        DefaultValue::Str("skip"),
        Reader::App,
        "What a periodic actor does with ticks missed while no worker ran: skip them, or run once for them.",
    ),
    spec(
        "crate",
        Kind::CratePath,
        DefaultValue::Str("::troupe"),
        Reader::Macro,
        "`#[actor]` only: the path of the `troupe` crate, for a renamed dependency.",
    ),
];

/// The option named `name`.
#[must_use]
pub fn find(name: &str) -> Option<&'static OptionSpec> {
    ACTOR_OPTIONS.iter().find(|o| o.name == name)
}

/// The names of the options the middleware named `middleware` (one of [`middleware`]) reads,
/// in table order: what that built-in middleware returns from `actor_options()`.
#[must_use]
pub fn read_by(middleware: &str) -> &'static [&'static str] {
    static BY_READER: OnceLock<Vec<(&'static str, Vec<&'static str>)>> = OnceLock::new();
    let by_reader = BY_READER.get_or_init(|| {
        let mut by_reader: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
        for option in ACTOR_OPTIONS {
            let Reader::Middleware(reader) = option.reader else {
                continue;
            };
            match by_reader.iter_mut().find(|(r, _)| *r == reader) {
                Some((_, names)) => names.push(option.name),
                None => by_reader.push((reader, vec![option.name])),
            }
        }
        by_reader
    });
    by_reader
        .iter()
        .find(|(reader, _)| *reader == middleware)
        .map_or(&[], |(_, names)| names.as_slice())
}

/// The names of the options every app accepts ([`Reader::App`]).
pub fn app_options() -> impl Iterator<Item = &'static str> {
    ACTOR_OPTIONS.iter().filter(|o| o.reader == Reader::App).map(|o| o.name)
}

/// The table as Markdown, exactly as the README's Actors section and the `#[actor]` macro's
/// documentation show it.
#[must_use]
pub fn markdown_table() -> String {
    let mut out = String::from("| option | value | default | read by | what it does |\n|---|---|---|---|---|\n");
    for option in ACTOR_OPTIONS {
        let reader = match option.reader {
            Reader::App => "the app".to_owned(),
            Reader::Middleware(name) => format!("`{name}`"),
            Reader::Macro => "the macro".to_owned(),
        };
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            option.name,
            option.kind.describe(),
            option.default.render(),
            reader,
            option.summary
        );
    }
    out.push_str(DURATIONS_NOTE);
    out.push('\n');
    out
}

/// The paragraph after the table, on how durations are written.
const DURATIONS_NOTE: &str = "\nA duration is a `Duration` in `ActorOptions`; in `#[actor]`, a string such as `\"500ms\"`, \
                              `\"30s\"`, `\"5m\"` or `\"7days\"`, or an integer number of milliseconds.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_identifiers() {
        for (i, option) in ACTOR_OPTIONS.iter().enumerate() {
            assert!(
                option.name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{}",
                option.name
            );
            assert!(
                ACTOR_OPTIONS[..i].iter().all(|o| o.name != option.name),
                "{} twice",
                option.name
            );
            assert!(!option.summary.is_empty(), "{}", option.name);
        }
    }

    #[test]
    fn readers_are_builtin_middleware() {
        let known = [
            middleware::AGE_LIMIT,
            middleware::TIME_LIMIT,
            middleware::SHUTDOWN_NOTIFICATIONS,
            middleware::CALLBACKS,
            middleware::PIPELINES,
            middleware::RETRIES,
            middleware::RESULTS,
        ];
        for option in ACTOR_OPTIONS {
            if let Reader::Middleware(name) = option.reader {
                assert!(known.contains(&name), "{}: {name}", option.name);
            }
        }
        for name in known {
            assert!(!read_by(name).is_empty(), "{name} reads no option");
        }
    }

    #[test]
    fn read_by_groups_in_table_order() {
        assert_eq!(
            read_by(middleware::RETRIES),
            [
                "max_retries",
                "min_backoff",
                "max_backoff",
                "on_retry_exhausted",
                "retry_when",
                "throws"
            ]
        );
        assert_eq!(read_by(middleware::RESULTS), ["result_ttl", "store_results"]);
        assert!(read_by("Unknown").is_empty());
        assert_eq!(
            app_options().collect::<Vec<_>>(),
            [
                "name",
                "queue_name",
                "priority",
                "unique_for",
                "cron",
                "every",
                "timezone",
                "missed"
            ]
        );
        assert_eq!(read_by(middleware::TIME_LIMIT), ["time_limit", "soft_time_limit"]);
    }

    #[test]
    fn what_each_option_is_part_of() {
        let macro_names: Vec<&str> = ACTOR_OPTIONS.iter().filter(|o| o.in_macro()).map(|o| o.name).collect();
        assert!(!macro_names.contains(&"retry_when") && !macro_names.contains(&"throws"));
        assert_eq!(macro_names.first(), Some(&"name"));
        assert_eq!(macro_names.last(), Some(&"crate"));
        let fields: Vec<&str> = ACTOR_OPTIONS
            .iter()
            .filter(|o| o.in_actor_options())
            .map(|o| o.name)
            .collect();
        assert!(!fields.contains(&"name") && !fields.contains(&"crate"));
        assert!(fields.contains(&"retry_when") && fields.contains(&"queue_name"));
    }

    #[test]
    fn defaults_render_as_the_macro_reads_them() {
        assert_eq!(render_millis(15_000), "15s");
        assert_eq!(render_millis(600_000), "10m");
        assert_eq!(render_millis(7_200_000), "2h");
        assert_eq!(render_millis(defaults::MAX_BACKOFF_MS), "7days");
        assert_eq!(render_millis(1500), "1500ms");
        assert_eq!(render_millis(0), "0ms");
        assert_eq!(DefaultValue::Str("default").render(), "`\"default\"`");
        assert_eq!(DefaultValue::Millis(15_000).render(), "`\"15s\"`");
        assert_eq!(DefaultValue::None.render(), "none");
    }

    #[test]
    fn markdown_has_a_row_per_option() {
        let table = markdown_table();
        assert_eq!(
            table.lines().filter(|l| l.starts_with('|')).count(),
            2 + ACTOR_OPTIONS.len()
        );
        assert!(table.ends_with("or an integer number of milliseconds.\n"), "{table}");
        assert!(
            Kind::Priority
                .describe()
                .ends_with(&format!("from {PRIORITY_MIN} to {PRIORITY_MAX}"))
        );
        assert!(
            table.contains("| `max_retries` | a `u64` | `20` | `Retries` | Retries before"),
            "{table}"
        );
    }
}
