//! `connect(url)`, `connect_results(url)` and `connect_state(url)`: backends from URLs.

use std::sync::Arc;

use troupe_core::{
    Broker, Error, MemoryBroker, MemoryResults, MemoryState, Result, ResultBackend, StateBackend, redact_url,
};

const SCHEME_HELP: &str = "use memory://, sqlite://PATH, redis://HOST, amqp://HOST or postgres://HOST";

/// The schemes of Redis URLs (one server, TLS, a Unix socket, Sentinel).
const REDIS_SCHEMES: &[&str] = &["redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster"];

/// Each scheme: its name, the broker feature and the results feature (None: no results backend).
const SCHEMES: &[(&[&str], &str, &str, Option<&str>)] = &[
    (&["sqlite"], "SQLite", "broker-sqlite", Some("results-sqlite")),
    (REDIS_SCHEMES, "Redis", "broker-redis", Some("results-redis")),
    (&["amqp", "amqps"], "RabbitMQ", "broker-rabbitmq", None),
    (
        &["postgres", "postgresql"],
        "PostgreSQL",
        "broker-postgres",
        Some("results-postgres"),
    ),
];

fn scheme_of(url: &str) -> Result<String> {
    url.split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Error::Config(format!("URL {:?} has no scheme; {SCHEME_HELP}", redact_url(url))))
}

/// What a URL is asked to connect to.
#[derive(Clone, Copy)]
enum Want {
    Broker,
    Results,
    State,
}

fn not_compiled_in(url: &str, scheme: &str, want: Want) -> Error {
    for (schemes, name, broker_feature, results_feature) in SCHEMES {
        if schemes.contains(&scheme) {
            // The state backends come with the results backends, under the same feature.
            return match (want, results_feature) {
                (Want::Broker, _) => Error::Config(format!(
                    "{scheme}:// URLs need the {name} broker, which is not compiled in; enable the `{broker_feature}` feature of the troupe crate"
                )),
                (Want::Results, Some(feature)) => Error::Config(format!(
                    "{scheme}:// results need the {name} results backend, which is not compiled in; enable the `{feature}` feature of the troupe crate"
                )),
                (Want::State, Some(feature)) => Error::Config(format!(
                    "{scheme}:// state needs the {name} state backend, which is not compiled in; enable the `{feature}` feature of the troupe crate"
                )),
                (Want::Results, None) => Error::Config(format!(
                    "{name} has no results backend; store results in Redis, PostgreSQL or SQLite"
                )),
                (Want::State, None) => Error::Config(format!(
                    "{name} has no state backend; keep state in Redis, PostgreSQL or SQLite"
                )),
            };
        }
    }
    Error::Config(format!(
        "unknown URL scheme {scheme:?} in {:?}; {SCHEME_HELP}",
        redact_url(url)
    ))
}

/// Connects to the broker a URL names, picking the backend from the scheme: `memory:`,
/// `sqlite:`, `redis:`/`rediss:`, `amqp:`/`amqps:`, `postgres:`/`postgresql:`.
///
/// # Errors
/// [`Error::Config`] for an unknown scheme, or one whose backend is not compiled in (the
/// message names the cargo feature to enable); a backend error when the broker is unreachable.
pub async fn connect(url: &str) -> Result<Arc<dyn Broker>> {
    let scheme = scheme_of(url)?;
    match scheme.as_str() {
        "memory" => Ok(Arc::new(MemoryBroker::new())),
        #[cfg(feature = "broker-sqlite")]
        "sqlite" => Ok(Arc::new(troupe_sqlite::SqliteBroker::connect(url).await?)),
        #[cfg(feature = "broker-redis")]
        redis if REDIS_SCHEMES.contains(&redis) => Ok(Arc::new(troupe_redis::RedisBroker::connect(url).await?)),
        #[cfg(feature = "broker-postgres")]
        "postgres" | "postgresql" => Ok(Arc::new(troupe_postgres::PostgresBroker::connect(url).await?)),
        #[cfg(feature = "broker-rabbitmq")]
        "amqp" | "amqps" => Ok(Arc::new(troupe_rabbitmq::RabbitmqBroker::connect(url).await?)),
        other => Err(not_compiled_in(url, other, Want::Broker)),
    }
}

