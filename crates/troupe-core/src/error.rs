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
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A broker or backend operation failed.
    #[error("{backend} {kind} error: {message}")]
    Backend {
        /// Which backend ("memory", "redis", ...).
        backend: &'static str,
        /// The kind of failure.
        kind: ErrorKind,
        /// What failed, in one line, with the fix when one is known.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// Bytes could not be decoded into a message.
    #[error("cannot decode message: {0}")]
    Decode(String),
    /// A message or value could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// A message is larger than the configured limit.
    #[error(
        "message of {size} bytes is over the {limit}-byte limit; send an id and keep the payload elsewhere, or raise the limit"
    )]
    MessageTooLarge {
        /// The encoded size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A queue name does not match `[a-zA-Z_][a-zA-Z0-9._-]*`.
    #[error("invalid queue name {0:?}: queue names must match [a-zA-Z_][a-zA-Z0-9._-]*")]
    InvalidQueueName(String),
    /// The queue was never declared on this broker.
    #[error("queue {0:?} was not declared on this broker")]
    QueueNotFound(String),
    /// No actor of that name is registered.
    #[error("no actor named {0:?} is registered")]
    ActorNotFound(String),
    /// A setting or option is wrong.
    #[error("{0}")]
    Config(String),
    /// `join` did not see the queue drain in time.
    #[error("queue {0:?} did not drain before the join timeout")]
    QueueJoinTimeout(String),
    /// A message on the joined queue failed (was dead-lettered).
    #[error("message {message_id} for actor {actor_name:?} failed: {reason}")]
    MessageFailed {
        /// The failed message's id.
        message_id: String,
        /// Its actor.
        actor_name: String,
        /// Why it failed.
        reason: String,
    },
    /// No result is stored for the message (yet).
    #[error("no result is stored for message {0}")]
    ResultMissing(String),
    /// Waiting for a result timed out.
    #[error("timed out waiting for the result of message {0}")]
    ResultTimeout(String),
    /// The actor failed and its failure was stored as the result.
    #[error("actor raised {error_type}: {message}")]
    ResultFailure {
        /// The error's type name (Python: the exception class).
        error_type: String,
        /// The error's message.
        message: String,
    },
    /// No results backend is configured.
    #[error("no results backend is configured; add one with App::builder(..).results(backend)")]
    NoResultBackend,
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
    pub fn backend_with_source(
        backend: &'static str,
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::Backend {
            backend,
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// The kind of this error.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Backend { kind, .. } => *kind,
            Self::Decode(_) | Self::Encode(_) | Self::MessageTooLarge { .. } => ErrorKind::Serialization,
            Self::InvalidQueueName(_) | Self::Config(_) | Self::NoResultBackend => ErrorKind::Config,
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
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
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

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(
            redact_url("amqp://guest:guest@localhost/"),
            "amqp://guest:***@localhost/"
        );
        assert_eq!(redact_url("redis://h"), "redis://h");
        assert_eq!(redact_url("postgres://u:p@w@h/db"), "postgres://u:***@h/db");
    }
}
