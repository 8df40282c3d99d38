//! Options and URL parsing, connections (with reconnect and failover) and error mapping.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connect, Connection, ConnectionProperties};
use tokio::time::Instant;
use troupe_core::tls::{TlsFiles, TlsSettingNames, closed_without_client_cert_hint, path_from_query, tls_hint};
use troupe_core::{Error, ErrorKind, redact_url};

pub(crate) const BACKEND: &str = "rabbitmq";

/// The TLS settings' names in a RabbitMQ URL: those of RabbitMQ's URI query parameters.
const TLS_NAMES: TlsSettingNames = TlsSettingNames::new("RabbitMQ", "cacertfile", "certfile", "keyfile");

/// The AMQP heartbeat Troupe asks for (see [`RabbitmqOptions::heartbeat`]).
pub(crate) const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// The first reconnect delay; it doubles after each failed attempt up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest delay between two reconnect attempts: short, so a restarted node is in use
/// again within about 2 s of accepting connections (a refused connect costs little).
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The kind of queue a broker declares (see [`RabbitmqOptions::queue_type`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueType {
    /// Classic queues with Dramatiq's exact arguments: what Python Dramatiq declares, so both
    /// can share a queue (the default).
    #[default]
    Classic,
    /// Quorum queues (`x-queue-type: quorum`): replicated over the nodes of a cluster by Raft,
    /// so a queue survives the loss of a minority of its nodes, with a delivery limit that
    /// dead-letters a message redelivered too often (one that kills its worker, say). No
    /// priorities on RabbitMQ 3.x. Every producer and worker of a queue, Python ones included,
    /// must declare it the same way.
    Quorum,
}

impl QueueType {
    /// Its name in URLs and in `x-queue-type`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// The delivery limit of quorum queues when none is set (RabbitMQ 4's default).
pub(crate) const DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// Settings of a [`RabbitmqBroker`](crate::RabbitmqBroker). Its `Debug` output redacts passwords.
#[derive(Clone)]
#[non_exhaustive]
pub struct RabbitmqOptions {
    /// Server URLs, tried in order on every (re)connect (failover), without Troupe's own query
    /// settings.
    pub urls: Vec<String>,
    /// Declares queues with `x-max-priority` (1..=255) so RabbitMQ delivers by priority: Troupe's
    /// priorities below 0 (`SendOptions::priority`, an actor's `priority`) map onto
    /// 1..=max_priority, and Dramatiq's `broker_priority` is used as is. Every producer and
    /// worker of a queue must agree on it: RabbitMQ refuses a declaration with other arguments
    /// (default none, Dramatiq's exact arguments: priorities are then not honoured, and a
    /// prioritized message logs one warning per queue).
    pub max_priority: Option<u8>,
    /// The kind of queue declared for `Q`, `Q.DQ` and `Q.XQ` (default [`QueueType::Classic`],
    /// Dramatiq's).
    pub queue_type: QueueType,
    /// With quorum queues, how many times RabbitMQ delivers a message of `Q` before it
    /// dead-letters it to `Q.XQ` (reason `delivery_limit`): every redelivery counts (a worker
    /// that died or lost its link holding it, a message returned at shutdown), retries do not
    /// (a retry is a new message). `None` means 20; `Some(0)` means no limit. Not applied to
    /// `Q.DQ`, whose messages are held and returned without running. Classic queues have none.
    pub delivery_limit: Option<u32>,
    /// Publisher confirms: an enqueue returns once RabbitMQ has taken the message (default
    /// true). When off, enqueues do not wait (as Dramatiq's default); dead letters are still
    /// published with confirms, since the original is acked only after.
    pub confirm_delivery: bool,
    /// `x-message-ttl` of the dead-letter queues (default 7 days, or Dramatiq's
    /// `dramatiq_dead_message_ttl` environment variable in ms). Must match the other peers.
    pub dead_message_ttl: Duration,
    /// Largest accepted message (default 1 MiB).
    pub max_message_size: usize,
    /// How long connecting to one URL may take (default 5 s).
    pub connect_timeout: Duration,
    /// The AMQP heartbeat; `None` accepts the server's proposal (RabbitMQ: 60 s), zero disables
    /// it (default 10 s, within the 5 to 20 s RabbitMQ recommends). A connection that hears
    /// nothing from the server for twice this is closed and the broker reconnects: a link that
    /// stalls for good without closing is noticed in 20 s (with the server's 60 s, in 120 s).
    pub heartbeat: Option<Duration>,
    /// How long one operation (a publish and its confirm, a declare, a get) may take before it
    /// fails with a time-out, for instance while RabbitMQ blocks publishers on a resource alarm
    /// (default 30 s).
    pub operation_timeout: Duration,
    /// The `connection_name` client property shown by `rabbitmqctl list_connections` and the
    /// management UI; the broker adds ` publish` and ` consume` to it (default
    /// `troupe-<pid>-<random>`).
    pub connection_name: Option<String>,
    /// A CA to trust (added to the public roots) and a client certificate for `amqps://`
    /// (default none).
    pub tls: TlsFiles,
}

impl std::fmt::Debug for RabbitmqOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RabbitmqOptions")
            .field("urls", &urls)
            .field("max_priority", &self.max_priority)
            .field("queue_type", &self.queue_type)
            .field("delivery_limit", &self.delivery_limit)
            .field("confirm_delivery", &self.confirm_delivery)
            .field("dead_message_ttl", &self.dead_message_ttl)
            .field("max_message_size", &self.max_message_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("operation_timeout", &self.operation_timeout)
            .field("connection_name", &self.connection_name)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Dramatiq's default dead-letter TTL: 7 days.
const DEFAULT_DEAD_MESSAGE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

impl RabbitmqOptions {
    /// Defaults for `url` (several URLs may be separated by `;`). The URL is checked when the
    /// broker connects; [`RabbitmqOptions::from_url`] checks it at once and reads Troupe's
    /// settings from its query.
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        let url = url.into();
        let dead_message_ttl = std::env::var("dramatiq_dead_message_ttl")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(DEFAULT_DEAD_MESSAGE_TTL, Duration::from_millis);
        Self {
            urls: split_urls(&url),
            max_priority: None,
            queue_type: QueueType::Classic,
            delivery_limit: None,
            confirm_delivery: true,
            dead_message_ttl,
            max_message_size: troupe_core::DEFAULT_MAX_MESSAGE_SIZE,
            connect_timeout: Duration::from_secs(5),
            heartbeat: Some(DEFAULT_HEARTBEAT),
            operation_timeout: Duration::from_secs(30),
            connection_name: None,
            tls: TlsFiles::default(),
        }
    }

    /// Parses `amqp://[user:pass@]host[:port][/vhost]` or `amqps://…` (TLS with rustls and the
    /// webpki roots); several URLs separated by `;` give failover, as in Dramatiq. An empty
    /// vhost (`amqp://host/`) means `/`, as pika reads it.
    ///
    /// Troupe settings in the query: `max_priority` (1..=255), `queue_type` (`classic` or
    /// `quorum`), `delivery_limit` (quorum queues; 0 for none), `confirm_delivery`
    /// (`true`/`false`), `dead_message_ttl`, `connect_timeout`, `operation_timeout` (durations
    /// such as `30s`; a bare number is milliseconds), `heartbeat` (a duration; a bare number is
    /// seconds, as in pika), `max_message_size` (bytes) and `connection_name`; for `amqps://`,
    /// RabbitMQ's URI parameters `cacertfile` (a PEM file of the CA to trust, besides the
    /// public roots), `certfile` and `keyfile` (a client certificate and its key). Other query
    /// settings (`frame_max`, `channel_max`, `connection_timeout`, `auth_mechanism`) go to the
    /// AMQP client; unknown ones (pika's `connection_attempts`, ...) are ignored.
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad part (passwords redacted).
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let parts = split_urls(url);
        if parts.is_empty() {
            return Err(Error::Config(
                "the RabbitMQ URL is empty; use amqp://USER:PASS@HOST:PORT/VHOST".into(),
            ));
        }
        let mut options = Self::new("");
        options.urls.clear();
        for part in parts {
            let (base, query) = part.split_once('?').unwrap_or((part.as_str(), ""));
            let mut passthrough = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                if !options.apply_setting(key, value)? {
                    passthrough.push(pair);
                }
            }
            let url = if passthrough.is_empty() {
                base.to_owned()
            } else {
                format!("{base}?{}", passthrough.join("&"))
            };
            amqp_uri(&url, &options)?;
            options.urls.push(url);
        }
        options.check_tls()?;
        options.check_queue_type()?;
        Ok(options)
    }

    /// Applies one Troupe query setting; returns false when `key` is not one of Troupe's.
    fn apply_setting(&mut self, key: &str, value: &str) -> Result<bool, Error> {
        let bad = |e: &dyn std::fmt::Display| {
            Error::Config(format!("bad value {value:?} for `{key}` in the RabbitMQ URL: {e}"))
        };
        match key {
            "max_priority" => {
                let n: u8 = value.parse().map_err(|e| bad(&e))?;
                if n == 0 {
                    return Err(bad(&"max_priority must be between 1 and 255"));
                }
                self.max_priority = Some(n);
            }
            "queue_type" => {
                self.queue_type = match value.to_ascii_lowercase().as_str() {
                    "classic" => QueueType::Classic,
                    "quorum" => QueueType::Quorum,
                    _ => return Err(bad(&"expected classic or quorum")),
                };
            }
            "delivery_limit" => self.delivery_limit = Some(value.parse().map_err(|e| bad(&e))?),
            "confirm_delivery" => {
                self.confirm_delivery = match value.to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => true,
                    "false" | "0" | "no" | "off" => false,
                    _ => return Err(bad(&"expected true or false")),
                };
            }
            "dead_message_ttl" => {
                self.dead_message_ttl = parse_duration(value, Duration::from_millis).map_err(|e| bad(&e))?;
            }
            "connect_timeout" => {
                self.connect_timeout = parse_duration(value, Duration::from_millis).map_err(|e| bad(&e))?;
            }
            "operation_timeout" => {
                self.operation_timeout = parse_duration(value, Duration::from_millis).map_err(|e| bad(&e))?;
            }
            "heartbeat" => self.heartbeat = Some(parse_duration(value, Duration::from_secs).map_err(|e| bad(&e))?),
            "max_message_size" => self.max_message_size = value.parse().map_err(|e| bad(&e))?,
            "cacertfile" => self.tls.ca_file = Some(path_from_query(value)),
            "certfile" => self.tls.cert_file = Some(path_from_query(value)),
            "keyfile" => self.tls.key_file = Some(path_from_query(value)),
            "connection_name" => {
                if value.is_empty() {
                    return Err(bad(&"it is empty"));
                }
                self.connection_name = Some(value.to_owned());
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Trusts the CA certificates in the PEM file `path` for `amqps://`, besides the public
    /// roots (as RabbitMQ's `cacertfile`).
    #[must_use]
    pub fn tls_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tls.ca_file = Some(path.into());
        self
    }

    /// Presents a client certificate and its private key (PEM files) for `amqps://` (as
    /// RabbitMQ's `certfile` and `keyfile`).
    #[must_use]
    pub fn tls_client_cert(mut self, cert: impl Into<std::path::PathBuf>, key: impl Into<std::path::PathBuf>) -> Self {
        self.tls = self.tls.client_cert(cert, key);
        self
    }

    /// TLS files only make sense with `amqps://` URLs, and a certificate needs its key.
    fn check_tls(&self) -> Result<(), Error> {
        if self.tls.is_empty() {
            return Ok(());
        }
        if let Some(plain) = self
            .urls
            .iter()
            .find(|u| !u.to_ascii_lowercase().starts_with("amqps://"))
        {
            return Err(Error::Config(format!(
                "`cacertfile`, `certfile` and `keyfile` need TLS: use amqps:// instead of {:?}",
                redact_url(plain)
            )));
        }
        self.tls.validate(&TLS_NAMES)
    }

    /// lapin's TLS settings, the files read now (a renewed certificate counts on reconnect).
    fn tls_config(&self) -> Result<OwnedTLSConfig, Error> {
        if self.tls.is_empty() {
            return Ok(OwnedTLSConfig::default());
        }
        self.check_tls()?;
        let pem = self.tls.read(&TLS_NAMES)?;
        let mut config = OwnedTLSConfig::default();
        if let Some(ca) = pem.ca {
            config.cert_chain = Some(String::from_utf8_lossy(&ca).into_owned());
        }
        if let (Some(pem), Some(key)) = (pem.cert, pem.key) {
            config.identity = Some(OwnedIdentity::PKCS8 { pem, key });
        }
        Ok(config)
    }

    /// Sets the URLs tried in order on every (re)connect.
    #[must_use]
    pub fn urls(mut self, urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.urls = urls.into_iter().map(Into::into).collect();
        self
    }

    /// Sets `x-max-priority` of the queues this broker declares.
    #[must_use]
    pub fn max_priority(mut self, max_priority: Option<u8>) -> Self {
        self.max_priority = max_priority;
        self
    }

    /// The kind of queue to declare (see [`QueueType`]).
    #[must_use]
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// With quorum queues, how many deliveries of a message before RabbitMQ dead-letters it
    /// (see [`RabbitmqOptions::delivery_limit`]; 0 for no limit).
    #[must_use]
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit);
        self
    }

    /// Turns publisher confirms on or off.
    #[must_use]
    pub fn confirm_delivery(mut self, on: bool) -> Self {
        self.confirm_delivery = on;
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

    /// Sets the connect time-out (per URL).
    #[must_use]
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Sets the AMQP heartbeat (`None`: the server's proposal; zero: off).
    #[must_use]
    pub fn heartbeat(mut self, d: Option<Duration>) -> Self {
        self.heartbeat = d;
        self
    }

    /// Sets the time-out of one operation.
    #[must_use]
    pub fn operation_timeout(mut self, d: Duration) -> Self {
        self.operation_timeout = d;
        self
    }

    /// Sets the `connection_name` client property.
    #[must_use]
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Checks the settings that cannot be checked by their setters.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.urls.is_empty() {
            return Err(Error::Config(
                "no RabbitMQ URL is configured; use amqp://USER:PASS@HOST:PORT/VHOST".into(),
            ));
        }
        if self.max_priority == Some(0) {
            return Err(Error::Config("max_priority must be between 1 and 255".into()));
        }
        self.check_queue_type()?;
        for url in &self.urls {
            amqp_uri(url, self)?;
        }
        Ok(())
    }

    /// Settings that only one kind of queue takes.
    fn check_queue_type(&self) -> Result<(), Error> {
        match self.queue_type {
            QueueType::Quorum if self.max_priority.is_some() => Err(Error::Config(
                "max_priority cannot be used with queue_type=quorum: quorum queues have no priorities on RabbitMQ 3.x; use classic queues (the default) for priorities".into(),
            )),
            QueueType::Classic if self.delivery_limit.is_some() => Err(Error::Config(
                "delivery_limit applies to quorum queues only: add queue_type=quorum, or remove delivery_limit".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The delivery limit `Q` is declared with: quorum queues only, none when 0.
    pub(crate) fn effective_delivery_limit(&self) -> Option<u32> {
        match self.queue_type {
            QueueType::Quorum => Some(self.delivery_limit.unwrap_or(DEFAULT_DELIVERY_LIMIT)).filter(|n| *n > 0),
            QueueType::Classic => None,
        }
    }

    /// The dead-letter TTL in ms, as RabbitMQ's `x-message-ttl` wants it.
    pub(crate) fn dead_message_ttl_ms(&self) -> i64 {
        i64::try_from(self.dead_message_ttl.as_millis()).unwrap_or(i64::MAX)
    }
}

fn split_urls(url: &str) -> Vec<String> {
    url.split(';')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A duration such as `30s`; a bare number is in the unit `bare` gives.
fn parse_duration(value: &str, bare: fn(u64) -> Duration) -> Result<Duration, String> {
    if let Ok(n) = value.parse::<u64>() {
        return Ok(bare(n));
    }
    humantime::parse_duration(value).map_err(|e| e.to_string())
}

/// Parses one URL into lapin's form, with the options' heartbeat and connect time-out.
/// The frame size Troupe asks for unless the URL sets one.
const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

pub(crate) fn amqp_uri(url: &str, options: &RabbitmqOptions) -> Result<AMQPUri, Error> {
    let lower = url.to_ascii_lowercase();
    if !lower.starts_with("amqp://") && !lower.starts_with("amqps://") {
        return Err(Error::Config(format!(
            "{:?} is not a RabbitMQ URL; use amqp://USER:PASS@HOST:PORT/VHOST or amqps:// for TLS",
            redact_url(url)
        )));
    }
    let mut uri = AMQPUri::from_str(url).map_err(|e| {
        // The parser may quote the URL: never show its password.
        Error::Config(format!(
            "bad RabbitMQ URL {:?}: {}",
            redact_url(url),
            e.replace(url, &redact_url(url))
        ))
    })?;
    if uri.vhost.is_empty() {
        // pika reads `amqp://host/` as the default vhost; so does Troupe.
        uri.vhost = "/".into();
    }
    if let Some(heartbeat) = options.heartbeat {
        uri.query.heartbeat = Some(u16::try_from(heartbeat.as_secs()).unwrap_or(u16::MAX));
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(u64::try_from(options.connect_timeout.as_millis()).unwrap_or(u64::MAX));
    }
    if uri.query.frame_max.is_none() {
        // lapin keeps two buffers of 32 frames per connection: RabbitMQ's default frame_max
        // (128 KiB) costs 8 MiB of memory per connection. Larger messages are split into more
        // frames; `?frame_max=` in the URL overrides.
        uri.query.frame_max = Some(DEFAULT_FRAME_MAX);
    }
    if uri.scheme == AMQPScheme::AMQPS && uri.authority.port == AMQPScheme::AMQP.default_port() {
        tracing::debug!("amqps:// on port 5672: RabbitMQ usually serves TLS on 5671");
    }
    Ok(uri)
}

/// The Troupe error kind of a lapin error.
pub(crate) fn kind_of(e: &lapin::Error) -> ErrorKind {
    use lapin::ErrorKind as K;
    match e.kind() {
        K::IOError(_)
        | K::RuntimeShutdownError(_)
        | K::MissingHeartbeatError
        | K::InvalidConnectionState(_)
        | K::InvalidChannelState(..)
        | K::InvalidChannel(_)
        | K::ChannelsLimitReached => ErrorKind::Connection,
        K::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => ErrorKind::NotFound,
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED | AMQPSoftError::PRECONDITIONFAILED)
            | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => ErrorKind::Config,
            AMQPErrorKind::Soft(_) => ErrorKind::Protocol,
            // Hard errors close the connection (CONNECTION_FORCED when an operator closes it);
            // a new connection may work.
            AMQPErrorKind::Hard(_) => ErrorKind::Connection,
        },
        _ => ErrorKind::Protocol,
    }
}

/// Whether RabbitMQ answered 404 NOT_FOUND (a queue does not exist).
pub(crate) fn is_not_found(e: &Error) -> bool {
    e.kind() == ErrorKind::NotFound
}

/// Maps a lapin error to a Troupe error with `what` as context.
pub(crate) fn amqp_error(what: &str, e: lapin::Error) -> Error {
    let kind = kind_of(&e);
    let hint = match kind {
        ErrorKind::Config if e.to_string().contains("PRECONDITION_FAILED") => {
            "; a queue of that name exists with other arguments: every producer and worker must use the same max_priority and dead_message_ttl (Dramatiq: dramatiq_dead_message_ttl)"
        }
        _ => "",
    };
    Error::backend_with_source(BACKEND, kind, format!("{what}: {e}{hint}"), e)
}

/// Runs `fut` with the operation time-out.
pub(crate) async fn timed<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(|e| amqp_error(what, e)),
        Err(_) => Err(Error::backend(
            BACKEND,
            ErrorKind::Timeout,
            format!("{what}: no answer from RabbitMQ within {limit:?}"),
        )),
    }
}

/// One AMQP connection of the broker, re-established on demand after a failure: the URLs are
/// tried in order, and failed attempts back off from 100 ms doubling to 10 s (callers get the
/// last error at once meanwhile, so nothing spins).
pub(crate) struct Link {
    options: RabbitmqOptions,
    name: String,
    state: tokio::sync::Mutex<LinkState>,
    closed: AtomicBool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("name", &self.name).finish_non_exhaustive()
    }
}

struct LinkState {
    conn: Option<Arc<Connection>>,
    generation: u64,
    backoff: Duration,
    retry_at: Option<Instant>,
    last_error: Option<(ErrorKind, String)>,
}

/// A live connection and whether getting it opened a new one after a lost one.
pub(crate) struct Live {
    pub(crate) conn: Arc<Connection>,
    pub(crate) reconnected: bool,
}

impl Link {
    pub(crate) fn new(options: RabbitmqOptions, name: String) -> Self {
        Self {
            options,
            name,
            state: tokio::sync::Mutex::new(LinkState {
                conn: None,
                generation: 0,
                backoff: MIN_BACKOFF,
                retry_at: None,
                last_error: None,
            }),
            closed: AtomicBool::new(false),
        }
    }

    /// The live connection, connecting (again) when there is none.
    pub(crate) async fn get(&self) -> Result<Live, Error> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(closed_error());
        }
        let mut state = self.state.lock().await;
        if let Some(conn) = &state.conn {
            if conn.status().connected() {
                return Ok(Live {
                    conn: Arc::clone(conn),
                    reconnected: false,
                });
            }
            tracing::warn!(connection = %self.name, "lost the RabbitMQ connection; reconnecting");
            state.conn = None;
        }
        if let (Some(at), Some((kind, message))) = (state.retry_at, &state.last_error)
            && Instant::now() < at
        {
            return Err(Error::backend(
                BACKEND,
                *kind,
                format!(
                    "{message} (next reconnect attempt in {:?})",
                    at.saturating_duration_since(Instant::now())
                ),
            ));
        }
        match self.connect().await {
            Ok(conn) => {
                let conn = Arc::new(conn);
                let reconnected = state.generation > 0;
                if reconnected {
                    tracing::info!(connection = %self.name, "reconnected to RabbitMQ");
                }
                state.generation += 1;
                state.conn = Some(Arc::clone(&conn));
                state.backoff = MIN_BACKOFF;
                state.retry_at = None;
                state.last_error = None;
                Ok(Live { conn, reconnected })
            }
            Err(e) => {
                state.retry_at = Some(Instant::now() + state.backoff);
                state.backoff = (state.backoff * 2).min(MAX_BACKOFF);
                // The message alone: the error made from it later has its own prefix.
                let message = match &e {
                    Error::Backend { message, .. } => message.clone(),
                    other => other.to_string(),
                };
                state.last_error = Some((e.kind(), message));
                Err(e)
            }
        }
    }

    /// Connects to the first URL that answers.
    async fn connect(&self) -> Result<Connection, Error> {
        let properties = ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let mut failures = Vec::new();
        let mut kind = ErrorKind::Connection;
        let mut fix = None;
        let tls = self.options.tls_config()?;
        let runtime = lapin::runtime::default_runtime()
            .map_err(|e| Error::Config(format!("RabbitMQ needs a Tokio runtime to connect: {e}")))?;
        for url in &self.options.urls {
            let uri = amqp_uri(url, &self.options)?;
            let attempt = tokio::time::timeout(
                self.options.connect_timeout,
                uri.connect_with_config(properties.clone(), tls.clone(), runtime.clone()),
            )
            .await;
            match attempt {
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(e)) => {
                    kind = kind_of(&e);
                    let text = format!("{e} {e:?}");
                    fix = fix.or_else(|| tls_hint(&text, &TLS_NAMES)).or_else(|| {
                        let tls = url.to_ascii_lowercase().starts_with("amqps://");
                        (tls && self.options.tls.cert_file.is_none())
                            .then(|| closed_without_client_cert_hint(&text, &TLS_NAMES))
                            .flatten()
                    });
                    failures.push(format!("{}: {e}", redact_url(url)));
                }
                Err(_) => {
                    kind = ErrorKind::Timeout;
                    failures.push(format!(
                        "{}: no answer within {:?}",
                        redact_url(url),
                        self.options.connect_timeout
                    ));
                }
            }
        }
        let target = if failures.len() == 1 {
            failures.join("")
        } else {
            format!("any of {}", failures.join("; "))
        };
        let fix = fix.unwrap_or_else(|| "check that the server runs, and the URL, user, password and vhost".into());
        Err(Error::backend(
            BACKEND,
            kind,
            format!("cannot connect to RabbitMQ at {target}; {fix}"),
        ))
    }

    /// Closes the connection; further calls fail.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let conn = self.state.lock().await.conn.take();
        if let Some(conn) = conn
            && conn.status().connected()
        {
            let _ = tokio::time::timeout(self.options.operation_timeout, conn.close(200, "broker closed".into())).await;
        }
    }
}

