//! URL parsing, connections and error mapping shared by the broker and the backends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use troupe_core::tls::{TlsFiles, TlsSettingNames, closed_without_client_cert_hint, path_from_query, tls_hint};
use troupe_core::{Error, ErrorKind, redact_url};

use crate::cluster::{ClusterUrl, check_namespaces, is_cluster_url};
use crate::sentinel::{SentinelUrl, is_sentinel_url};

pub(crate) const BACKEND: &str = "redis";

/// The TLS settings' names in a Redis URL: redis-py's.
const TLS_NAMES: TlsSettingNames = TlsSettingNames::new("Redis", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile");

/// dramatiq-abort's default key prefix (`dramatiq_abort.backends.redis.DEFAULT_NAMESPACE`).
pub(crate) const DEFAULT_ABORT_NAMESPACE: &str = "dramatiq:aborts:";

/// Settings of a Redis connection used by Troupe. Its `Debug` output redacts the password.
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisOptions {
    /// The server URL, without Troupe's own query settings.
    pub url: String,
    /// Key prefix, as Dramatiq's `namespace` (default `dramatiq`).
    pub namespace: String,
    /// A consumer silent for this long is dead; its unacked messages go back to their queue
    /// (default 60 s, as Dramatiq).
    pub heartbeat_timeout: Duration,
    /// How long dead letters are kept (default 7 days).
    pub dead_message_ttl: Duration,
    /// How often workers run maintenance on the queues they consume (default 5 s).
    pub maintenance_interval: Duration,
    /// The longest an idle consumer waits between checks for messages enqueued by producers
    /// that do not publish wake-ups (Python Dramatiq); Troupe producers wake consumers at once
    /// (default 100 ms).
    pub max_poll_interval: Duration,
    /// Largest accepted message (default 1 MiB).
    pub max_message_size: usize,
    /// How long connecting may take before the broker counts as unreachable (default 5 s).
    pub connect_timeout: Duration,
    /// Key prefix of the cancellation requests Python's dramatiq-abort reads and writes
    /// (default `dramatiq:aborts:`, its `RedisBackend` default, independent of `namespace`).
    pub abort_namespace: String,
    /// A CA to trust and a client certificate for `rediss://` (default none: the public roots,
    /// no client certificate).
    pub tls: TlsFiles,
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &redact_url(&self.url))
            .field("namespace", &self.namespace)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("dead_message_ttl", &self.dead_message_ttl)
            .field("maintenance_interval", &self.maintenance_interval)
            .field("max_poll_interval", &self.max_poll_interval)
            .field("max_message_size", &self.max_message_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("abort_namespace", &self.abort_namespace)
            .field("tls", &self.tls)
            .finish()
    }
}