/// Connects to the results backend a URL names (`memory:`, `sqlite:`; more with their
/// backends).
///
/// # Errors
/// As [`connect`].
pub async fn connect_results(url: &str) -> Result<Arc<dyn ResultBackend>> {
    let scheme = scheme_of(url)?;
    match scheme.as_str() {
        "memory" => Ok(MemoryResults::new().into_dyn()),
        #[cfg(feature = "results-sqlite")]
        "sqlite" => Ok(troupe_sqlite::SqliteResults::connect(url).await?.into_dyn()),
        #[cfg(feature = "results-redis")]
        redis if REDIS_SCHEMES.contains(&redis) => Ok(troupe_redis::RedisResults::connect(url).await?.into_dyn()),
        #[cfg(feature = "results-postgres")]
        "postgres" | "postgresql" => Ok(troupe_postgres::PostgresResults::connect(url).await?.into_dyn()),
        other => Err(not_compiled_in(url, other, Want::Results)),
    }
}

/// Connects to the state backend a URL names (`memory:`, `sqlite:`, `redis:`/`rediss:`,
/// `postgres:`/`postgresql:`), for [`AppBuilder::state`](troupe_core::AppBuilder::state). The
/// state backends come with the results backends, under the same cargo features.
///
/// # Errors
/// As [`connect`].
pub async fn connect_state(url: &str) -> Result<Arc<dyn StateBackend>> {
    let scheme = scheme_of(url)?;
    match scheme.as_str() {
        "memory" => Ok(Arc::new(MemoryState::new())),
        #[cfg(feature = "results-sqlite")]
        "sqlite" => Ok(troupe_sqlite::SqliteState::connect(url).await?.into_dyn()),
        #[cfg(feature = "results-redis")]
        redis if REDIS_SCHEMES.contains(&redis) => Ok(troupe_redis::RedisState::connect(url).await?.into_dyn()),
        #[cfg(feature = "results-postgres")]
        "postgres" | "postgresql" => Ok(troupe_postgres::PostgresState::connect(url).await?.into_dyn()),
        other => Err(not_compiled_in(url, other, Want::State)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn schemes() {
        assert_eq!(connect("memory://").await.unwrap().backend(), "memory");
        let err = connect("kafka://localhost").await.unwrap_err().to_string();
        assert!(err.contains("unknown URL scheme"), "{err}");
        let err = connect_results("amqp://localhost").await.unwrap_err().to_string();
        assert!(err.contains("no results backend"), "{err}");
        let err = connect("ftp://u:secret@host/x").await.unwrap_err().to_string();
        assert!(err.contains("unknown URL scheme") && !err.contains("secret"), "{err}");
        assert!(connect("nonsense").await.unwrap_err().to_string().contains("no scheme"));
    }

    #[tokio::test]
    async fn state_schemes() {
        let state = connect_state("memory://").await.unwrap();
        assert!(state.add("k", 1, std::time::Duration::from_secs(60)).await.unwrap());
        assert_eq!(state.get("k").await.unwrap(), Some(1));
        let err = connect_state("amqp://guest:secret@localhost")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no state backend"), "{err}");
        let err = connect_state("kafka://u:secret@localhost").await.unwrap_err();
        assert_eq!(err.kind(), troupe_core::ErrorKind::Config);
        let err = err.to_string();
        assert!(err.contains("unknown URL scheme") && !err.contains("secret"), "{err}");
        assert!(
            connect_state("nonsense")
                .await
                .unwrap_err()
                .to_string()
                .contains("no scheme")
        );
    }

    #[cfg(not(feature = "results-redis"))]
    #[tokio::test]
    async fn state_backend_not_compiled_in_names_the_feature() {
        let err = connect_state("redis://localhost").await.unwrap_err().to_string();
        assert!(err.contains("`results-redis`"), "{err}");
    }

    #[cfg(feature = "broker-sqlite")]
    #[tokio::test]
    async fn sqlite_urls() {
        let dir = std::env::temp_dir().join(format!("troupe-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}/t.db", dir.display());
        assert_eq!(connect(&url).await.unwrap().backend(), "sqlite");
        assert!(connect_results(&url).await.is_ok());
        let state = connect_state(&url).await.unwrap();
        assert!(
            state
                .incr("runs", 1, 10, std::time::Duration::from_secs(60))
                .await
                .unwrap()
        );
        assert_eq!(connect_state(&url).await.unwrap().get("runs").await.unwrap(), Some(1));
        let err = connect("sqlite:///no/such/dir/t.db").await.unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