pub(crate) fn closed_error() -> Error {
    Error::backend(BACKEND, ErrorKind::Connection, "the broker was closed")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_reconnect_error_says_its_kind_once() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = RabbitmqOptions::from_url(&format!("amqp://guest:secret@127.0.0.1:{port}/%2f")).unwrap();
        let link = Link::new(options, "test".into());
        let first = link.get().await.err().unwrap().to_string();
        // Within the backoff, the last error is given again at once.
        let again = link.get().await.err().unwrap().to_string();
        assert!(again.contains("next reconnect attempt"), "{again}");
        for text in [first, again] {
            assert_eq!(text.matches("rabbitmq connection error").count(), 1, "{text}");
            assert!(!text.contains("secret"), "{text}");
        }
    }

    #[test]
    fn parses_urls() {
        let o = RabbitmqOptions::from_url(
            "amqp://guest:secret@localhost:5672/%2f?max_priority=10&confirm_delivery=false&heartbeat=5&dead_message_ttl=1h&frame_max=131072",
        )
        .unwrap();
        assert_eq!(o.max_priority, Some(10));
        assert!(!o.confirm_delivery);
        assert_eq!(o.heartbeat, Some(Duration::from_secs(5)));
        assert_eq!(o.dead_message_ttl, Duration::from_secs(3600));
        assert_eq!(
            o.urls,
            vec!["amqp://guest:secret@localhost:5672/%2f?frame_max=131072".to_owned()]
        );
        let uri = amqp_uri(&o.urls[0], &o).unwrap();
        assert_eq!(uri.vhost, "/");
        assert_eq!(uri.query.heartbeat, Some(5));
        assert_eq!(uri.query.frame_max, Some(131_072));
        let uri = amqp_uri("amqp://h:5672/", &o).unwrap();
        assert_eq!(uri.vhost, "/", "an empty vhost is /, as pika reads it");
        let uri = amqp_uri("amqp://h/app", &o).unwrap();
        assert_eq!(uri.vhost, "app");
    }

    #[test]
    fn failover_urls() {
        let o = RabbitmqOptions::from_url("amqp://a:5672/%2f; amqp://b:5673/%2f?connect_timeout=2s").unwrap();
        assert_eq!(o.urls.len(), 2);
        assert_eq!(o.connect_timeout, Duration::from_secs(2));
        assert_eq!(RabbitmqOptions::new("amqp://a;amqp://b").urls.len(), 2);
    }

    #[test]
    fn bad_urls_are_clear_and_redacted() {
        for (url, needle) in [
            ("http://u:hunter2@h", "not a RabbitMQ URL"),
            ("amqp://u:hunter2@h?max_priority=0", "max_priority"),
            ("amqp://u:hunter2@h?max_priority=300", "max_priority"),
            ("amqp://u:hunter2@h?heartbeat=soon", "heartbeat"),
            ("amqp://u:hunter2@h:99999/", "bad RabbitMQ URL"),
            ("", "empty"),
        ] {
            let e = RabbitmqOptions::from_url(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let o = RabbitmqOptions::from_url("amqp://u:hunter2@h").unwrap();
        assert!(!format!("{o:?}").contains("hunter2"));
    }
}