impl RedisOptions {
    /// Defaults for `url`.
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            namespace: "dramatiq".into(),
            heartbeat_timeout: Duration::from_secs(60),
            dead_message_ttl: Duration::from_secs(7 * 24 * 3600),
            maintenance_interval: Duration::from_secs(5),
            max_poll_interval: Duration::from_millis(100),
            max_message_size: troupe_core::DEFAULT_MAX_MESSAGE_SIZE,
            connect_timeout: Duration::from_secs(5),
            abort_namespace: DEFAULT_ABORT_NAMESPACE.into(),
            tls: TlsFiles::default(),
        }
    }

    /// Parses `redis://[:password@]host[:port][/db]` or `rediss://…` with optional Troupe
    /// settings in the query: `namespace`, `abort_namespace`, `heartbeat_timeout`,
    /// `dead_message_ttl`, `maintenance_interval`, `max_poll_interval`, `connect_timeout`
    /// (durations such as `30s`) and `max_message_size` (bytes); for `rediss://`, redis-py's
    /// `ssl_ca_certs` (a PEM file of the CA to trust), `ssl_certfile` and `ssl_keyfile` (a
    /// client certificate and its key). Other query settings go to the redis client.
    ///
    /// `redis+sentinel://[:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]/MASTER_NAME[/DB]` names Redis
    /// Sentinels (port 26379 by default) and the master they watch: every connection is made
    /// to the master they name at the time, and one that loses its server or meets a demoted
    /// master (`READONLY`) is made again through them. The password is the master's; the
    /// sentinels are reached without one. Troupe's query settings apply; TLS does not.
    ///
    /// `redis+cluster://[:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]?namespace={APP}` names nodes of
    /// a Redis Cluster (port 6379 by default). The namespace must be hash-tagged (`{app}`;
    /// default `{dramatiq}`) so that all its keys are in one slot: every connection is made to
    /// the master serving that slot at the time, and made again after `MOVED` or a lost
    /// server. Results, rate-limit state and cancellation requests are kept under the
    /// namespace too (`{app}:…`; Python Dramatiq has no cluster support to share them with).
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad part (passwords redacted).
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let lower = url.to_ascii_lowercase();
        if !lower.starts_with("redis://")
            && !lower.starts_with("rediss://")
            && !lower.starts_with("redis+unix://")
            && !is_sentinel_url(url)
            && !is_cluster_url(url)
        {
            return Err(Error::Config(format!(
                "{:?} is not a Redis URL; use redis://HOST[:PORT][/DB], rediss:// for TLS, redis+sentinel://SENTINEL[,SENTINEL…]/MASTER_NAME[/DB] for Redis Sentinel, or redis+cluster://NODE[,NODE…]?namespace={{APP}} for Redis Cluster",
                redact_url(url)
            )));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut options = Self::new(base);
        if is_cluster_url(url) {
            crate::cluster::DEFAULT_NAMESPACE.clone_into(&mut options.namespace);
        }
        let mut passthrough = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let duration = || {
                humantime::parse_duration(value)
                    .map_err(|e| Error::Config(format!("bad value {value:?} for `{key}` in the Redis URL: {e}")))
            };
            match key {
                "namespace" => {
                    if value.is_empty() {
                        return Err(Error::Config("`namespace` in the Redis URL is empty".into()));
                    }
                    options.namespace = value.to_owned();
                }
                "abort_namespace" => options.abort_namespace = value.to_owned(),
                "heartbeat_timeout" => options.heartbeat_timeout = duration()?,
                "dead_message_ttl" => options.dead_message_ttl = duration()?,
                "maintenance_interval" => options.maintenance_interval = duration()?,
                "max_poll_interval" => options.max_poll_interval = duration()?,
                "connect_timeout" => options.connect_timeout = duration()?,
                "ssl_ca_certs" => options.tls.ca_file = Some(path_from_query(value)),
                "ssl_certfile" => options.tls.cert_file = Some(path_from_query(value)),
                "ssl_keyfile" => options.tls.key_file = Some(path_from_query(value)),
                "max_message_size" => {
                    options.max_message_size = value.parse().map_err(|e| {
                        Error::Config(format!(
                            "bad value {value:?} for `max_message_size` in the Redis URL: {e}"
                        ))
                    })?;
                }
                _ => passthrough.push(pair),
            }
        }
        if !passthrough.is_empty() {
            options.url = format!("{base}?{}", passthrough.join("&"));
        }
        if is_sentinel_url(&options.url) {
            SentinelUrl::parse(&options.url)?;
        } else if is_cluster_url(&options.url) {
            ClusterUrl::parse(&options.url)?;
            check_namespaces(&options.namespace, &options.abort_prefix())?;
        } else {
            redis::Client::open(options.url.as_str())
                .map_err(|e| Error::Config(format!("bad Redis URL {:?}: {e}", redact_url(&options.url))))?;
        }
        options.check_tls()?;
        Ok(options)
    }

    /// Sets the namespace.
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets the key prefix of dramatiq-abort's cancellation requests (default
    /// `dramatiq:aborts:`, on Redis Cluster `NAMESPACE:aborts:`); it must match the Python `RedisBackend`'s `namespace` for Troupe and
    /// Python to see each other's requests.
    #[must_use]
    pub fn abort_namespace(mut self, prefix: impl Into<String>) -> Self {
        self.abort_namespace = prefix.into();
        self
    }

    /// Sets the heartbeat timeout.
    #[must_use]
    pub fn heartbeat_timeout(mut self, d: Duration) -> Self {
        self.heartbeat_timeout = d;
        self
    }

    /// Sets the maintenance interval.
    #[must_use]
    pub fn maintenance_interval(mut self, d: Duration) -> Self {
        self.maintenance_interval = d;
        self
    }

    /// Sets the dead-letter TTL.
    #[must_use]
    pub fn dead_message_ttl(mut self, d: Duration) -> Self {
        self.dead_message_ttl = d;
        self
    }

    /// Sets the message size limit.
    #[must_use]
    pub fn max_message_size(mut self, limit: usize) -> Self {
        self.max_message_size = limit;
        self
    }

    /// Trusts the CA certificates in the PEM file `path` for `rediss://` (as redis-py's
    /// `ssl_ca_certs`).
    #[must_use]
    pub fn tls_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tls.ca_file = Some(path.into());
        self
    }

    /// Presents a client certificate and its private key (PEM files) for `rediss://` (as
    /// redis-py's `ssl_certfile` and `ssl_keyfile`).
    #[must_use]
    pub fn tls_client_cert(mut self, cert: impl Into<std::path::PathBuf>, key: impl Into<std::path::PathBuf>) -> Self {
        self.tls = self.tls.client_cert(cert, key);
        self
    }

    /// TLS files only make sense on `rediss://`, and a certificate needs its key.
    fn check_tls(&self) -> Result<(), Error> {
        if self.tls.is_empty() {
            return Ok(());
        }
        if !self.url.to_ascii_lowercase().starts_with("rediss://") {
            return Err(Error::Config(format!(
                "`ssl_ca_certs`, `ssl_certfile` and `ssl_keyfile` need TLS: use rediss:// instead of {:?}",
                redact_url(&self.url)
            )));
        }
        self.tls.validate(&TLS_NAMES)
    }

    /// A client for the server: the one the URL names, for `redis+sentinel://` the master the
    /// sentinels name now, for `redis+cluster://` the master serving the namespace's slot now.
    pub(crate) async fn client(&self) -> Result<redis::Client, Error> {
        if is_sentinel_url(&self.url) {
            return SentinelUrl::parse(&self.url)?.master(self.connect_timeout).await;
        }
        if is_cluster_url(&self.url) {
            check_namespaces(&self.namespace, &self.abort_prefix())?;
            return ClusterUrl::parse(&self.url)?
                .node_for(&self.namespace, self.connect_timeout)
                .await;
        }
        self.fixed_client()
    }

    /// Whether connections must be made again through the sentinels or the cluster after `e`
    /// (the master may have moved: its server is gone, it says it is a replica now, or the
    /// cluster says the slot is served elsewhere).
    pub(crate) fn follows_a_master(&self, e: &redis::RedisError) -> bool {
        use redis::ServerErrorKind::{Ask, ClusterDown, MasterDown, Moved, ReadOnly, TryAgain};
        let lost = e.is_connection_dropped() || e.is_connection_refusal() || e.is_io_error();
        if is_sentinel_url(&self.url) {
            return lost || e.kind() == redis::ErrorKind::Server(ReadOnly);
        }
        is_cluster_url(&self.url)
            && (lost
                || matches!(
                    e.kind(),
                    redis::ErrorKind::Server(Moved | Ask | ReadOnly | ClusterDown | TryAgain | MasterDown)
                ))
    }

    /// Whether the URL names a Redis Cluster (keys outside the namespace get its prefix).
    pub(crate) fn is_cluster(&self) -> bool {
        is_cluster_url(&self.url)
    }

    /// `key` as stored: on Redis Cluster under the namespace (`{app}:key`, in its slot), else
    /// as given (Dramatiq's keys, shared with Python).
    pub(crate) fn shared_key<'a>(&self, key: &'a str) -> std::borrow::Cow<'a, str> {
        if self.is_cluster() {
            std::borrow::Cow::Owned(format!("{}:{key}", self.namespace))
        } else {
            std::borrow::Cow::Borrowed(key)
        }
    }

    /// `key` as callers named it: [`RedisOptions::shared_key`] undone.
    pub(crate) fn unshared_key<'a>(&self, key: &'a str) -> &'a str {
        if self.is_cluster() {
            key.strip_prefix(self.namespace.as_str())
                .and_then(|k| k.strip_prefix(':'))
                .unwrap_or(key)
        } else {
            key
        }
    }

    /// The prefix of dramatiq-abort's keys: `abort_namespace`, or on Redis Cluster, when it was
    /// left at Dramatiq's default, `NAMESPACE:aborts:` (in the namespace's slot).
    pub(crate) fn abort_prefix(&self) -> std::borrow::Cow<'_, str> {
        if self.is_cluster() && self.abort_namespace == DEFAULT_ABORT_NAMESPACE {
            std::borrow::Cow::Owned(format!("{}:aborts:", self.namespace))
        } else {
            std::borrow::Cow::Borrowed(&self.abort_namespace)
        }
    }

    fn fixed_client(&self) -> Result<redis::Client, Error> {
        let bad = |e: redis::RedisError| Error::Config(format!("bad Redis URL {:?}: {e}", redact_url(&self.url)));
        if self.url.to_ascii_lowercase().starts_with("rediss://") {
            install_crypto_provider();
        }
        if self.tls.is_empty() {
            return redis::Client::open(self.url.as_str()).map_err(bad);
        }
        self.check_tls()?;
        let pem = self.tls.read(&TLS_NAMES)?;
        let client_tls = match (pem.cert, pem.key) {
            (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
            _ => None,
        };
        redis::Client::build_with_tls(
            self.url.as_str(),
            redis::TlsCertificates {
                client_tls,
                root_cert: pem.ca,
            },
        )
        .map_err(|e| {
            Error::Config(format!(
                "cannot use the TLS files of the Redis URL {:?}: {e}",
                redact_url(&self.url)
            ))
        })
    }

    /// A connection manager: multiplexed, reconnecting on its own after a failure.
    pub(crate) async fn manager(&self) -> Result<ConnectionManager, Error> {
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_max_delay(Duration::from_secs(2));
        ConnectionManager::new_with_config(self.client().await?, config)
            .await
            .map_err(|e| self.connect_error(e))
    }

    /// A shared connection that also heals a silent link (see [`RedisConnection`]).
    pub(crate) async fn connection(&self) -> Result<RedisConnection, Error> {
        let mut manager = self.manager().await?;
        if !self.is_cluster() && !is_sentinel_url(&self.url) {
            // A cluster node reached as a single server answers `MOVED` for most keys, which
            // would be retried for ever: refused now, with the fix. (A server that denies INFO
            // is let through.)
            let info: Result<String, _> = redis::cmd("INFO").arg("cluster").query_async(&mut manager).await;
            if info.is_ok_and(|info| info.contains("cluster_enabled:1")) {
                return Err(Error::Config(format!(
                    "{} is a Redis Cluster node; use redis+cluster://HOST:PORT[,HOST:PORT…]?namespace={{APP}} (a hash-tagged namespace)",
                    redact_url(&self.url)
                )));
            }
        }
        let connection = RedisConnection {
            healing: Arc::new(Healing {
                current: RwLock::new((0, manager)),
                options: self.clone(),
                rebuilding: AtomicBool::new(false),
            }),
        };
        tokio::spawn(probe(Arc::downgrade(&connection.healing)));
        Ok(connection)
    }

    /// A dedicated connection for blocking commands (no response time-out).
    pub(crate) async fn blocking_connection(&self) -> Result<MultiplexedConnection, Error> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(None);
        self.client()
            .await?
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.connect_error(e))
    }

    pub(crate) fn connect_error(&self, e: redis::RedisError) -> Error {
        let kind = kind_of(&e);
        let text = format!("{e} {e:?}");
        let tls = self.url.to_ascii_lowercase().starts_with("rediss://");
        let fix = tls_hint(&text, &TLS_NAMES)
            .or_else(|| {
                (tls && self.tls.cert_file.is_none())
                    .then(|| closed_without_client_cert_hint(&text, &TLS_NAMES))
                    .flatten()
            })
            .unwrap_or_else(|| "check that the server runs and the URL is right".into());
        Error::backend_with_source(
            BACKEND,
            kind,
            format!("cannot connect to Redis at {}: {e}; {fix}", redact_url(&self.url)),
            e,
        )
    }
}

