//! The one error type of `troupe-core`, shared by every broker and backend crate.

use std::fmt;

/// A boxed error that can cross threads: what backends keep as the source of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of Troupe's fallible operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure a broker or backend error is, so callers branch without downcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The connection to the server failed or was lost.
    Connection,
    /// The server did not answer in time.
    Timeout,
    /// A queue, message or key does not exist.
    NotFound,
    /// The server answered something the client did not expect.
    Protocol,
    /// A message or value could not be encoded or decoded.
    Serialization,
    /// The configuration (a URL, an option) is wrong.
    Config,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// Whether retrying the same operation later may succeed (lost connections and time-outs).
    #[must_use]
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Connection | Self::Timeout)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connection => "connection",
            Self::Timeout => "timeout",
            Self::NotFound => "not found",
            Self::Protocol => "protocol",
            Self::Serialization => "serialization",
            Self::Config => "configuration",
            Self::Other => "other",
        })
    }
}

/// Every error `troupe-core` and the backends built on it return.
///
/// Each error's `Display` is one complete line: a backend error's message already states its
/// cause, so [`source`](std::error::Error::source) continues the chain *below* that cause and a
/// report that walks the chain (`anyhow`'s `{:#}`, [`ActorError::traceback`](crate::ActorError::traceback))
/// shows every cause once. [`Error::backend_source`] gives the wrapped client error itself.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A broker or backend operation failed.
    Backend {
        /// Which backend ("memory", "redis", ...).
        backend: &'static str,
        /// The kind of failure.
        kind: ErrorKind,
        /// What failed, in one line, with the fix when one is known. When there is a source,
        /// its text is part of the message (see [`Error::backend_with_source`]).
        message: String,
        /// The underlying error, if any. Its text is in `message`; `source()` of this error
        /// returns the source's own source, the next cause not already said.
        source: Option<BoxError>,
    },
    /// Bytes could not be decoded into a message.
    Decode(String),
    /// A message or value could not be encoded.
    Encode(String),
    /// A message is larger than the configured limit.
    MessageTooLarge {
        /// The encoded size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A queue name does not match `[a-zA-Z_][a-zA-Z0-9._-]*`.
    InvalidQueueName(String),
    /// The queue was never declared on this broker.
    QueueNotFound(String),
    /// No actor of that name is registered.
    ActorNotFound(String),
    /// A setting or option is wrong.
    Config(String),
    /// `join` did not see the queue drain in time.
    QueueJoinTimeout(String),
    /// A message on the joined queue failed (was dead-lettered).
    MessageFailed {
        /// The failed message's id.
        message_id: String,
        /// Its actor.
        actor_name: String,
        /// Why it failed.
        reason: String,
    },
    /// No result is stored for the message (yet).
    ResultMissing(String),
    /// Waiting for a result timed out.
    ResultTimeout(String),
    /// The actor failed and its failure was stored as the result.
    ResultFailure {
        /// The error's type name (Python: the exception class).
        error_type: String,
        /// The error's message.
        message: String,
    },
    /// No results backend is configured.
    NoResultBackend,
    /// [`current_app`](crate::current_app) was called outside an actor run by a worker.
    NoCurrentApp,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Backend {
                backend, kind, message, ..
            } => write!(f, "{backend} {kind} error: {message}"),
            Self::Decode(m) => write!(f, "cannot decode message: {m}"),
            Self::Encode(m) => write!(f, "cannot encode message: {m}"),
            Self::MessageTooLarge { size, limit } => write!(
                f,
                "message of {size} bytes is over the {limit}-byte limit; send an id and keep the payload elsewhere, or raise the limit"
            ),
            Self::InvalidQueueName(q) => {
                // A long name is shown by its start and length.
                let shown: String = q.chars().take(64).collect();
                let more = if shown.len() < q.len() {
                    format!("... ({} bytes)", q.len())
                } else {
                    String::new()
                };
                write!(
                    f,
                    "invalid queue name {shown:?}{more}: queue names must match [a-zA-Z_][a-zA-Z0-9._-]* and be at most {} bytes",
                    crate::queue::MAX_QUEUE_NAME_LEN
                )
            }
            Self::QueueNotFound(q) => write!(f, "queue {q:?} was not declared on this broker"),
            Self::ActorNotFound(a) => write!(f, "no actor named {a:?} is registered"),
            Self::Config(m) => f.write_str(m),
            Self::QueueJoinTimeout(q) => write!(f, "queue {q:?} did not drain before the join timeout"),
            Self::MessageFailed {
                message_id,
                actor_name,
                reason,
            } => write!(f, "message {message_id} for actor {actor_name:?} failed: {reason}"),
            Self::ResultMissing(id) => write!(f, "no result is stored for message {id}"),
            Self::ResultTimeout(id) => write!(f, "timed out waiting for the result of message {id}"),
            Self::ResultFailure { error_type, message } => write!(f, "actor raised {error_type}: {message}"),
            Self::NoResultBackend => {
                f.write_str("no results backend is configured; add one with App::builder(..).results(backend)")
            }
            Self::NoCurrentApp => f.write_str(
                "current_app() was called outside an actor run by a worker (or with the CurrentMessage middleware turned off)",
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // The source's own text is already in the message: continue below it.
            Self::Backend { source: Some(s), .. } => s.source(),
            _ => None,
        }
    }
}

