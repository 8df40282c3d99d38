//! `connect(url)`: a broker from a URL.

use std::sync::Arc;

use troupe_core::{Broker, Error, MemoryBroker, Result, redact_url as redact};

/// The backends a URL scheme names, with the cargo feature that compiles each in.
const SCHEMES: &[(&[&str], &str, &str)] = &[
    (&["sqlite"], "SQLite", "broker-sqlite"),
    (&["redis", "rediss"], "Redis", "broker-redis"),
    (&["amqp", "amqps"], "RabbitMQ", "broker-rabbitmq"),
    (&["postgres", "postgresql"], "PostgreSQL", "broker-postgres"),
];

/// Connects to the broker a URL names, picking the backend from the scheme: `memory:`,
/// `sqlite:`, `redis:`/`rediss:`, `amqp:`/`amqps:`, `postgres:`/`postgresql:`.
///
/// # Errors
/// [`Error::Config`] for an unknown scheme, or one whose backend is not compiled in (the
/// message names the cargo feature to enable); a backend error when the broker is unreachable.
pub async fn connect(url: &str) -> Result<Arc<dyn Broker>> {
    let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase()).ok_or_else(|| {
        Error::Config(format!(
            "broker URL {:?} has no scheme; use memory://, sqlite://PATH, redis://HOST, amqp://HOST or postgres://HOST",
            redact(url)
        ))
    })?;
    if scheme == "memory" {
        return Ok(Arc::new(MemoryBroker::new()));
    }
    for (schemes, name, feature) in SCHEMES {
        if schemes.contains(&scheme.as_str()) {
            return Err(Error::Config(format!(
                "{scheme}:// URLs need the {name} broker, which is not compiled in; enable the `{feature}` feature of the troupe crate"
            )));
        }
    }
    Err(Error::Config(format!(
        "unknown broker URL scheme {scheme:?} in {:?}; use memory://, sqlite://, redis://, amqp:// or postgres://",
        redact(url)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn schemes() {
        assert_eq!(connect("memory://").await.unwrap().backend(), "memory");
        let err = connect("redis://localhost").await.unwrap_err().to_string();
        assert!(err.contains("broker-redis"), "{err}");
        let err = connect("ftp://u:secret@host/x").await.unwrap_err().to_string();
        assert!(
            err.contains("unknown broker URL scheme") && !err.contains("secret"),
            "{err}"
        );
        assert!(connect("nonsense").await.unwrap_err().to_string().contains("no scheme"));
    }
}