/// The redis client builds its rustls configuration from the process's default crypto
/// provider, which rustls picks on its own only when exactly one provider is compiled in:
/// installs ring (the provider every Troupe backend uses) unless the application installed one.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may install one first: either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// How long a command may go unanswered before its connection counts as dead.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// A shared connection to Redis (multiplexed), as redis-rs's `ConnectionManager`, which
/// reconnects after a dropped link, and which also replaces a link that went silent: a
/// connection stalled by a failed network path or a stuck proxy closes nothing, so the
/// manager would keep it, and every command on it would time out forever. A `PING` every 5 s
/// left unanswered for 10 s, or a command for 30 s, sends the next commands to a fresh
/// connection.
#[derive(Clone)]
pub struct RedisConnection {
    healing: Arc<Healing>,
}

struct Healing {
    /// The connection in use and its generation.
    current: RwLock<(u64, ConnectionManager)>,
    options: RedisOptions,
    rebuilding: AtomicBool,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection")
            .field("url", &redact_url(&self.healing.options.url))
            .finish_non_exhaustive()
    }
}

impl RedisConnection {
    fn current(&self) -> (u64, ConnectionManager) {
        let current = self.healing.current.read().unwrap_or_else(PoisonError::into_inner);
        (current.0, current.1.clone())
    }