impl Error {
    /// A backend error without a source.
    pub fn backend(backend: &'static str, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::Backend {
            backend,
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A backend error wrapping its source.
    ///
    /// The message states what failed and, as is usual, the source's text
    /// (`format!("cannot ack: {e}")`); if it does not contain the source's text, `": {source}"`
    /// is appended. Either way the error's `Display` states the cause once, and its
    /// [`source`](std::error::Error::source) is the source's own source, so a report walking
    /// the chain does not repeat the cause. [`Error::backend_source`] returns `source` itself.
    pub fn backend_with_source(
        backend: &'static str,
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        let source = source.into();
        let mut message = message.into();
        let cause = source.to_string();
        if !message.contains(&cause) {
            if message.is_empty() {
                message = cause;
            } else {
                message = format!("{message}: {cause}");
            }
        }
        Self::Backend {
            backend,
            kind,
            message,
            source: Some(source),
        }
    }

    /// The error a backend error wraps (a client library's error, to downcast), if any. Its
    /// text is already part of this error's message.
    #[must_use]
    pub fn backend_source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            Self::Backend { source, .. } => source.as_deref(),
            _ => None,
        }
    }

    /// The kind of this error.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Backend { kind, .. } => *kind,
            Self::Decode(_) | Self::Encode(_) | Self::MessageTooLarge { .. } => ErrorKind::Serialization,
            Self::InvalidQueueName(_) | Self::Config(_) | Self::NoResultBackend | Self::NoCurrentApp => {
                ErrorKind::Config
            }
            Self::QueueNotFound(_) | Self::ActorNotFound(_) | Self::ResultMissing(_) => ErrorKind::NotFound,
            Self::QueueJoinTimeout(_) | Self::ResultTimeout(_) => ErrorKind::Timeout,
            Self::MessageFailed { .. } | Self::ResultFailure { .. } => ErrorKind::Other,
        }
    }

    /// Whether retrying the operation later may succeed.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Backend { kind, .. } if kind.is_transient())
    }
}

/// The URL with any password replaced by `***`, for error messages and logs.
#[must_use]
pub fn redact_url(url: &str) -> String {
    let is_scheme = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    };
    let Some((scheme, rest)) = url.split_once("://").filter(|(scheme, _)| is_scheme(scheme)) else {
        // Not a URL (a piece of one, say): anything before an `@` may be credentials.
        return match url.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => url.to_owned(),
        };
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client library's error with a cause of its own.
    #[derive(Debug)]
    struct ClientError(std::io::Error);

    impl fmt::Display for ClientError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("connection reset")
        }
    }

    impl std::error::Error for ClientError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn client_error() -> ClientError {
        ClientError(std::io::Error::other("broken pipe"))
    }

    /// What `anyhow`'s `{:#}` prints: every link of the chain, joined by ": ".
    fn chain_report(e: &(dyn std::error::Error + 'static)) -> String {
        let mut out = e.to_string();
        let mut next = e.source();
        while let Some(cause) = next {
            out.push_str(": ");
            out.push_str(&cause.to_string());
            next = cause.source();
        }
        out
    }

    #[test]
    fn a_chain_report_states_each_cause_once() {
        // As the backend crates build them: the cause's text in the message and the cause kept.
        let e = client_error();
        let err = Error::backend_with_source("redis", ErrorKind::Connection, format!("cannot fetch: {e}"), e);
        let report = chain_report(&err);
        assert_eq!(
            report,
            "redis connection error: cannot fetch: connection reset: broken pipe"
        );
        assert_eq!(report.matches("connection reset").count(), 1, "{report}");
        // A message without the cause's text gets it appended, so Display never loses it.
        let err = Error::backend_with_source("redis", ErrorKind::Connection, "cannot fetch", client_error());
        assert_eq!(
            err.to_string(),
            "redis connection error: cannot fetch: connection reset"
        );
        assert_eq!(
            chain_report(&err),
            "redis connection error: cannot fetch: connection reset: broken pipe"
        );
        // The wrapped error itself stays reachable, to downcast.
        assert!(
            err.backend_source()
                .is_some_and(|s| s.downcast_ref::<ClientError>().is_some())
        );
    }

    #[test]
    fn an_actor_traceback_states_the_cause_once() {
        let e = client_error();
        let err = Error::backend_with_source("sqlite", ErrorKind::Other, format!("cannot read the state: {e}"), e);
        let traceback = crate::ActorError::from(err).traceback();
        assert_eq!(traceback.matches("connection reset").count(), 1, "{traceback}");
        assert!(traceback.contains("caused by: broken pipe"), "{traceback}");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(
            redact_url("amqp://guest:guest@localhost/"),
            "amqp://guest:***@localhost/"
        );
        assert_eq!(redact_url("redis://h"), "redis://h");
        assert_eq!(redact_url("postgres://u:p@w@h/db"), "postgres://u:***@h/db");
        // Found by the broker_urls fuzz target: a piece of a `;`-separated list has no scheme.
        assert_eq!(redact_url("est:secret@host"), "***@host");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("u:secret@db/x?y=sqlite:///t"), "***@db/x?y=sqlite:///t");
    }
}