    /// After a time-out on the connection of `generation`, or behind sentinels after an error
    /// that says the master may have moved, replaces it.
    fn heal(&self, generation: u64, e: &redis::RedisError) {
        if e.is_timeout() || self.healing.options.follows_a_master(e) {
            replace(&self.healing, generation);
        }
    }
}

/// How often a [`RedisConnection`] is checked, and how long its `PING` may take: a silent link
/// is replaced within about 15 s, even one nothing else is sent on (a worker's result
/// connection while its broker connection is the one waiting).
const PROBE_EVERY: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pings the connection every [`PROBE_EVERY`] until it is dropped; one unanswered within
/// [`PROBE_TIMEOUT`] is replaced.
async fn probe(healing: std::sync::Weak<Healing>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(strong) = healing.upgrade() else { return };
        let (generation, mut conn) = {
            let current = strong.current.read().unwrap_or_else(PoisonError::into_inner);
            (current.0, current.1.clone())
        };
        let ping = redis::cmd("PING");
        match tokio::time::timeout(PROBE_TIMEOUT, ping.query_async::<()>(&mut conn)).await {
            Err(_) => replace(&strong, generation),
            Ok(Err(e)) if e.is_timeout() => replace(&strong, generation),
            Ok(_) => {}
        }
    }
}

/// Connects afresh (once at a time, in the background) and puts the new connection in place of
/// the one of `generation`, unless that one was replaced already.
fn replace(healing: &Arc<Healing>, generation: u64) {
    if healing.rebuilding.swap(true, Ordering::AcqRel) {
        return;
    }
    let healing = Arc::clone(healing);
    tokio::spawn(async move {
        match healing.options.manager().await {
            Ok(fresh) => {
                let mut current = healing.current.write().unwrap_or_else(PoisonError::into_inner);
                if current.0 == generation {
                    tracing::warn!("a Redis connection went silent or lost its master; a fresh connection replaces it");
                    *current = (generation + 1, fresh);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reconnect to Redis after a failed command; trying again on the next one");
            }
        }
        healing.rebuilding.store(false, Ordering::Release);
    });
}

impl redis::aio::ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let (generation, mut conn) = self.current();
            let result = conn.req_packed_command(cmd).await;
            if let Err(e) = &result {
                self.heal(generation, e);
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let (generation, mut conn) = self.current();
            let result = conn.req_packed_commands(cmd, offset, count).await;
            if let Err(e) = &result {
                self.heal(generation, e);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.current().1.get_db()
    }
}

pub(crate) fn kind_of(e: &redis::RedisError) -> ErrorKind {
    if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() || passing(e) {
        ErrorKind::Connection
    } else {
        ErrorKind::Protocol
    }
}

/// Whether the server refused for a passing reason: loading its data after a restart
/// (`LOADING`), a replica not yet promoted or a failover under way (`READONLY`, `MASTERDOWN`,
/// `TRYAGAIN`, `CLUSTERDOWN`); also when such a refusal aborted a transaction or a pipeline.
///
/// `MOVED` and `ASK` pass too: on Redis Cluster the namespace's slot moved (a failover or a
/// resharding) and the connection is made again to its new master.
fn passing(e: &redis::RedisError) -> bool {
    use redis::ServerErrorKind::{Ask, BusyLoading, ClusterDown, MasterDown, Moved, ReadOnly, TryAgain};
    let passing = |kind: Option<redis::ServerErrorKind>| {
        matches!(
            kind,
            Some(BusyLoading | TryAgain | ClusterDown | MasterDown | ReadOnly | Moved | Ask)
        )
    };
    e.clone()
        .into_server_errors()
        .is_some_and(|errors| !errors.is_empty() && errors.iter().all(|(_, error)| passing(error.kind())))
}

/// Maps a redis error to a Troupe error with `what` as context.
pub(crate) fn redis_error(what: &str, e: redis::RedisError) -> Error {
    Error::backend_with_source(BACKEND, kind_of(&e), format!("{what}: {e}"), e)
}

/// Milliseconds since the epoch.
pub(crate) fn now() -> u64 {
    troupe_core::now_ms()
}

pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let o = RedisOptions::from_url("redis://:secret@localhost:6379/2?namespace=app&heartbeat_timeout=2s").unwrap();
        assert_eq!(o.namespace, "app");
        assert_eq!(o.heartbeat_timeout, Duration::from_secs(2));
        assert_eq!(o.url, "redis://:secret@localhost:6379/2");
        assert_eq!(o.abort_namespace, "dramatiq:aborts:");
        let o = RedisOptions::from_url("redis://h?abort_namespace=app:aborts:").unwrap();
        assert_eq!(
            (o.abort_namespace.as_str(), o.url.as_str()),
            ("app:aborts:", "redis://h")
        );
        let e = RedisOptions::from_url("redis://h?heartbeat_timeout=later")
            .unwrap_err()
            .to_string();
        assert!(e.contains("heartbeat_timeout"), "{e}");
        let e = RedisOptions::from_url("http://u:pw@h").unwrap_err().to_string();
        assert!(e.contains("not a Redis URL") && !e.contains("pw"), "{e}");
    }
}

/// A blocking command's timeout in seconds (sub-second honoured by Redis 6 or later; 0 would
/// block forever).
fn seconds(timeout: Duration) -> f64 {
    timeout.as_secs_f64().max(0.001)
}

/// Dedicated connections for blocking reads (a blocking command would stall every caller of a
/// multiplexed connection), kept for reuse.
#[derive(Clone, Default)]
pub(crate) struct BlockingPool {
    idle: std::sync::Arc<std::sync::Mutex<Vec<MultiplexedConnection>>>,
}

impl BlockingPool {
    /// `BLMOVE key key RIGHT LEFT timeout` (Dramatiq's `BRPOPLPUSH key key`): waits up to
    /// `timeout` (sub-second honoured) for `key`'s list to have an element and returns it,
    /// leaving it in place.
    pub(crate) async fn wait_on_list(
        &self,
        options: &RedisOptions,
        key: &str,
        timeout: Duration,
        what: &str,
    ) -> Result<Option<Vec<u8>>, Error> {
        let mut cmd = redis::cmd("BLMOVE");
        cmd.arg(key).arg(key).arg("RIGHT").arg("LEFT").arg(seconds(timeout));
        self.run(options, &cmd, timeout, what).await
    }

    /// `BLPOP keys… timeout`: waits up to `timeout` (sub-second honoured, Redis 6 or later) for
    /// one of `keys` to have an element, and pops it. Returns the key and the element.
    pub(crate) async fn pop_first(
        &self,
        options: &RedisOptions,
        keys: &[String],
        timeout: Duration,
        what: &str,
    ) -> Result<Option<(String, Vec<u8>)>, Error> {
        let mut cmd = redis::cmd("BLPOP");
        cmd.arg(keys).arg(seconds(timeout));
        self.run(options, &cmd, timeout, what).await
    }

    /// Runs a command that blocks the server for up to `block` on a connection of the pool
    /// (one dropped on error, as the command may still be pending on it). A server silent for
    /// [`RESPONSE_TIMEOUT`] past `block` is a dead link: the connection is dropped.
    async fn run<T: redis::FromRedisValue>(
        &self,
        options: &RedisOptions,
        cmd: &redis::Cmd,
        block: Duration,
        what: &str,
    ) -> Result<T, Error> {
        let mut conn = self.take(options).await?;
        let got = match tokio::time::timeout(block + RESPONSE_TIMEOUT, cmd.query_async(&mut conn)).await {
            Ok(got) => got.map_err(|e| redis_error(what, e))?,
            Err(_) => {
                return Err(Error::backend(
                    BACKEND,
                    ErrorKind::Timeout,
                    format!(
                        "{what}: no answer from Redis within {RESPONSE_TIMEOUT:?} of the command's own time-out; the link is dropped"
                    ),
                ));
            }
        };
        self.give_back(conn);
        Ok(got)
    }

    /// An idle connection, or a new one. A connection whose command failed or was dropped while
    /// blocked is never given back.
    async fn take(&self, options: &RedisOptions) -> Result<MultiplexedConnection, Error> {
        let idle = self.idle.lock().ok().and_then(|mut b| b.pop());
        match idle {
            Some(c) => Ok(c),
            None => options.blocking_connection().await,
        }
    }

    fn give_back(&self, conn: MultiplexedConnection) {
        if let Ok(mut b) = self.idle.lock()
            && b.len() < 8
        {
            b.push(conn);
        }
    }
}
